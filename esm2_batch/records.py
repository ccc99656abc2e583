"""Frozen records that cross stage boundaries (fetch -> embed -> store).

They are dataclasses rather than dicts so a typo is an AttributeError, not a silent
KeyError three stages later, and they round-trip through plain JSON for the resume cache.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

GeneStatus = Literal["ok", "no_protein", "not_found"]
STATUSES: tuple[GeneStatus, ...] = ("ok", "no_protein", "not_found")

# ENSG00000157764, ENSMUSG00000000001, optionally with a .version suffix.
_GENE_ID = re.compile(r"^ENS[A-Z]{0,6}G\d{11}(?:\.\d+)?$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Isoform:
    """One protein isoform of a gene; IDs carry no version suffix."""

    protein_id: str
    transcript_id: str
    gene_id: str
    sequence: str
    is_canonical: bool
    biotype: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Isoform:
        return cls(
            protein_id=str(data["protein_id"]),
            transcript_id=str(data["transcript_id"]),
            gene_id=str(data["gene_id"]),
            sequence=str(data["sequence"]),
            is_canonical=bool(data["is_canonical"]),
            biotype=str(data["biotype"]),
        )


@dataclass(frozen=True, slots=True)
class GeneIsoforms:
    """Everything known about one query: canonical isoform first, then longest first.

    `query` is the gene exactly as the user wrote it and is the key of the output file.
    `missing_protein_ids` lists translations Ensembl announced but returned no sequence
    for even after a second request, so a gap is recorded rather than silent.
    """

    query: str
    gene_id: str | None
    symbol: str | None
    isoforms: tuple[Isoform, ...]
    status: GeneStatus
    missing_protein_ids: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        if (self.status == "ok") != bool(self.isoforms):
            raise ValueError(f"{self.query}: status {self.status!r} with "
                             f"{len(self.isoforms)} isoforms")

    @property
    def canonical(self) -> Isoform | None:
        """The canonical isoform, or None when the gene has none with a sequence."""
        first = self.isoforms[0] if self.isoforms else None
        return first if first is not None and first.is_canonical else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the resume cache stores one per line)."""
        data = asdict(self)
        data["isoforms"] = [asdict(iso) for iso in self.isoforms]
        data["missing_protein_ids"] = list(self.missing_protein_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneIsoforms:
        return cls(
            query=str(data["query"]),
            gene_id=data.get("gene_id"),
            symbol=data.get("symbol"),
            isoforms=tuple(Isoform.from_dict(d) for d in data.get("isoforms", ())),
            status=data["status"],
            missing_protein_ids=tuple(data.get("missing_protein_ids", ())),
        )


def isoform_sort_key(isoform: Isoform) -> tuple[bool, int, str]:
    """Canonical first, then longest first, then by protein ID: deterministic order."""
    return (not isoform.is_canonical, -len(isoform.sequence), isoform.protein_id)


def is_ensembl_gene_id(query: str) -> bool:
    """True for an Ensembl gene stable ID (any species prefix), versioned or not."""
    return bool(_GENE_ID.match(query))


def strip_version(stable_id: str) -> str:
    """ENSG00000157764.13 -> ENSG00000157764 (a versioned ID only resolves if current)."""
    head, _, tail = stable_id.partition(".")
    return head if tail.isdigit() else stable_id


def query_key(query: str) -> str:
    """The identity used for deduplication: IDs without version, upper case."""
    return strip_version(query).upper() if is_ensembl_gene_id(query) else query
