"""esm2-batch: gene list -> Ensembl isoforms -> ESM2 vectors -> one esm_all.pt.

The package is laid out as its data flows (DESIGN.md), one folder per stage:

    sources/    where genes and isoforms come from: gene lists (txt/csv/tsv/h5ad), Ensembl
                REST (ensembl_rest/), Ensembl's FTP files, an isoforms FASTA; all behind
                the IsoformSource protocol (sources/base.py)
    models/     encoders: checkpoint -> hidden states (fair-esm, fast ESM2, HF, ESM C)
    embedding/  sequences -> rows: EmbedOptions, token-budget batching, pooling, checks
    store/      what lands on disk: the atomic writer, esm_all.pt, the resumable store
    outputs/    what other tools read: SATURN/npz/parquet exports, the .h5ad copy
    run/        orchestration: gene mode, FASTA mode, the embedding stages, reports
    nn.py       AugmentedGeneEmbedding: esm_all.pt inside a model
    cli.py      the esm2-batch command

Imports follow the data flow (cli -> run -> sources/embedding/store/outputs -> models,
records, errors). The names below are imported on first use, so that fetching genes
(aiohttp) never imports torch, and `esm2-batch --help` imports neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from esm2_batch.version import package_version

if TYPE_CHECKING:
    from esm2_batch.embedding.embed import Embedded, embed_sequences, iter_embeddings
    from esm2_batch.embedding.options import EmbedOptions
    from esm2_batch.errors import (
        EmbeddingError,
        EnsemblError,
        Esm2BatchError,
        InputError,
        ModelError,
        StoreError,
    )
    from esm2_batch.models import ESM2_MODELS, LoadedModel, load_model
    from esm2_batch.nn import AugmentedGeneEmbedding, GeneEmbeddingConfig, load_esm_matrix
    from esm2_batch.records import GeneIsoforms, Isoform
    from esm2_batch.sources.ensembl_rest.client import EnsemblClient, fetch_isoforms
    from esm2_batch.sources.gene_lists import read_gene_list
    from esm2_batch.store.esm_file import EsmFile, GeneVectors, gene_vectors, read_esm_file
    from esm2_batch.store.residues import ResidueStore, open_residues

_WHERE = {
    "Embedded": "esm2_batch.embedding.embed",
    "embed_sequences": "esm2_batch.embedding.embed",
    "iter_embeddings": "esm2_batch.embedding.embed",
    "EmbedOptions": "esm2_batch.embedding.options",
    "EmbeddingError": "esm2_batch.errors",
    "EnsemblError": "esm2_batch.errors",
    "Esm2BatchError": "esm2_batch.errors",
    "InputError": "esm2_batch.errors",
    "ModelError": "esm2_batch.errors",
    "StoreError": "esm2_batch.errors",
    "ESM2_MODELS": "esm2_batch.models",
    "LoadedModel": "esm2_batch.models",
    "load_model": "esm2_batch.models",
    "GeneIsoforms": "esm2_batch.records",
    "Isoform": "esm2_batch.records",
    "EnsemblClient": "esm2_batch.sources.ensembl_rest.client",
    "fetch_isoforms": "esm2_batch.sources.ensembl_rest.client",
    "read_gene_list": "esm2_batch.sources.gene_lists",
    # the readers: esm_all.pt (and its gene vectors), the per_tok residue store, the model
    "EsmFile": "esm2_batch.store.esm_file",
    "GeneVectors": "esm2_batch.store.esm_file",
    "gene_vectors": "esm2_batch.store.esm_file",
    "read_esm_file": "esm2_batch.store.esm_file",
    "ResidueStore": "esm2_batch.store.residues",
    "open_residues": "esm2_batch.store.residues",
    "AugmentedGeneEmbedding": "esm2_batch.nn",
    "GeneEmbeddingConfig": "esm2_batch.nn",
    "load_esm_matrix": "esm2_batch.nn",
}

__all__ = [
    "ESM2_MODELS",
    "AugmentedGeneEmbedding",
    "EmbedOptions",
    "Embedded",
    "EmbeddingError",
    "EnsemblClient",
    "EnsemblError",
    "Esm2BatchError",
    "EsmFile",
    "GeneEmbeddingConfig",
    "GeneIsoforms",
    "GeneVectors",
    "InputError",
    "Isoform",
    "LoadedModel",
    "ModelError",
    "ResidueStore",
    "StoreError",
    "__version__",
    "embed_sequences",
    "fetch_isoforms",
    "gene_vectors",
    "iter_embeddings",
    "load_esm_matrix",
    "load_model",
    "open_residues",
    "read_esm_file",
    "read_gene_list",
]

__version__ = package_version()


def __getattr__(name: str) -> object:
    """Import a public name from its module on first use (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'esm2_batch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
