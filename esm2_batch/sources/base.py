"""Where isoforms come from: one protocol, three sources.

    IsoformSource.stream(queries) ──► GeneIsoforms per query, as each completes
        EnsemblRestSource   Ensembl REST (async, rate-limited; sources/ensembl_rest/)
        EnsemblFilesSource  Ensembl's FTP files, offline (sources/ensembl_files.py)
        IsoformsFastaSource a FASTA written by --save_isoforms (sources/isoforms_fasta.py)

Every source yields exactly one GeneIsoforms per distinct query (status "not_found" when
it does not know it), canonical isoform first, and says where its records came from in
`provenance()` (recorded in esm_all.pt's meta). `sources.factory.open_source` picks one
from SourceOptions, so an orchestrator never asks which it holds; it lives apart from this
protocol so that the concrete sources import this module and nothing imports back.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from esm2_batch.errors import InputError
from esm2_batch.records import ISOFORMS_SETS, GeneIsoforms, IsoformsSet

__all__ = ["IsoformSource", "Provenance", "SourceOptions", "check_url"]

Provenance = dict[str, str | int]
"""isoform_source, and where they apply ensembl_url and ensembl_release."""


@dataclass(frozen=True)
class SourceOptions:
    """Where isoforms come from and which count (the CLI's flags of the same names).

    isoforms: a FASTA as --save_isoforms writes it (skips Ensembl).
    ensembl_files / ensembl_release: Ensembl's FTP files, offline.
    synonyms: look symbols the source does not know up as previous names and aliases
    (REST: xrefs/symbol; offline: the table synonyms_file, HGNC's complete set).
    Otherwise Ensembl REST at ensembl_url ($ENSEMBL_REST_URL, else rest.ensembl.org),
    at most rate_limit requests per second and parallel_workers in flight.
    isoforms_set: "all" isoforms of the wanted biotypes, or only each gene's "canonical"
    one (sources/isoform_sets.py; REST then asks for that translation only).
    """

    species: str = "homo_sapiens"
    biotypes: tuple[str, ...] = ("protein_coding",)
    ensembl_url: str | None = None
    rate_limit: float = 10.0
    parallel_workers: int = 10
    isoforms: Path | None = None
    ensembl_files: Path | None = None
    ensembl_release: int | None = None
    synonyms: bool = True
    synonyms_file: Path | None = None
    isoforms_set: IsoformsSet = "all"

    @property
    def offline(self) -> bool:
        """Whether isoforms come from local files (a FASTA or Ensembl's files), not REST:
        then a gene is cheap to read again, so a run may record genes in batches."""
        return (self.isoforms is not None or self.ensembl_files is not None
                or self.ensembl_release is not None)

    def check(self) -> None:
        """One-line InputError for values that would hang (nan), divide by zero (inf, 0),
        or be retried for minutes (a URL that is not http(s)), before any work starts."""
        rate = self.rate_limit
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not (
                math.isfinite(rate) and rate > 0):
            raise InputError(f"--rate_limit {rate!r}: give requests per second as a positive "
                             "finite number (Ensembl allows about 15)")
        workers = self.parallel_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"--parallel_workers {workers!r}: give a whole number of "
                             "requests in flight, 1 or more")
        url = self.ensembl_url or os.environ.get("ENSEMBL_REST_URL")
        if url and self.isoforms is None and self.ensembl_files is None:
            check_url(url)
        if self.ensembl_release is not None and self.ensembl_release < 1:
            raise InputError(f"--ensembl_release {self.ensembl_release}: give a release "
                             "number such as 112")
        if self.synonyms_file is not None and not self.synonyms_file.is_file():
            raise InputError(f"--synonyms {self.synonyms_file}: no such file; give HGNC's "
                             "hgnc_complete_set.txt (esm2-batch download fetches it)")
        if self.isoforms_set not in ISOFORMS_SETS:
            raise InputError(f"--isoforms_set {self.isoforms_set!r}: use one of "
                             f"{', '.join(ISOFORMS_SETS)} (canonical: one isoform per gene)")
        if not self.biotypes:
            raise InputError("--biotypes: give at least one biotype, e.g. protein_coding")


def check_url(url: str) -> None:
    """An http(s) URL with a host, or a one-line InputError naming it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"--ensembl_url (or $ENSEMBL_REST_URL) {url!r}: not an http(s) URL; "
                         "give one like https://rest.ensembl.org or a mirror's address")


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

    def all_genes(self) -> Sequence[str] | None:
        """Every gene the source can list that has a protein of a wanted biotype, in a
        stable order (so a rerun of --all_genes resumes the same list); None when it
        cannot list them (REST: no cheap way to enumerate a proteome)."""

    def unreachable(self) -> str | None:
        """Why the source cannot be used right now (a server that does not answer), else
        None; asked when another problem stops the run, so both are reported at once."""
