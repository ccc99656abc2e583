"""esm2-batch: gene list -> Ensembl isoforms -> ESM2 vectors -> one esm_all.pt."""

from .embed import Embedded, embed_sequences, iter_embeddings
from .ensembl import EnsemblClient, fetch_isoforms
from .errors import (
    EmbeddingError,
    EnsemblError,
    Esm2BatchError,
    InputError,
    ModelError,
    StoreError,
)
from .genes import read_gene_list
from .models import ESM2_MODELS, LoadedModel, load_model
from .records import GeneIsoforms, Isoform

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
