"""Where isoforms come from: one protocol, three sources.

    IsoformSource.stream(queries) ──► GeneIsoforms per query, as each completes
        EnsemblRestSource   Ensembl REST (async, rate-limited; sources/ensembl_rest/)
        EnsemblFilesSource  Ensembl's FTP files, offline (sources/ensembl_files.py)
        IsoformsFastaSource a FASTA written by --save_isoforms (sources/isoforms_fasta.py)

Every source yields exactly one GeneIsoforms per distinct query (status "not_found" when
it does not know it), canonical isoform first, and says where its records came from in
`provenance()` (recorded in esm_all.pt's meta). `open_source` picks one from
SourceOptions, so an orchestrator never asks which it holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from esm2_batch.records import GeneIsoforms

__all__ = ["IsoformSource", "Provenance", "SourceOptions", "open_source"]

Provenance = dict[str, str | int]
"""isoform_source, and where they apply ensembl_url and ensembl_release."""


@dataclass(frozen=True)
class SourceOptions:
    """Where isoforms come from and which count (the CLI's flags of the same names).

    isoforms: a FASTA as --save_isoforms writes it (skips Ensembl).
    ensembl_files / ensembl_release: Ensembl's FTP files, offline.
    Otherwise Ensembl REST at ensembl_url ($ENSEMBL_REST_URL, else rest.ensembl.org),
    at most rate_limit requests per second and parallel_workers in flight.
    """

    species: str = "homo_sapiens"
    biotypes: tuple[str, ...] = ("protein_coding",)
    ensembl_url: str | None = None
    rate_limit: float = 10.0
    parallel_workers: int = 10
    isoforms: Path | None = None
    ensembl_files: Path | None = None
    ensembl_release: int | None = None


class IsoformSource(Protocol):
    """What the orchestrator asks of a source of isoforms."""

    def stream(self, queries: Sequence[str]) -> AsyncIterator[GeneIsoforms]:
        """One GeneIsoforms per distinct query, in completion order."""

    def provenance(self) -> Provenance:
        """Where the records came from, for the output's meta."""

    def describe(self) -> str | None:
        """One line for the run summary, or None when there is nothing to say."""

    def known_queries(self) -> Sequence[str] | None:
        """The genes the source itself lists (an isoforms FASTA), else None."""


def open_source(options: SourceOptions) -> IsoformSource:
    """The source `options` names, loaded and checked now (a missing FASTA or FTP file is
    an error before any work); REST connects when streaming starts."""
    if options.isoforms is not None:
        from esm2_batch.sources.isoforms_fasta import IsoformsFastaSource

        return IsoformsFastaSource.open(options.isoforms)
    if options.ensembl_files is not None or options.ensembl_release is not None:
        from esm2_batch.sources.ensembl_files import EnsemblFilesSource

        return EnsemblFilesSource.open(options)
    from esm2_batch.sources.ensembl_rest.client import EnsemblRestSource

    return EnsemblRestSource(options)
