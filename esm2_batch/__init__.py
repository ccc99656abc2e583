"""esm2-batch: gene list -> Ensembl isoforms -> ESM2 vectors -> one esm_all.pt."""

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
from .records import GeneIsoforms, Isoform

__all__ = [
    "EmbeddingError",
    "EnsemblClient",
    "EnsemblError",
    "Esm2BatchError",
    "GeneIsoforms",
    "InputError",
    "Isoform",
    "ModelError",
    "StoreError",
    "fetch_isoforms",
    "read_gene_list",
]
__version__ = "0.1.0"
