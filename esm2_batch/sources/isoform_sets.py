"""--isoforms_set canonical: one isoform per gene, the one most downstream models use.

Every isoform costs the same compute, and many models read one vector per gene (the
canonical isoform's). The rule of which isoform that is lives here, once:

    the translation Ensembl marks canonical (MANE Select for human since release 104);
    a gene whose canonical transcript is not of a wanted biotype: its longest protein

REST applies it before asking for sequences (only that translation is requested:
ensembl_rest/client.py); offline files and an isoforms FASTA are read whole and narrowed
by `CanonicalOnly`. A narrowed record says so (`GeneIsoforms.isoforms_set`), so a later
run that wants every isoform knows to fetch the gene again: the canonical set is a subset
of all, never a different answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from esm2_batch.records import (
    GeneIsoforms,
    Isoform,
    IsoformsSet,
    settled_status,
)
from esm2_batch.sources.base import IsoformSource, Provenance

__all__ = ["CanonicalOnly", "canonical_only", "narrowed"]


def canonical_only(gene: GeneIsoforms) -> GeneIsoforms:
    """`gene` with only its canonical isoform (else its first, the longest), marked
    "canonical". A missing canonical sequence keeps the gene incomplete (its first row
    would not be the canonical isoform); other missing isoforms no longer count. Genes
    without a protein are returned as they are (both sets agree on them)."""
    if gene.isoforms_set == "canonical" or gene.status in ("no_protein", "not_found"):
        return gene
    kept: tuple[Isoform, ...] = ()
    gone: tuple[str, ...] = ()
    if gene.canonical_missing:
        gone = (str(gene.canonical_protein_id),)
    else:
        wanted = gene.canonical_protein_id
        first = next((i for i in gene.isoforms if i.protein_id == wanted),
                     gene.isoforms[0] if gene.isoforms else None)  # then the longest
        kept = (first,) if first is not None else ()
        gone = () if first is not None else gene.missing_protein_ids[:1]
    return replace(gene, isoforms=kept, missing_protein_ids=gone,
                   status=settled_status(kept, gone), isoforms_set="canonical")


def narrowed(source: IsoformSource, isoforms_set: IsoformsSet) -> IsoformSource:
    """`source` itself for "all", else a CanonicalOnly view of it."""
    return source if isoforms_set == "all" else CanonicalOnly(source)


class CanonicalOnly:
    """An IsoformSource that yields another's records narrowed to the canonical isoform
    (idempotent: REST already narrowed its records before asking for sequences)."""

    def __init__(self, inner: IsoformSource) -> None:
        self.inner = inner

    async def stream(self, queries: Sequence[str]) -> AsyncIterator[GeneIsoforms]:
        async for gene in self.inner.stream(queries):
            yield canonical_only(gene)

    def provenance(self) -> Provenance:
        return self.inner.provenance()

    def describe(self) -> str | None:
        said = self.inner.describe()
        ours = "isoforms: the canonical one of each gene (--isoforms_set canonical)"
        return f"{said}; {ours}" if said else ours

    def known_queries(self) -> Sequence[str] | None:
        return self.inner.known_queries()

    def all_genes(self) -> Sequence[str] | None:
        return self.inner.all_genes()

    def unreachable(self) -> str | None:
        return self.inner.unreachable()
