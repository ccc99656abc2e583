"""What a run reports: the summary, and the side files written next to esm_all.pt.

    esm_all.not_found.txt    queries no source knew, one per line
    esm_all.unresolved.tsv   every query without a vector, with its likely reason
    esm_all.failed.tsv       protein ID and error of sequences that could not be embedded
    --save_isoforms FILE     the isoforms used, as FASTA

A side file with nothing to say is removed, so its presence alone means "look here".

Why a query did not resolve: `write_unresolved_report` writes one TSV row per unresolved
query next to the output, with the likely reason that sources/unresolved.py reads from the
query's shape (a spreadsheet date, a clone name, the other species' case, ...):

    query  status  gene_id  symbol  likely_reason

An "incomplete" gene (Ensembl announced translations but returned no sequence for some,
even when asked twice) is listed too, with what is missing, since its rows are fewer than
its isoforms and its first row may not be the canonical isoform.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from esm2_batch.errors import EnsemblError, name_some
from esm2_batch.records import GeneIsoforms, GeneStatus, is_ensembl_gene_id
from esm2_batch.sources.unresolved import RETRY, likely_reason
from esm2_batch.store.atomic import atomic_text
from esm2_batch.store.esm_file import EsmFile
from esm2_batch.store.keys import RowKeys

__all__ = [
    "REPORT_COLUMNS",
    "RunSummary",
    "case_insensitive_matches",
    "failed_path",
    "incomplete_reason",
    "synonym_matches",
    "synonym_note",
    "unresolved_report_path",
    "unresolved_rows",
    "write_side_files",
    "write_unresolved_report",
]

REPORT_COLUMNS = ("query", "status", "gene_id", "symbol", "likely_reason")

# ------------------------------------------------------------------------- the report


def unresolved_report_path(out: str | os.PathLike[str]) -> Path:
    """esm_all.pt -> esm_all.unresolved.tsv, next to the output."""
    out = Path(out)
    return out.with_name(out.stem + ".unresolved.tsv")


def incomplete_reason(missing: Sequence[str], *, rows: int, canonical_missing: bool,
                      failed: Collection[str] = ()) -> str:
    """What an incomplete gene lacks, e.g. "2 of 5 protein sequences not returned by
    Ensembl (ENSP1, ENSP2, canonical missing); rerun the same command to retry".

    `rows` is how many isoforms the gene kept; `failed` names proteins that did arrive
    but failed to embed (listed in the .failed.tsv file, not Ensembl's doing).
    """
    total = rows + len(missing)
    lost = [p for p in missing if p not in failed]
    broken = [p for p in missing if p in failed]
    canonical = ", canonical missing" if canonical_missing else ""
    parts = []
    if lost:
        parts.append(f"{len(lost)} of {total} protein sequences not returned by Ensembl "
                     f"({name_some(lost)}{canonical}); {RETRY}")
    if broken:
        parts.append(f"{len(broken)} of {total} protein sequences failed to embed "
                     f"({name_some(broken)}{'' if lost else canonical}; see the "
                     ".failed.tsv file)")
    return "; ".join(parts)


def unresolved_rows(genes: Iterable[GeneIsoforms], *, species: str | None = None,
                    rows: Mapping[str, int] | None = None, failed: Collection[str] = ()
                    ) -> list[tuple[str, str, str, str, str]]:
    """One row per query that is not "ok", in input order.

    `rows` (query -> rows in the file) counts an incomplete gene's kept isoforms when its
    record does not hold them (a gene reused from an earlier file); `failed` as in
    incomplete_reason.
    """
    return [(g.query, g.status, g.gene_id or "", g.symbol or "",
             _reason(g, species, rows or {}, failed))
            for g in genes if g.status != "ok"]


def _reason(gene: GeneIsoforms, species: str | None, rows: Mapping[str, int],
            failed: Collection[str]) -> str:
    if gene.duplicate_of or gene.candidates:
        return synonym_reason(gene)
    if gene.status != "incomplete":
        return likely_reason(gene.query, gene.status, species=species)
    return incomplete_reason(gene.missing_protein_ids,
                             rows=rows.get(gene.query, len(gene.isoforms)),
                             canonical_missing=gene.canonical_missing, failed=failed)


def write_unresolved_report(path: str | os.PathLike[str], genes: Iterable[GeneIsoforms], *,
                            species: str | None = None, rows: Mapping[str, int] | None = None,
                            failed: Collection[str] = ()) -> Path | None:
    """Write the TSV (header + one row per unresolved query); return its path.

    With nothing unresolved, a stale report from an earlier run is removed and None is
    returned, so the file's presence alone says something needs a look.
    """
    path = Path(path)
    found = unresolved_rows(genes, species=species, rows=rows, failed=failed)
    if not found:
        path.unlink(missing_ok=True)
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    writer.writerows(found)
    atomic_text(path, buffer.getvalue())
    return path


def case_insensitive_matches(genes: Iterable[GeneIsoforms]) -> list[tuple[str, str]]:
    """(query, symbol) where a symbol query resolved to a gene spelt in another case."""
    return [(g.query, g.symbol) for g in genes
            if g.symbol and g.status != "not_found" and not is_ensembl_gene_id(g.query)
            and g.query != g.symbol and g.query.casefold() == g.symbol.casefold()]


# -- synonyms (outdated symbols found under their current name) ------------------------------
def synonym_reason(gene: GeneIsoforms) -> str:
    """Why a symbol found by synonym has no vector of its own: ambiguous or a duplicate."""
    if gene.duplicate_of:
        gene_id, symbol = gene.candidates[0] if gene.candidates else ("", "")
        return (f"an earlier name of {symbol or gene_id} ({gene_id}), which the list "
                f"already has as {gene.duplicate_of}: kept once")
    named = ", ".join(f"{g} ({s})" if s else g for g, s in gene.candidates)
    return f"ambiguous: an earlier name or alias of {len(gene.candidates)} genes: {named}"


def synonym_matches(genes: Iterable[GeneIsoforms]) -> list[tuple[str, str]]:
    """(query, current symbol) of the queries found under a newer name, in order."""
    return [(g.query, g.symbol or g.gene_id or "") for g in genes
            if g.matched_by == "synonym" and not g.duplicate_of]


def synonym_note(genes: Iterable[GeneIsoforms]) -> str | None:
    """"found under a newer name: 3 (SEPT5 -> SEPTIN5, ...)", or None when none was."""
    pairs = synonym_matches(genes)
    if not pairs:
        return None
    shown = ", ".join(f"{q} -> {s}" for q, s in pairs[:5])
    return (f"found under a newer name: {len(pairs)} ({shown}{', ...' if len(pairs) > 5 else ''}"
            "); --no_synonyms for strict matching")


# -- the run summary -------------------------------------------------------------------------
class StageCounts(Protocol):
    """What the summary reads from an embedding stage (run/stages.py)."""

    failed: dict[str, tuple[str, str]]
    embedded: int
    cached: int
    tokens: int
    busy_s: float


@dataclass
class RunSummary:
    """What a run did, for the closing report and for callers.

    The counts add up, so a reader can check that no gene and no sequence went missing:
    the distinct genes (genes_in, after exact duplicates) are the merged spellings plus
    the resolved plus the not found; the resolved are the complete (a row for every
    isoform) plus the incomplete plus those without protein (no vector); the file's
    distinct sequences were embedded now, taken from the row cache, resumed from the
    unfinished run's partial store, or reused from the existing esm_all.pt.
    """

    out: Path
    genes_in: int = 0  # distinct queries, exact duplicates already dropped
    duplicates: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # later spelling -> the file's key
    complete: int = 0  # status "ok": a row for every isoform
    no_protein: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    canonical_missing: list[str] = field(default_factory=list)
    isoforms: int = 0
    fresh_sequences: int = 0  # distinct sequences of this run's records
    embedded_now: int = 0
    cached_rows: int = 0  # taken from the shared row cache (store/cache.py)
    resumed_rows: int = 0  # held by the partial store of an unfinished earlier attempt
    reused_rows: int = 0  # rows of the genes kept from the existing esm_all.pt
    reused_sequences: int = 0  # their distinct sequences (not among the fresh ones)
    tokens: int = 0
    failed: list[str] = field(default_factory=list)
    missing_sequences: list[str] = field(default_factory=list)
    side_files: list[Path] = field(default_factory=list)  # written next to `out`
    fetch_s: float = 0.0
    embed_s: float = 0.0
    wall_s: float = 0.0
    estimate: str | None = None  # "estimated X, measured Y" (run/dry_run.estimate_line)
    notes: list[str] = field(default_factory=list)

    @property
    def resolved(self) -> int:
        """Genes Ensembl (or the isoform source) knew, with or without a protein."""
        return self.complete + len(self.incomplete) + len(self.no_protein)

    @property
    def distinct_sequences(self) -> int:
        """The file's distinct protein sequences (several isoforms or genes may share one)."""
        return self.fresh_sequences + self.reused_sequences

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.embed_s if self.embed_s > 0 else 0.0

    @property
    def not_found_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".not_found.txt")

    def lines(self) -> list[str]:
        return [
            *self.notes,
            f"genes in: {self.genes_in} distinct ({len(self.duplicates)} duplicates dropped)",
            *self._alias_lines(),
            self._resolved_line(),
            *self._incomplete_lines(),
            f"isoforms: {self.isoforms}, distinct sequences: {self.distinct_sequences} "
            f"({self.embedded_now} embedded now, {self.cached_rows} from the row cache, "
            f"{self.resumed_rows} resumed from the unfinished run, {self.reused_sequences} "
            f"reused from the existing {self.out.name})",
            f"tokens embedded: {self.tokens}, failed sequences: {len(self.failed)}",
            f"wall: fetch {self.fetch_s:.1f} s, embed {self.embed_s:.1f} s, "
            f"total {self.wall_s:.1f} s; {self.tokens_per_s:.0f} tokens/s",
            *([self.estimate] if self.estimate else []),
            f"wrote {self.out}",
            *self._side_file_lines(),
        ]

    def _resolved_line(self) -> str:
        """"resolved: 8 of 9 genes (5 with a row for every isoform, 1 incomplete, 2 without
        protein: no vector), not found: 1": the parts add up to the whole, and a part
        with no gene is left out."""
        parts = [f"{self.complete} with a row for every isoform"]
        if self.incomplete:
            parts.append(f"{len(self.incomplete)} incomplete")
        if self.no_protein:
            parts.append(f"{len(self.no_protein)} without protein: no vector")
        return (f"resolved: {self.resolved} of {self.genes_in - len(self.aliases)} genes "
                f"({', '.join(parts)}), not found: {len(self.not_found)}")

    def _alias_lines(self) -> list[str]:
        """Spellings of one gene merged into its first spelling (none when there are none)."""
        if not self.aliases:
            return []
        pairs = [f"{alias} -> {key}" for alias, key in self.aliases.items()]
        return [f"same gene, other spelling: {len(pairs)} merged into the first spelling "
                f"({name_some(pairs)}); meta['aliases'] lists them"]

    def _incomplete_lines(self) -> list[str]:
        """The incomplete genes' line (none when every announced sequence came)."""
        if not self.incomplete:
            return []
        line = (f"incomplete: {len(self.incomplete)} genes ({len(self.missing_sequences)} "
                f"sequences missing): {name_some(self.incomplete)}; see "
                f"{unresolved_report_path(self.out).name}")
        if self.canonical_missing:
            line += (f"; canonical isoform missing, first row not canonical: "
                     f"{name_some(self.canonical_missing)}")
        return [line]

    def _side_file_lines(self) -> list[str]:
        """One line per side file written, saying what it holds."""
        what = {unresolved_report_path(self.out).name:
                "every gene without a full vector, with its likely reason",
                self.not_found_path.name: "the genes not found, one per line",
                failed_path(self.out).name: "the sequences that failed to embed, with the error"}
        return [f"wrote {path.name}: {what.get(path.name, 'a side file')}"
                for path in self.side_files]

    def count(self, genes: Sequence[str], chosen: Mapping[str, GeneIsoforms],
              reused: EsmFile | None, stage: StageCounts, *, keys: RowKeys,
              resumable: Collection[str] = ()) -> None:
        """Tally statuses (fresh records first, else what the reused file recorded) and
        where the fresh records' sequences came from. `resumable`: the keys whose rows
        the partial store held before the stage started (the stage embeds none again)."""
        old = reused.meta if reused is not None else {}
        for query in genes:
            gene = chosen.get(query)
            status = gene.status if gene is not None else old.get("status", {}).get(query, "ok")
            if gene is None and reused is not None:
                self.reused_rows += len(reused.rows_of(query))
            self._tally(query, status)
            self._tally_missing(query, gene, old)
        fresh = {keys.of(i.sequence) for g in chosen.values() for i in g.isoforms}
        self.fresh_sequences = len(fresh)
        self.resumed_rows = len(fresh.intersection(resumable))
        self.embedded_now, self.tokens, self.embed_s = stage.embedded, stage.tokens, stage.busy_s
        self.cached_rows = stage.cached
        self.failed = sorted(name for name, _ in stage.failed.values())

    def count_file(self, written: EsmFile, chosen: Collection[str]) -> None:
        """The written file's rows, and the distinct sequences among the rows kept from the
        existing file (genes not in `chosen`). The file keeps no sequences, so these are
        told apart by their rows' bits, leaving out any a fresh gene's row also has."""
        self.isoforms = len(written.protein_ids)
        kept = [i for g in written.genes if g not in chosen for i in written.rows_of(g)]
        if not kept:
            self.reused_sequences = 0
            return
        fresh = [i for g in written.genes if g in chosen for i in written.rows_of(g)]
        self.reused_sequences = len(_row_digests(written.emb, kept)
                                    - _row_digests(written.emb, fresh))

    def _tally(self, query: str, status: str) -> None:
        if status == "ok":
            self.complete += 1
        elif status == "incomplete":
            self.incomplete.append(query)
        elif status == "no_protein":
            self.no_protein.append(query)
        else:
            self.not_found.append(query)

    def _tally_missing(self, query: str, gene: GeneIsoforms | None,
                       old: Mapping[str, Any]) -> None:
        """Missing sequences of a fresh record, else those the reused file's meta lists."""
        if gene is not None:
            missing, canonical = list(gene.missing_protein_ids), gene.canonical_missing
        else:
            missing = list(_per_gene(old, "missing_protein_ids").get(query) or ())
            canonical = query in _per_gene(old, "canonical_missing")
        self.missing_sequences += missing
        if canonical:
            self.canonical_missing.append(query)

    def raise_if_incomplete(self) -> None:
        """--strict: incomplete genes are an Ensembl failure (exit 3). Called after the
        output is written, so the rows that did come are kept for the rerun."""
        if self.incomplete:
            raise EnsemblError(
                f"--strict: {len(self.incomplete)} genes incomplete, "
                f"{len(self.missing_sequences)} protein sequences missing; {self.out} "
                f"holds the rest (see {unresolved_report_path(self.out).name}); {RETRY}",
                queries=self.incomplete)


def _row_digests(emb: torch.Tensor, rows: Sequence[int]) -> set[bytes]:
    """A short digest of each row's bits (identical sequences give identical rows)."""
    if not rows:
        return set()
    block = emb[list(rows)].contiguous().numpy()
    return {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in block}


def failed_path(out: Path) -> Path:
    """esm_all.pt -> esm_all.failed.tsv, next to the output."""
    return out.with_name(out.stem + ".failed.tsv")


def _per_gene(meta: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """meta[key] as a query -> value dict ({} when absent or of another shape)."""
    value = meta.get(key)
    return value if isinstance(value, Mapping) else {}


def write_side_files(out: Path, chosen: Mapping[str, GeneIsoforms], summary: RunSummary,
                     failed: Mapping[str, tuple[str, str]], written: EsmFile, *,
                     species: str) -> None:
    """The not_found list, the unresolved report and the failures next to `out`."""
    status = written.meta.get("status", {})
    unresolved = [chosen.get(q) or _recorded(q, written.meta)
                  for q in written.genes if status.get(q, "ok") != "ok"]
    rows = {q: len(i) for q, i in written.gene_to_isoform_indices.items()}
    report = write_unresolved_report(unresolved_report_path(out), unresolved, species=species,
                                     rows=rows, failed={name for name, _ in failed.values()})
    summary.side_files = [path for path in (
        report,
        write_list(summary.not_found_path, summary.not_found),
        write_list(failed_path(out), sorted(f"{n}\t{error}" for n, error in failed.values())),
    ) if path is not None]


def _recorded(query: str, meta: Mapping[str, Any]) -> GeneIsoforms:
    """A gene reused from an earlier file, rebuilt from what its meta recorded."""
    missing = tuple(str(p) for p in _per_gene(meta, "missing_protein_ids").get(query) or ())
    recorded = _per_gene(meta, "status").get(query)
    status: GeneStatus = ("incomplete" if missing else
                          "no_protein" if recorded == "no_protein" else "not_found")
    canonical = _per_gene(meta, "canonical_missing").get(query)
    gene_id = _per_gene(meta, "gene_ids").get(query)
    symbol = _per_gene(meta, "symbols").get(query)
    return GeneIsoforms(query, gene_id if isinstance(gene_id, str) else None,
                        symbol if isinstance(symbol, str) else None, (),
                        status, missing, canonical if isinstance(canonical, str) else None)


def write_list(path: Path, lines: Iterable[str]) -> Path | None:
    """One item per line, atomically; no items removes a stale file instead (None)."""
    items = list(lines)
    if not items:
        path.unlink(missing_ok=True)
        return None
    atomic_text(path, "\n".join(items) + "\n")
    return path
