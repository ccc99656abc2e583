"""Open the isoform source a run's options name: an isoforms FASTA, Ensembl's FTP files or
Ensembl REST.

Apart from the protocol (base.py) on purpose: every concrete source imports base.py, and
only this module imports the concrete sources, so the import arrows point one way. Each
source is imported only when chosen (REST needs aiohttp and aiolimiter; the files need
neither).
"""

from __future__ import annotations

from esm2_batch.sources.base import IsoformSource, SourceOptions
from esm2_batch.sources.isoform_sets import narrowed

__all__ = ["open_source"]


def open_source(options: SourceOptions) -> IsoformSource:
    """The source `options` names, loaded and checked now (bad flag values, a missing FASTA
    or FTP file are errors before any work); REST connects when streaming starts. With
    isoforms_set "canonical" its records hold each gene's canonical isoform only."""
    options.check()
    return narrowed(_open(options), options.isoforms_set)


def _open(options: SourceOptions) -> IsoformSource:
    if options.isoforms is not None:
        from esm2_batch.sources.isoforms_fasta import IsoformsFastaSource

        return IsoformsFastaSource.open(options.isoforms)
    if options.ensembl_files is not None or options.ensembl_release is not None:
        from esm2_batch.sources.ensembl_files import EnsemblFilesSource

        return EnsemblFilesSource.open(options)
    from esm2_batch.sources.ensembl_rest.client import EnsemblRestSource

    return EnsemblRestSource(options)
