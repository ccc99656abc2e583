"""One rule for every caller (issue 25, also found): queries that name one Ensembl gene in
other spellings (PPBP and ppbp, a symbol and its own ENSG) are one gene in fetch_isoforms
too, as in the CLI's esm_all.pt: the first spelling keeps the gene, each later one is a
duplicate of it."""

from __future__ import annotations

from esm2_batch import fetch_isoforms
from esm2_batch.sources.gene_lists import merge_spellings
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes


def test_later_spellings_of_one_gene_are_duplicates_of_the_first() -> None:
    queries = ["BRAF", "GENE0001", "braf", "ENSG00000157764.13", "ENSG00900000001", "NOPE"]
    with FakeEnsembl([braf(), *synthetic_genes(2)]).running_in_thread() as url:
        genes = fetch_isoforms(queries, base_url=url, rate_limit=1000)
    assert [g.query for g in genes] == queries
    by_query = {g.query: g for g in genes}
    assert by_query["BRAF"].status == "ok" and by_query["BRAF"].duplicate_of is None
    for later, first, gene_id, symbol in [("braf", "BRAF", "ENSG00000157764", "BRAF"),
                                          ("ENSG00000157764.13", "BRAF", "ENSG00000157764",
                                           "BRAF"),
                                          ("ENSG00900000001", "GENE0001", "ENSG00900000001",
                                           "GENE0001")]:
        gene = by_query[later]
        assert gene.duplicate_of == first, later
        # as a synonym's duplicate: kept once, under the first spelling; the gene is named
        # in candidates and never stands in for the first spelling's rows
        assert gene.status == "not_found" and gene.gene_id is None and not gene.isoforms
        assert gene.candidates == ((gene_id, symbol),)
    assert by_query["NOPE"].duplicate_of is None  # not found is never merged
    # the CLI's rule, on the same records: the same spellings are aliases
    _, aliases = merge_spellings(queries, lambda q: {
        "BRAF": "ENSG00000157764", "braf": "ENSG00000157764",
        "ENSG00000157764.13": "ENSG00000157764", "GENE0001": "ENSG00900000001",
        "ENSG00900000001": "ENSG00900000001"}.get(q))
    assert aliases == {g.query: g.duplicate_of for g in genes if g.duplicate_of}
