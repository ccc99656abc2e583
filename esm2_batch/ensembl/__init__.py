"""Ensembl REST: the isoform client (client.py), its transport (transport.py) and the
pure reply parsing (parse.py)."""

from .client import (
    DEFAULT_BASE_URL,
    DEFAULT_BIOTYPES,
    EnsemblClient,
    fetch_isoforms,
    resolve_base_url,
)
from .transport import JsonTransport, PauseGate, RetryPolicy

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
