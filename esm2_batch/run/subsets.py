"""What an earlier run's work is worth to this one when their --isoforms_set differ.

The canonical set is a subset of all (sources/isoform_sets.py), and rows are keyed by
sequence, never by the set, so neither the partial store nor an existing esm_all.pt is
refused for it; they are read as what they hold:

    this run   earlier work holds       use
    canonical  every isoform            each gene's canonical row only (first row)
    all        the canonical one only   nothing of those genes' records: fetch them
                                        again; their canonical rows still come from the
                                        row cache or the partial store, by sequence
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from esm2_batch.records import GeneIsoforms, IsoformsSet
from esm2_batch.sources.isoform_sets import canonical_only
from esm2_batch.store.esm_file import EsmFile

__all__ = ["file_set", "records_for", "reusable_for"]


def file_set(esm: EsmFile) -> IsoformsSet:
    """The set an esm_all.pt's rows are (files written before the flag: all)."""
    return "canonical" if esm.meta.get("isoforms_set") == "canonical" else "all"


def records_for(records: Mapping[str, GeneIsoforms], isoforms_set: IsoformsSet
                ) -> dict[str, GeneIsoforms]:
    """An unfinished run's fetched genes as this run's set sees them: narrowed to the
    canonical isoform, or (all) without the genes fetched canonical-only."""
    if isoforms_set == "canonical":
        return {q: canonical_only(g) for q, g in records.items()}
    return {q: g for q, g in records.items() if g.isoforms_set == "all"}


def reusable_for(reused: EsmFile | None, isoforms_set: IsoformsSet) -> EsmFile | None:
    """An existing esm_all.pt as this run's set sees it: each gene's first row (its
    canonical isoform) for canonical; for all, a canonical file without its genes that
    have rows (they are fetched again; their rows were one isoform of several)."""
    if reused is None or isoforms_set == file_set(reused):
        return reused
    index = reused.gene_to_isoform_indices
    if isoforms_set == "canonical":
        kept = {g: rows[:1] for g, rows in index.items()}
    else:
        kept = {g: rows for g, rows in index.items() if not rows}
    return replace(reused, gene_to_isoform_indices=kept)
