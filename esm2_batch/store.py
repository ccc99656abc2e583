"""The esm_all.pt file: its reader (this module grows the resumable writer).

Contract (DESIGN.md): a dict with `emb` (float16 [n_rows, dim]), `genes` (queries in
input order), `protein_ids` (one per row), `gene_to_isoform_indices` (every gene; [] when
it has no protein) and `meta`. Only plain types, so it loads with weights_only=True.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import StoreError

REQUIRED_KEYS = ("emb", "genes", "protein_ids", "gene_to_isoform_indices")


@dataclass(frozen=True)
class EsmFile:
    """An esm_all.pt held in memory, checked against the contract."""

    emb: torch.Tensor
    genes: list[str]
    protein_ids: list[str]
    gene_to_isoform_indices: dict[str, list[int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def rows_of(self, gene: str) -> list[int]:
        """The row indices of a gene, canonical first ([] when it has no protein)."""
        return self.gene_to_isoform_indices.get(gene, [])


def read_esm_file(path: str | Path) -> EsmFile:
    """Load and validate an esm_all.pt safely (weights_only=True: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such embedding file; run esm2-batch to create it")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise StoreError(f"{path}: not a readable esm_all.pt ({exc})") from exc
    return validate(data, source=str(path))


def validate(data: object, *, source: str = "esm_all.pt") -> EsmFile:
    """Check the contract's keys, types and index ranges; raise StoreError if broken."""
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        raise StoreError(f"{source}: not an esm_all.pt (needs keys {list(REQUIRED_KEYS)})")
    emb, protein_ids = data["emb"], list(data["protein_ids"])
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise StoreError(f"{source}: 'emb' must be a 2-D tensor")
    if emb.shape[0] != len(protein_ids):
        raise StoreError(f"{source}: {emb.shape[0]} rows but {len(protein_ids)} protein ids")
    index = {str(g): [int(i) for i in rows]
             for g, rows in data["gene_to_isoform_indices"].items()}
    bad = [g for g, rows in index.items() if any(not 0 <= i < emb.shape[0] for i in rows)]
    if bad:
        raise StoreError(f"{source}: row indices out of range for {bad[:5]}")
    return EsmFile(emb=emb, genes=[str(g) for g in data["genes"]], protein_ids=protein_ids,
                   gene_to_isoform_indices=index, meta=dict(data.get("meta", {})))
