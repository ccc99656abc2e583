"""Ensembl REST: the isoform client (client.py), its transport (transport.py) and the
pure reply parsing (parse.py)."""

from esm2_batch.sources.ensembl_rest.client import (
    DEFAULT_BASE_URL,
    DEFAULT_BIOTYPES,
    EnsemblClient,
    fetch_isoforms,
    resolve_base_url,
)
from esm2_batch.sources.ensembl_rest.transport import JsonTransport, PauseGate, RetryPolicy

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_BIOTYPES",
    "EnsemblClient",
    "JsonTransport",
    "PauseGate",
    "RetryPolicy",
    "fetch_isoforms",
    "resolve_base_url",
]
