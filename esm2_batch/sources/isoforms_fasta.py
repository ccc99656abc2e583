"""The isoform FASTA that --save_isoforms writes and --isoforms reads, so a run can skip
Ensembl entirely (the FASTA reader itself is sources/fasta.py).

Isoform headers carry everything a GeneIsoforms needs::

    >ENSP00000493543 gene=BRAF gene_id=ENSG00000157764 transcript=ENST00000646891
        canonical=1 biotype=protein_coding          (one line in the file)

A gene is the `gene=` value (the query as the user wrote it); its isoforms are re-sorted
canonical first, so a hand-edited file still gives the contract's order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from esm2_batch.errors import InputError
from esm2_batch.records import GeneIsoforms, Isoform, isoform_sort_key
from esm2_batch.sources.fasta import read_fasta
from esm2_batch.store.atomic import atomic_text


def format_header(iso: Isoform, query: str) -> str:
    return (f"{iso.protein_id} gene={query} gene_id={iso.gene_id} "
            f"transcript={iso.transcript_id} canonical={int(iso.is_canonical)} "
            f"biotype={iso.biotype}")


def write_isoforms_fasta(path: str | Path, genes: Iterable[GeneIsoforms]) -> int:
    """Write every isoform of every gene (atomically); returns the number written."""
    path = Path(path)
    lines: list[str] = []
    for gene in genes:
        for iso in gene.isoforms:
            lines += [">" + format_header(iso, gene.query), *_wrap(iso.sequence)]
    atomic_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return sum(1 for line in lines if line.startswith(">"))


def _wrap(sequence: str, width: int = 60) -> list[str]:
    return [sequence[i:i + width] for i in range(0, len(sequence), width)] or [""]


def read_isoforms_fasta(path: str | Path) -> list[GeneIsoforms]:
    """Group an isoform FASTA by gene, in order of first appearance, canonical first."""
    by_gene: dict[str, list[Isoform]] = {}
    for header, sequence in read_fasta(path):
        protein_id, fields = _parse_header(header, path)
        query = fields["gene"]
        by_gene.setdefault(query, []).append(Isoform(
            protein_id=protein_id, transcript_id=fields.get("transcript", ""),
            gene_id=fields.get("gene_id", query), sequence=sequence.upper().rstrip("*"),
            is_canonical=fields.get("canonical", "0") in ("1", "true", "True"),
            biotype=fields.get("biotype", "protein_coding")))
    return [GeneIsoforms(q, isos[0].gene_id, None, tuple(sorted(isos, key=isoform_sort_key)),
                         "ok") for q, isos in by_gene.items()]


def _parse_header(header: str, path: str | Path) -> tuple[str, dict[str, str]]:
    protein_id, *rest = header.split()
    fields = dict(item.split("=", 1) for item in rest if "=" in item)
    if "gene" not in fields:
        raise InputError(f"{path}: header {header[:60]!r} has no gene=...; --isoforms "
                         "expects headers as --save_isoforms writes them")
    return protein_id, fields


@dataclass(frozen=True)
class IsoformsFastaSource:
    """An IsoformSource (sources/base.py) over an isoforms FASTA: offline, no Ensembl."""

    path: Path
    genes: dict[str, GeneIsoforms]

    @classmethod
    def open(cls, path: str | Path) -> IsoformsFastaSource:
        return cls(Path(path), {g.query: g for g in read_isoforms_fasta(path)})

    async def stream(self, queries: Sequence[str]) -> AsyncIterator[GeneIsoforms]:
        for query in queries:
            yield self.genes.get(query) or GeneIsoforms(query, None, None, (), "not_found")

    def provenance(self) -> dict[str, str | int]:
        return {"isoform_source": f"fasta:{self.path}"}

    def describe(self) -> str | None:
        return None

    def unreachable(self) -> str | None:
        return None  # local files, checked when opened

    def known_queries(self) -> Sequence[str] | None:
        return list(self.genes)

    def all_genes(self) -> Sequence[str] | None:
        return list(self.genes)  # the file's genes, in file order (as known_queries)
