"""Outdated gene names (SEPT5 -> SEPTIN5) resolved by synonym, through REST and offline."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from esm2_batch import fetch_isoforms
from esm2_batch.records import GeneIsoforms
from esm2_batch.run.reports import synonym_note, unresolved_rows
from esm2_batch.sources.ensembl_files import isoforms_from_files
from esm2_batch.sources.ensembl_rest import EnsemblClient
from esm2_batch.sources.ensembl_rest.parse import parse_xrefs
from esm2_batch.sources.synonyms import SynonymTable, choose, worth_a_lookup
from esm2_batch.sources.unresolved import likely_reason
from tests.fakes.ensembl import (
    FIXTURES,
    FakeEnsembl,
    FakeGene,
    Fault,
    Start,
    genes_for_symbols,
    renamed,
    started_servers,
    synthetic_genes,
)
from tests.fakes.ensembl_files import patch_copy, write_ensembl_files, write_synonym_table

ROOT = Path(__file__).resolve().parents[2]
HVG = ROOT / "data" / "hvg_pbmc3k_seurat_v3_top2000.txt"
# outdated names in data/'s PBMC3k list and what HGNC calls them today
RENAMES = {"SEPT5": "SEPTIN5", "KIAA0101": "PCLAF", "H2AFZ": "H2AZ1", "C14orf1": "ERG28",
           "FAM96A": "CIAO2A", "SEPT11": "SEPTIN11", "KIAA1429": "VIRMA",
           "C17orf62": "CYBC1", "C21orf33": "GATD3A", "FAM96B": "CIAO2B"}

def table() -> list[FakeGene]:
    """GENE0001..: GENE0001 is now SEPTIN5 (was SEPT5, alias PNUTL2); GENE0002 and
    GENE0003 share the alias AMBIG1; GENE0004 has a patch copy sharing its alias OLD4;
    GENE0010 is non-coding and was called OLDNC."""
    genes = synthetic_genes(12, coding=2, nmd=1, noncoding_every=10)
    genes[0].symbol, genes[0].synonyms = "SEPTIN5", ["SEPT5", "PNUTL2"]
    genes[1].synonyms = ["AMBIG1"]
    genes[2].synonyms = ["AMBIG1"]
    genes[3].synonyms = ["OLD4"]
    genes[9].synonyms = ["OLDNC"]
    return [*genes, patch_copy(genes[3])]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    async with started_servers(table) as start:
        yield start


def client(fake: FakeEnsembl, **options: Any) -> EnsemblClient:
    defaults: dict[str, Any] = {"rate_limit": 1000, "backoff_base": 0.001}
    return EnsemblClient(base_url=fake.url, **{**defaults, **options})


def by_query(genes: list[GeneIsoforms]) -> dict[str, GeneIsoforms]:
    return {g.query: g for g in genes}


# -- the pieces ----------------------------------------------------------------------------
def test_parse_real_xrefs_reply_keeps_ensembl_genes_only() -> None:
    reply = json.loads((FIXTURES / "xrefs_symbol_BRCA2.json").read_text())
    assert parse_xrefs(reply) == ["ENSG00000139618"]  # not LRG_293, not the transcripts
    assert parse_xrefs([]) == []


def test_dates_clone_names_and_ids_are_never_looked_up() -> None:
    for name in ("7-Sep", "1-Mar", "Sep-7", "RP11-34P13.3", "AC012345.1", "ENSG00000157764",
                 " "):
        assert not worth_a_lookup(name), name
    assert worth_a_lookup("SEPT5") and worth_a_lookup("KIAA0101") and worth_a_lookup("HLA-A")


def test_choose_prefers_the_one_coding_primary_gene() -> None:
    from esm2_batch.sources.synonyms import Candidate

    one = Candidate("ENSG1", "A", primary=True, coding=True)
    patch = Candidate("ENSG9", "A", primary=False, coding=True)
    noncoding = Candidate("ENSG2", "B", primary=True, coding=False)
    assert choose([one, patch]) == one
    assert choose([one, noncoding]) == one
    assert choose([patch]) is None and choose([]) is None
    assert choose([one, Candidate("ENSG3", "C", True, True)]) == [
        one, Candidate("ENSG3", "C", True, True)]


# -- REST ----------------------------------------------------------------------------------
async def test_rest_resolves_an_outdated_symbol_keyed_by_the_query(serve: Start) -> None:
    fake = await serve()
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["SEPT5"])
    assert gene.query == "SEPT5" and gene.status == "ok"
    assert gene.symbol == "SEPTIN5" and gene.gene_id == "ENSG00900000001"
    assert gene.matched_by == "synonym" and gene.isoforms[0].is_canonical
    assert fake.counts["xrefs"] == 1
    (xrefs,) = [body for endpoint, body in fake.bodies if endpoint == "xrefs"]
    assert xrefs == {"symbol": "SEPT5", "object_type": "gene", "external_db": "HGNC"}


async def test_rest_matched_by_says_how(serve: Start) -> None:
    fake = await serve()
    async with client(fake) as c:
        genes = by_query(await c.fetch_isoforms(["ENSG00900000002", "GENE0005", "SEPT5",
                                                 "OLDNC", "NOPE"]))
    assert genes["ENSG00900000002"].matched_by == "id"
    assert genes["GENE0005"].matched_by == "symbol"
    assert genes["SEPT5"].matched_by == "synonym"
    assert genes["OLDNC"].status == "no_protein" and genes["OLDNC"].matched_by == "synonym"
    assert genes["NOPE"].status == "not_found" and genes["NOPE"].matched_by is None


async def test_rest_ambiguous_synonym_is_reported_with_candidates(serve: Start) -> None:
    fake = await serve()
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["AMBIG1"])
    assert gene.status == "not_found" and gene.gene_id is None and not gene.isoforms
    assert gene.candidates == (("ENSG00900000002", "GENE0002"),
                               ("ENSG00900000003", "GENE0003"))
    assert fake.counts["sequence"] == 0  # never guessed, never fetched
    ((_, _, _, _, reason),) = unresolved_rows([gene])
    assert reason.startswith("ambiguous") and "ENSG00900000003 (GENE0003)" in reason


async def test_rest_patch_copy_does_not_make_a_synonym_ambiguous(serve: Start) -> None:
    fake = await serve()
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["OLD4"])
    assert gene.status == "ok" and gene.gene_id == "ENSG00900000004"


async def test_rest_unknown_symbol_is_not_found_after_one_request(serve: Start) -> None:
    fake = await serve()
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["NOT_A_GENE"])
    assert gene.status == "not_found" and not gene.candidates
    assert fake.counts["xrefs"] == 1 and fake.counts["lookup"] == 2  # + the case retry


async def test_rest_spreadsheet_dates_are_reported_not_looked_up(serve: Start) -> None:
    fake = await serve()
    async with client(fake) as c:
        genes = await c.fetch_isoforms(["7-Sep", "1-Mar", "RP11-34P13.3"])
    assert [g.status for g in genes] == ["not_found"] * 3
    assert fake.counts["xrefs"] == 0
    assert "date" in likely_reason("7-Sep", "not_found")


async def test_rest_synonym_of_a_listed_gene_is_a_duplicate(serve: Start) -> None:
    fake = await serve()
    async with client(fake) as c:
        genes = by_query(await c.fetch_isoforms(["SEPTIN5", "SEPT5", "PNUTL2"]))
    assert genes["SEPTIN5"].status == "ok"
    for query in ("SEPT5", "PNUTL2"):
        assert genes[query].duplicate_of == "SEPTIN5" and genes[query].status == "not_found"
        assert genes[query].gene_id is None  # the duplicate never stands in for the gene
    asked = [i for endpoint, body in fake.bodies if endpoint == "sequence"
             for i in body["ids"]]
    assert asked == ["ENSG00900000001"]  # fetched once
    ((_, _, _, _, reason),) = unresolved_rows([genes["SEPT5"]])
    assert "SEPTIN5" in reason and "kept once" in reason


async def test_rest_two_synonyms_of_one_gene_fetch_it_once(serve: Start) -> None:
    fake = await serve()
    async with client(fake) as c:
        genes = by_query(await c.fetch_isoforms(["PNUTL2", "SEPT5"]))
    assert genes["PNUTL2"].status == "ok" and genes["SEPT5"].duplicate_of == "PNUTL2"


async def test_rest_no_synonyms_keeps_strict_matching(serve: Start) -> None:
    fake = await serve()
    async with client(fake, synonyms=False) as c:
        (gene,) = await c.fetch_isoforms(["SEPT5"])
    assert gene.status == "not_found" and fake.counts["xrefs"] == 0


async def test_rest_synonym_lookup_waits_out_429_and_retries_5xx(serve: Start) -> None:
    fake = await serve(faults=[Fault("xrefs", 429, retry_after=0.01), Fault("xrefs", 503)])
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["SEPT5"])
        stats = c.stats
    assert gene.status == "ok" and stats["n429"] == 1 and stats["retries"] == 1
    assert stats["requests xrefs"] == 3


async def test_rest_synonym_refused_by_the_server_is_not_found(serve: Start) -> None:
    fake = await serve(faults=[Fault("xrefs", 400)])
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["SEPT5"])
    assert gene.status == "not_found"


async def test_rest_costs_one_request_per_miss_plus_one_shared_fetch(serve: Start) -> None:
    """100 symbols in 4 lookup chunks, 8 of them outdated: 8 xrefs GETs, one lookup/id and
    one sequence request for the 8 genes together."""
    genes = synthetic_genes(100, coding=2, nmd=0)
    old = {f"GENE{i:04d}": f"NEW{i:04d}" for i in range(5, 100, 12)}
    renamed(genes, old)
    queries = [f"GENE{i:04d}" for i in range(1, 101)]
    strict = await serve(genes)
    async with client(strict, synonyms=False, lookup_chunk_size=25) as c:
        await c.fetch_isoforms(queries)
    fake = await serve(genes)
    async with client(fake, lookup_chunk_size=25) as c:
        found = await c.fetch_isoforms(queries)
    assert all(g.status == "ok" for g in found)
    extra = fake.counts["requests"] - strict.counts["requests"]
    assert fake.counts["xrefs"] == len(old) == 8
    assert extra == len(old) + 2  # + one lookup/id + one sequence request, shared


def test_sync_fetch_isoforms_synonyms_by_default() -> None:
    fake = FakeEnsembl(table())
    with fake.running_in_thread() as url:
        (gene,) = fetch_isoforms(["SEPT5"], base_url=url, rate_limit=100)
        (strict,) = fetch_isoforms(["SEPT5"], base_url=url, rate_limit=100, synonyms=False)
    assert gene.status == "ok" and gene.symbol == "SEPTIN5"
    assert strict.status == "not_found"


# -- offline -------------------------------------------------------------------------------
def offline(tmp_path: Path, queries: list[str], genes: list[FakeGene] | None = None,
            **kw: Any) -> list[GeneIsoforms]:
    genes = genes if genes is not None else table()
    primary = [g for g in genes if not g.region.startswith("CHR_")]
    patches = [g for g in genes if g.region.startswith("CHR_")]
    files = write_ensembl_files(tmp_path / "files", primary, patches=patches)
    synonyms = write_synonym_table(tmp_path / "hgnc_complete_set.txt", genes)
    return isoforms_from_files(queries, files.pep.parent, release=110,
                               **{"synonyms": synonyms, **kw})


QUERIES = ["SEPT5", "AMBIG1", "OLD4", "OLDNC", "NOPE", "7-Sep", "GENE0005", "SEPTIN5",
           "PNUTL2", "ENSG00900000006"]


async def test_offline_resolves_like_rest_on_one_table(serve: Start, tmp_path: Path) -> None:
    fake = await serve()
    async with client(fake) as c:
        rest = await c.fetch_isoforms(QUERIES)
    files = offline(tmp_path, QUERIES)
    assert [g.to_dict() for g in files] == [g.to_dict() for g in rest]
    genes = by_query(files)
    assert genes["OLD4"].gene_id == "ENSG00900000004" and genes["OLD4"].status == "ok"
    assert genes["AMBIG1"].candidates and genes["OLDNC"].status == "no_protein"
    # the current name holds the gene wherever it stands in the list
    assert genes["SEPTIN5"].status == "ok" and genes["SEPTIN5"].matched_by == "symbol"
    assert genes["SEPT5"].duplicate_of == genes["PNUTL2"].duplicate_of == "SEPTIN5"


def test_offline_without_a_table_is_strict(tmp_path: Path) -> None:
    (gene,) = offline(tmp_path, ["SEPT5"], synonyms=None)
    assert gene.status == "not_found"


def test_hgnc_table_reads_quoted_pipe_separated_cells(tmp_path: Path) -> None:
    path = tmp_path / "hgnc.tsv"
    path.write_text("hgnc_id\tsymbol\talias_symbol\tprev_symbol\tensembl_gene_id\n"
                    'HGNC:1\tSEPTIN5\t"PNUTL2|CDCREL1"\tSEPT5\tENSG00000184702\n'
                    "HGNC:2\tNOENS\tX1\t\t\n")
    synonyms = SynonymTable.read(path)
    assert synonyms.gene_ids("SEPT5") == synonyms.gene_ids("cdcrel1") == {"ENSG00000184702"}
    assert synonyms.gene_ids("X1") == set()
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    from esm2_batch.errors import InputError

    with pytest.raises(InputError, match="ensembl_gene_id"):
        SynonymTable.read(bad)


# -- data/'s PBMC3k list ---------------------------------------------------------------------
async def test_hvg_list_loses_no_gene_known_under_a_newer_name(serve: Start,
                                                               tmp_path: Path) -> None:
    """The 2000-gene list against a server that knows 10 of its names only as synonyms:
    every one resolves (REST and offline), at one xrefs request per miss that could be
    a synonym (the 82 retired clone names are not asked), and the summary lists them."""
    queries = [line.strip() for line in HVG.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert set(RENAMES) <= set(queries)
    genes = renamed(genes_for_symbols(queries, coding=2, nmd=0), RENAMES)
    strict = await serve(genes)
    started = time.perf_counter()
    async with client(strict, synonyms=False) as c:
        before = by_query(await c.fetch_isoforms(queries))
    strict_s = time.perf_counter() - started
    fake = await serve(genes)
    started = time.perf_counter()
    async with client(fake) as c:
        after = by_query(await c.fetch_isoforms(queries))
    synonyms_s = time.perf_counter() - started
    assert all(before[q].status == "not_found" for q in RENAMES)
    assert all(after[q].status == "ok" and after[q].symbol == new
               for q, new in RENAMES.items())
    lost = [q for q in queries if after[q].status != "ok"]
    assert len(lost) == 82 and all(after[q].matched_by is None for q in lost)
    assert fake.counts["xrefs"] == len(RENAMES)
    assert fake.counts["requests"] - strict.counts["requests"] == len(RENAMES) + 2
    note = synonym_note(after.values())
    assert note is not None and note.startswith("found under a newer name: 10 (")
    print(f"\nrequests: strict {strict.counts['requests']} in {strict_s:.2f} s, "
          f"with synonyms {fake.counts['requests']} in {synonyms_s:.2f} s")
    offline_genes = by_query(offline(tmp_path, queries, genes))
    assert [offline_genes[q].to_dict() for q in queries] == [after[q].to_dict()
                                                            for q in queries]


def test_records_written_before_synonyms_still_load() -> None:
    old = {"query": "BRAF", "gene_id": "ENSG00000157764", "symbol": "BRAF", "isoforms": [],
           "status": "no_protein"}
    assert GeneIsoforms.from_dict(old).matched_by == "symbol"
    assert GeneIsoforms.from_dict({**old, "query": "ENSG00000157764"}).matched_by == "id"
    assert GeneIsoforms.from_dict({**old, "gene_id": None, "status": "not_found"}
                                  ).matched_by is None
    gene = GeneIsoforms("AMBIG1", None, None, (), "not_found",
                        candidates=(("ENSG1", "A"), ("ENSG2", "B")))
    assert GeneIsoforms.from_dict(json.loads(json.dumps(gene.to_dict()))) == gene
