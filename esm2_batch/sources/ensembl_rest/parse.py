"""Pure parsing of Ensembl REST replies into the project's records.

Kept apart from I/O so every rule (which transcripts count, canonical order, how a
sequence reply is joined) is testable on the real fixtures without a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from esm2_batch.errors import EnsemblResponseError
from esm2_batch.records import (
    GeneIsoforms,
    Isoform,
    MatchedBy,
    is_ensembl_gene_id,
    isoform_sort_key,
    settled_status,
    strip_version,
)


@dataclass(frozen=True, slots=True)
class Translation:
    """A translated transcript announced by lookup (its sequence comes later)."""

    protein_id: str
    transcript_id: str
    is_canonical: bool
    biotype: str
    length: int


@dataclass(frozen=True, slots=True)
class GeneRecord:
    """A gene as lookup/id or lookup/symbol with expand=1 describes it; `region` is its
    seq_region_name (a CHR_* region is a patch or haplotype, not the primary assembly)."""

    gene_id: str
    symbol: str | None
    translations: tuple[Translation, ...]
    region: str | None = None


def parse_gene(record: Any, *, biotypes: Iterable[str]) -> GeneRecord | None:
    """A lookup reply's value -> GeneRecord, or None when it is null or not a gene.

    Only transcripts whose biotype is wanted and that carry a Translation count: NMD
    transcripts also have one, and "all isoforms" means protein_coding unless asked.
    """
    if not isinstance(record, Mapping) or record.get("object_type", "Gene") != "Gene":
        return None
    if not isinstance(record.get("id"), str):
        return None
    wanted = set(biotypes)
    translations = tuple(
        t for t in (_translation(tx) for tx in record.get("Transcript") or ())
        if t is not None and t.biotype in wanted
    )
    region = record.get("seq_region_name")
    return GeneRecord(strip_version(record["id"]), record.get("display_name"), translations,
                      str(region) if region is not None else None)


def parse_xrefs(reply: Any, *, path: str = "/xrefs/symbol") -> list[str]:
    """GET xrefs/symbol reply -> the Ensembl gene IDs it names, in order, once each.

    The reply is a list of {"type": "gene" | "transcript" | ..., "id": ...}; LRG_ records
    (Locus Reference Genomic) are typed "gene" too but are not Ensembl genes.
    """
    if not isinstance(reply, list):
        raise EnsemblResponseError(f"{path}: expected a JSON list, got {type(reply).__name__}")
    ids = [strip_version(str(item.get("id", ""))) for item in reply
           if isinstance(item, Mapping) and item.get("type") == "gene"]
    return list(dict.fromkeys(i for i in ids if is_ensembl_gene_id(i)))


def _translation(transcript: Any) -> Translation | None:
    if not isinstance(transcript, Mapping):
        return None
    tl = transcript.get("Translation")
    if not isinstance(tl, Mapping) or not isinstance(tl.get("id"), str):
        return None
    return Translation(
        protein_id=strip_version(tl["id"]),
        transcript_id=strip_version(str(transcript.get("id", ""))),
        is_canonical=bool(transcript.get("is_canonical")),
        biotype=str(transcript.get("biotype", "")),
        length=int(tl.get("length") or 0),
    )


def index_sequences(reply: Any, *, path: str = "/sequence/id") -> dict[tuple[str, str], str]:
    """sequence/id reply -> {(query, protein_id): seq}.

    Ensembl drops failed ids silently and a gene query returns several items, so the
    join must use both the query and the item's own id, never list positions.
    """
    if not isinstance(reply, list):
        raise EnsemblResponseError(f"{path}: expected a JSON list, got {type(reply).__name__}")
    index: dict[tuple[str, str], str] = {}
    for item in reply:
        if not isinstance(item, Mapping) or not isinstance(item.get("seq"), str):
            raise EnsemblResponseError(f"{path}: an item without 'seq': {str(item)[:80]}")
        query = strip_version(str(item.get("query", "")))
        protein_id = strip_version(str(item.get("id", "")))
        index[(query.upper(), protein_id)] = item["seq"].strip().rstrip("*")
    return index


def build_gene(query: str, gene: GeneRecord, sequences: Mapping[str, str], *,
               matched_by: MatchedBy | None = None) -> GeneIsoforms:
    """Join a gene's translations with their sequences, canonical first.

    Translations whose sequence never arrived are recorded in missing_protein_ids and
    make the gene "incomplete" (even with no isoform left: Ensembl did announce a
    protein, so "no_protein" would call a coding gene non-coding).
    """
    isoforms = []
    missing = []
    for t in gene.translations:
        seq = sequences.get(t.protein_id)
        if not seq:
            missing.append(t.protein_id)
            continue
        isoforms.append(Isoform(t.protein_id, t.transcript_id, gene.gene_id, seq,
                                t.is_canonical, t.biotype))
    isoforms.sort(key=isoform_sort_key)
    missing_ids = tuple(sorted(missing))
    return GeneIsoforms(query, gene.gene_id, gene.symbol, tuple(isoforms),
                        settled_status(tuple(isoforms), missing_ids), missing_ids,
                        canonical_protein_id(gene), _matched(query, matched_by))


def canonical_protein_id(gene: GeneRecord) -> str | None:
    """The protein of the transcript lookup marks is_canonical (among wanted biotypes)."""
    return next((t.protein_id for t in gene.translations if t.is_canonical), None)


def canonical_record(gene: GeneRecord) -> GeneRecord:
    """The gene with only the translation --isoforms_set canonical embeds: the canonical
    one, else (a canonical transcript of an unwanted biotype) the longest, as
    sources/isoform_sets.canonical_only picks from fetched isoforms."""
    if not gene.translations:
        return gene
    chosen = min(gene.translations,
                 key=lambda t: (not t.is_canonical, -t.length, t.protein_id))
    return replace(gene, translations=(chosen,))


def not_found(query: str) -> GeneIsoforms:
    return GeneIsoforms(query, None, None, (), "not_found")


def no_protein(query: str, gene: GeneRecord, *,
               matched_by: MatchedBy | None = None) -> GeneIsoforms:
    return GeneIsoforms(query, gene.gene_id, gene.symbol, (), "no_protein",
                        matched_by=_matched(query, matched_by))


def ambiguous(query: str, candidates: Iterable[tuple[str, str | None]]) -> GeneIsoforms:
    """A synonym naming several current genes: not found, with the candidates."""
    return GeneIsoforms(query, None, None, (), "not_found",
                        candidates=tuple((g, s or "") for g, s in candidates))


def duplicate(query: str, gene: GeneRecord, of: str) -> GeneIsoforms:
    """A synonym of a gene the list already asks for as `of`: kept once, under `of`. The
    gene is named in `candidates`, not gene_id, so the duplicate never stands in for it."""
    return GeneIsoforms(query, None, None, (), "not_found", matched_by="synonym",
                        candidates=((gene.gene_id, gene.symbol or ""),), duplicate_of=of)


def _matched(query: str, matched_by: MatchedBy | None) -> MatchedBy:
    return matched_by or ("id" if is_ensembl_gene_id(query) else "symbol")
