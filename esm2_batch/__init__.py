"""esm2-batch: gene list -> Ensembl isoforms -> ESM2 vectors -> one esm_all.pt."""

from esm2_batch.embedding.embed import Embedded, embed_sequences, iter_embeddings
from esm2_batch.errors import (
    EmbeddingError,
    EnsemblError,
    Esm2BatchError,
    InputError,
    ModelError,
    StoreError,
)
from esm2_batch.models import ESM2_MODELS, LoadedModel, load_model
from esm2_batch.records import GeneIsoforms, Isoform
from esm2_batch.sources.ensembl_rest import EnsemblClient, fetch_isoforms
from esm2_batch.sources.gene_lists import read_gene_list

__all__ = [
    "ESM2_MODELS",
    "Embedded",
    "EmbeddingError",
    "EnsemblClient",
    "EnsemblError",
    "Esm2BatchError",
    "GeneIsoforms",
    "InputError",
    "Isoform",
    "LoadedModel",
    "ModelError",
    "StoreError",
    "embed_sequences",
    "fetch_isoforms",
    "iter_embeddings",
    "load_model",
    "read_gene_list",
]
__version__ = "0.1.0"
