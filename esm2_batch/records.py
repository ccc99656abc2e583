"""Frozen records that cross stage boundaries (fetch -> embed -> store).

They are dataclasses rather than dicts so a typo is an AttributeError, not a silent
KeyError three stages later, and they round-trip through plain JSON for the resume cache.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# ok          every announced translation has a sequence (isoforms non-empty)
# incomplete  Ensembl announced translations whose sequences never came (missing_protein_ids
#             non-empty); the isoforms that did come are kept, possibly none
# no_protein  the gene exists but has no translation of the requested biotypes
# not_found   no source knows the query
GeneStatus = Literal["ok", "incomplete", "no_protein", "not_found"]
STATUSES: tuple[GeneStatus, ...] = ("ok", "incomplete", "no_protein", "not_found")
# How a query found its gene: its Ensembl ID, its (current) symbol, or a previous name or
# alias of the gene (HGNC/MGI synonyms); None when it found none.
MatchedBy = Literal["id", "symbol", "synonym"]
# Which of a gene's isoforms a record holds: every one of the wanted biotypes, or only the
# canonical one (--isoforms_set canonical; sources/isoform_sets.py narrows a record).
IsoformsSet = Literal["all", "canonical"]
ISOFORMS_SETS: tuple[IsoformsSet, ...] = ("all", "canonical")

# ENSG00000157764, ENSMUSG00000000001, optionally with a .version suffix.
_GENE_ID = re.compile(r"^ENS[A-Z]{0,6}G\d{11}(?:\.\d+)?$", re.IGNORECASE)
# A gene name a spreadsheet turned into a date: SEPT7 -> 7-Sep, MARCH1 -> 1-Mar.
SPREADSHEET_DATE = re.compile(r"^\d{1,2}-(Mar|Sep|Dec|Apr|Oct|Nov|Feb)$|^(Mar|Sep|Dec)-\d{1,2}$",
                              re.IGNORECASE)
# hg19-era clone names (RP11-34P13.3, CTD-2510F5.4, XXbac-B461K10.4) and accession-based
# names of novel genes (AC012345.1, AL627309.5): never an HGNC or MGI symbol.
CLONE_NAME = re.compile(r"^(RP\d{1,2}|CT[ABCD]|XX(bac|yac|cos)|KB|LA16c|WI2|GS1)-[\w.]+$",
                        re.IGNORECASE)
ACCESSION_NAME = re.compile(r"^(A[CFLP]|B[X]|C[RU]|FP|Z|U|Y)\d{5,6}\.\d+$", re.IGNORECASE)


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
    `matched_by` says how it found `gene_id`: "id", "symbol" or "synonym" (a previous
    name or alias, e.g. SEPT5 for SEPTIN5; `symbol` is then the current one). A symbol
    whose synonyms name several current genes stays not_found with those genes in
    `candidates` ((gene_id, symbol) pairs, never guessed); one whose gene is already
    asked for under another query of the list is not_found with `duplicate_of` naming
    that query (kept once, like any duplicate).
    `isoforms_set` is "canonical" when the record holds only the gene's canonical isoform
    (a subset of "all": a later run that wants every isoform fetches the gene again).
    `missing_protein_ids` lists translations Ensembl announced but returned no sequence
    for even after a second request, so a gap is recorded rather than silent; such a gene
    is "incomplete". `canonical_protein_id` is the translation Ensembl calls canonical
    (None when unknown), so a record can say its first isoform is not the canonical one.
    """

    query: str
    gene_id: str | None
    symbol: str | None
    isoforms: tuple[Isoform, ...]
    status: GeneStatus
    missing_protein_ids: tuple[str, ...] = field(default=())
    canonical_protein_id: str | None = None
    matched_by: MatchedBy | None = None
    candidates: tuple[tuple[str, str], ...] = field(default=())
    duplicate_of: str | None = None
    isoforms_set: IsoformsSet = "all"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        # ok: isoforms and nothing missing; incomplete: something missing; no_protein
        # and not_found: neither isoforms nor missing ids
        expected = settled_status(self.isoforms, self.missing_protein_ids)
        allowed = ("no_protein", "not_found") if expected == "no_protein" else (expected,)
        if self.status not in allowed:
            raise ValueError(f"{self.query}: status {self.status!r} with "
                             f"{len(self.isoforms)} isoforms and "
                             f"{len(self.missing_protein_ids)} missing sequences")

    @property
    def canonical(self) -> Isoform | None:
        """The canonical isoform, or None when the gene has none with a sequence."""
        first = self.isoforms[0] if self.isoforms else None
        return first if first is not None and first.is_canonical else None

    @property
    def canonical_missing(self) -> bool:
        """True when the canonical translation is among the missing ones: the gene's
        first row is then NOT its canonical isoform."""
        return (self.canonical_protein_id is not None
                and self.canonical_protein_id in self.missing_protein_ids)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the resume cache stores one per line)."""
        data = asdict(self)
        data["isoforms"] = [asdict(iso) for iso in self.isoforms]
        data["missing_protein_ids"] = list(self.missing_protein_ids)
        data["candidates"] = [list(pair) for pair in self.candidates]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneIsoforms:
        """Read to_dict's output; records written before "incomplete" existed (status ok
        or no_protein with missing ids, no canonical_protein_id) get today's status, and
        records written before synonyms (no matched_by) are matched by ID or symbol."""
        isoforms = tuple(Isoform.from_dict(d) for d in data.get("isoforms", ()))
        missing = tuple(data.get("missing_protein_ids", ()))
        status = data["status"]
        if missing and status in ("ok", "no_protein"):
            status = settled_status(isoforms, missing)
        return cls(
            query=str(data["query"]),
            gene_id=data.get("gene_id"),
            symbol=data.get("symbol"),
            isoforms=isoforms,
            status=status,
            missing_protein_ids=missing,
            canonical_protein_id=data.get("canonical_protein_id"),
            matched_by=data.get("matched_by", _matched_before_synonyms(data)),
            candidates=tuple((str(g), str(s)) for g, s in data.get("candidates") or ()),
            duplicate_of=data.get("duplicate_of"),
            isoforms_set="canonical" if data.get("isoforms_set") == "canonical" else "all",
        )


def _matched_before_synonyms(data: dict[str, Any]) -> MatchedBy | None:
    """How a record written before `matched_by` existed was matched: by ID or symbol."""
    if data.get("gene_id") is None:
        return None
    return "id" if is_ensembl_gene_id(str(data["query"])) else "symbol"


def settled_status(isoforms: tuple[Isoform, ...], missing: tuple[str, ...]) -> GeneStatus:
    """The status of a gene whose translations were announced: "incomplete" when any
    sequence is missing, else "ok" with isoforms, else "no_protein"."""
    if missing:
        return "incomplete"
    return "ok" if isoforms else "no_protein"


def isoform_sort_key(isoform: Isoform) -> tuple[bool, int, str]:
    """Canonical first, then longest first, then by protein ID: deterministic order."""
    return (not isoform.is_canonical, -len(isoform.sequence), isoform.protein_id)


def is_ensembl_gene_id(query: str) -> bool:
    """True for an Ensembl gene stable ID (any species prefix), versioned or not."""
    return bool(_GENE_ID.match(query))


def is_spreadsheet_date(query: str) -> bool:
    """True for a gene name a spreadsheet turned into a date (7-Sep, 1-Mar, Sep-7)."""
    return bool(SPREADSHEET_DATE.match(query.strip()))


def is_clone_name(query: str) -> bool:
    """True for a clone-based (RP11-34P13.3) or accession-based (AC012345.1) gene name."""
    query = query.strip()
    return bool(CLONE_NAME.match(query) or ACCESSION_NAME.match(query))


def strip_version(stable_id: str) -> str:
    """ENSG00000157764.13 -> ENSG00000157764 (a versioned ID only resolves if current)."""
    head, _, tail = stable_id.partition(".")
    return head if tail.isdigit() else stable_id


def query_key(query: str) -> str:
    """The identity used for deduplication: IDs without version, upper case."""
    return strip_version(query).upper() if is_ensembl_gene_id(query) else query
