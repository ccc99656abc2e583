"""The numbers behind `esm2-batch report`: gene vectors, isoform similarity, neighbours,
a 2-D map, protein lengths. Plain data (lists, floats), so the page (report.py) only
draws, and tests check these numbers without a browser.

Why these: a modeller about to feed the file to SATURN or UCE asks whether canonical or
mean pooling matters for their genes (isoform-to-canonical cosine: near 1 means the
choice hardly matters), whether the vectors mean anything (known paralogs and partners
should be each other's neighbours), and what the model saw (lengths, and how many were
cut at the context).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from esm2_batch.store.esm_file import EsmFile
from esm2_batch.store.peek import as_mapping

__all__ = ["KNOWN_GENES", "MAP_POINTS", "GeneTable", "ReportData", "build_report_data"]

MAP_POINTS = 4000
"""At most this many genes on the 2-D map (a seeded sample; the --genes always): the page
stays small and responsive at 20,000 genes, and the counts are never sampled."""

KNOWN_GENES = ("CD3E", "CD4", "CD8A", "MS4A1", "CD14", "LYZ", "NKG7", "GNLY", "PPBP",
               "HBB", "GAPDH", "ACTB", "BRAF", "TP53")
"""Markers most single-cell lists hold: the default genes whose neighbours are shown."""


@dataclass(frozen=True)
class GeneTable:
    """One canonical vector per gene that has rows, L2-normalised for cosines."""

    genes: list[str]  # the file's keys, in file order
    labels: list[str]  # symbol where the file knows one, else the key
    unit: torch.Tensor  # [G, E] float32, rows of norm 1


@dataclass
class ReportData:
    """Everything the page shows, computed once."""

    lengths: list[int] | None  # one per distinct protein, None when not recorded
    context: int | None  # the truncation (the model's context unless set lower)
    cut: int  # proteins longer than it
    isoform_counts: dict[int, int]  # isoforms -> genes
    isoform_cosines: list[float]  # every non-canonical isoform's cosine to its canonical
    most_different: list[tuple[str, int, float]]  # (gene, isoforms, lowest cosine)
    neighbours: dict[str, list[tuple[str, float]]]  # gene -> [(neighbour, cosine)]
    map_xy: list[tuple[float, float]]  # sampled genes' coordinates
    map_labels: list[str]
    map_marked: list[bool]  # a --genes point (labelled on the page)
    map_method: str
    notes: list[str] = field(default_factory=list)


def gene_table(esm: EsmFile) -> GeneTable:
    """The canonical row of every gene with rows (first row: canonical first)."""
    symbols = as_mapping(esm.meta.get("symbols"))
    genes = [g for g in esm.genes if esm.rows_of(g)]
    rows = torch.tensor([esm.rows_of(g)[0] for g in genes], dtype=torch.long)
    matrix = esm.emb[rows].float() if genes else torch.zeros(0, esm.emb.shape[1])
    unit = torch.nn.functional.normalize(matrix, dim=1)  # [G, E]
    return GeneTable(genes, [str(symbols.get(g) or g) for g in genes], unit)


def isoform_similarity(esm: EsmFile, *, top: int = 15, chunk: int = 8192
                       ) -> tuple[list[float], list[tuple[str, int, float]]]:
    """Each extra isoform's cosine to its gene's canonical row, and the `top` genes whose
    isoforms differ most (lowest cosine first).

    Vectorised over rows, a chunk at a time: a proteome (90,000 rows) is a few matrix
    passes, never a Python loop over genes, and never a float32 copy of the whole matrix."""
    pairs = [(row, rows[0]) for gene in esm.genes
             if len(rows := esm.rows_of(gene)) > 1 for row in rows[1:]]
    if not pairs:
        return [], []
    other = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    canonical = torch.tensor([b for _, b in pairs], dtype=torch.long)
    cosines = torch.empty(len(pairs), dtype=torch.float32)
    for start in range(0, len(pairs), chunk):
        part = slice(start, start + chunk)
        a = torch.nn.functional.normalize(esm.emb[other[part]].float(), dim=1)  # [c, E]
        b = torch.nn.functional.normalize(esm.emb[canonical[part]].float(), dim=1)
        cosines[part] = (a * b).sum(1)
    lowest: dict[str, tuple[int, float]] = {}
    values = cosines.tolist()
    position = 0
    for gene in esm.genes:
        n = len(esm.rows_of(gene))
        if n > 1:
            lowest[gene] = (n, min(values[position:position + n - 1]))
            position += n - 1
    ranked = sorted(lowest.items(), key=lambda item: item[1][1])[:top]
    return values, [(gene, n, low) for gene, (n, low) in ranked]


def nearest(table: GeneTable, wanted: Sequence[str], *, k: int = 8
            ) -> dict[str, list[tuple[str, float]]]:
    """For each wanted gene the table holds (by key or symbol, any case), its k nearest
    genes by cosine of the canonical rows."""
    where = {name.upper(): i for i, name in enumerate(table.genes)}
    where.update({name.upper(): i for i, name in enumerate(table.labels)})
    found: dict[str, list[tuple[str, float]]] = {}
    for gene in wanted:
        i = where.get(gene.upper())
        if i is None:
            continue
        sims = table.unit @ table.unit[i]  # [G]
        sims[i] = -2.0  # never its own neighbour
        best = torch.topk(sims, min(k, max(len(table.genes) - 1, 0)))
        found[table.labels[i]] = [(table.labels[j], float(s))
                                  for s, j in zip(best.values.tolist(), best.indices.tolist(),
                                                  strict=True)]
    return found


def gene_map(table: GeneTable, marked: Sequence[str], *, points: int = MAP_POINTS,
             seed: int = 0) -> tuple[list[tuple[float, float]], list[int], str]:
    """2-D coordinates of a seeded sample of genes (the marked ones always in): UMAP when
    umap-learn is installed, else PCA (the first two principal components, from a
    low-rank SVD of the centred vectors)."""
    count = len(table.genes)
    if count < 3:
        return [], [], "none (fewer than 3 genes)"
    upper = {g.upper() for g in marked}
    keep = [i for i in range(count) if table.labels[i].upper() in upper
            or table.genes[i].upper() in upper]
    rest = [i for i in range(count) if i not in set(keep)]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rest), generator=generator).tolist()
    chosen = keep + [rest[j] for j in order[:max(points - len(keep), 0)]]
    vectors = table.unit[torch.tensor(chosen, dtype=torch.long)]
    xy, method = _umap(vectors, seed)
    if xy is None:
        centred = vectors - vectors.mean(0, keepdim=True)
        _, _, v = torch.pca_lowrank(centred, q=2, center=False, niter=4)
        xy, method = centred @ v[:, :2], "PCA"
    return [(float(a), float(b)) for a, b in xy.tolist()], chosen, method


def _umap(vectors: torch.Tensor, seed: int) -> tuple[torch.Tensor | None, str]:
    try:
        import umap  # optional: pip install umap-learn
    except ImportError:
        return None, ""
    reducer: Any = umap.UMAP(n_components=2, metric="cosine", random_state=seed)
    return torch.as_tensor(reducer.fit_transform(vectors.numpy())), "UMAP (cosine)"


def build_report_data(esm: EsmFile, *, genes: Sequence[str] | None = None) -> ReportData:
    """Every number of the page (see ReportData)."""
    table = gene_table(esm)
    wanted = list(genes) if genes else [g for g in KNOWN_GENES][:8]
    neighbours = nearest(table, wanted)
    if not neighbours and table.genes and not genes:
        neighbours = nearest(table, table.labels[:5])
    xy, chosen, method = gene_map(table, list(neighbours) + list(genes or []))
    marked = {g.upper() for g in (*neighbours, *(genes or []))}
    cosines, different = isoform_similarity(esm)
    lengths, context, cut = _lengths(esm)
    counts: dict[int, int] = {}
    for gene in esm.genes:
        n = len(esm.rows_of(gene))
        if n:
            counts[n] = counts.get(n, 0) + 1
    notes = [] if lengths is not None else [
        "protein lengths: not recorded in this file (written before esm2-batch 0.2)"]
    return ReportData(
        lengths=lengths, context=context, cut=cut, isoform_counts=dict(sorted(counts.items())),
        isoform_cosines=cosines, most_different=different, neighbours=neighbours,
        map_xy=xy, map_labels=[table.labels[i] for i in chosen],
        map_marked=[table.labels[i].upper() in marked or table.genes[i].upper() in marked
                    for i in chosen], map_method=method, notes=notes)


def _lengths(esm: EsmFile) -> tuple[list[int] | None, int | None, int]:
    recorded = esm.meta.get("protein_lengths")
    context = esm.meta.get("truncation")
    cap = int(context) if isinstance(context, int) else None
    if not isinstance(recorded, Mapping) or not recorded:
        return None, cap, 0
    values = [int(recorded[p]) for p in dict.fromkeys(esm.protein_ids) if p in recorded]
    return values, cap, sum(1 for n in values if cap is not None and n > cap)
