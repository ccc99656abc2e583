"""Offline Ensembl from FTP files: parity with the REST path, symbols, patches, locating,
URLs and downloading (from a loopback HTTP server)."""

from __future__ import annotations

import functools
import gzip
import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from esm2_batch.errors import EnsemblUnavailableError, InputError
from esm2_batch.sources.base import SourceOptions
from esm2_batch.sources.ensembl_files import (
    EnsemblFilesIndex,
    isoforms_from_files,
)
from esm2_batch.sources.ensembl_ftp import (
    EnsemblFiles,
    download_commands,
    download_ensembl_files,
    ensembl_cache_dir,
    ensembl_file_urls,
    find_ensembl_files,
)
from esm2_batch.sources.ensembl_rest import EnsemblClient
from esm2_batch.sources.factory import open_source
from tests.fakes.ensembl import FakeEnsembl, FakeGene, braf, synthetic_genes
from tests.fakes.ensembl_files import patch_copy, write_ensembl_files

NMD = ("protein_coding", "nonsense_mediated_decay")
PUB = "https://ftp.ensembl.org/pub"


def table() -> list[FakeGene]:
    """BRAF (real isoforms), 20 synthetic genes; GENE0007 and GENE0014 are lncRNA genes."""
    return [braf(), *synthetic_genes(20, noncoding_every=7)]


def queries(genes: list[FakeGene]) -> list[str]:
    ids = [g.gene_id for g in genes[:8]]
    symbols = [g.symbol for g in genes[8:]]
    return [*ids, f"{genes[1].gene_id}.7", "GENE0007", genes[14].gene_id, *symbols,
            "NOT_A_GENE", "ENSG00999999999", "RP11-34P13.3", "GENE0003", "BRAF"]


def index_for(tmp_path: Path, genes: list[FakeGene], **options: object) -> EnsemblFilesIndex:
    write_ensembl_files(tmp_path, genes, **options)  # type: ignore[arg-type]
    return EnsemblFilesIndex.load(find_ensembl_files(tmp_path, "homo_sapiens", 110))


@pytest.mark.parametrize("biotypes", [("protein_coding",), NMD])
async def test_files_give_the_same_records_as_rest(tmp_path: Path,
                                                   biotypes: tuple[str, ...]) -> None:
    genes = table()
    fake = FakeEnsembl(genes)
    await fake.start()
    try:
        async with EnsemblClient(base_url=fake.url, rate_limit=1000, biotypes=biotypes) as c:
            rest = await c.fetch_isoforms(queries(genes))
    finally:
        await fake.stop()
    offline = index_for(tmp_path, genes, patches=[patch_copy(genes[3])]).isoforms(
        queries(genes), biotypes=biotypes)
    assert offline == rest
    statuses = {g.query: g.status for g in offline}
    assert statuses[genes[7].gene_id] == statuses[genes[14].gene_id] == "no_protein"
    # later spellings of genes the list named by ID first are duplicates of the ID
    assert {g.query: g.duplicate_of for g in offline if g.duplicate_of} == {
        genes[i].symbol: genes[i].gene_id for i in (7, 14, 3, 0)}
    assert statuses["NOT_A_GENE"] == statuses["ENSG00999999999"] == "not_found"
    assert offline[0].isoforms[0].is_canonical and offline[0].isoforms[0].protein_id == \
        "ENSP00000493543"


def test_a_patch_duplicate_never_shadows_the_primary_gene(tmp_path: Path) -> None:
    genes = table()
    patch = patch_copy(genes[3], 2)
    index = index_for(tmp_path, genes, patches=[patch])
    by_symbol, by_patch_id = index.isoforms([genes[3].symbol, patch.gene_id])
    assert by_symbol.gene_id == genes[3].gene_id
    assert by_patch_id.gene_id == patch.gene_id and by_patch_id.status == "ok"
    assert by_patch_id.isoforms[0].sequence != by_symbol.isoforms[0].sequence


def test_a_gene_without_gene_symbol(tmp_path: Path) -> None:
    genes = table()
    index = index_for(tmp_path, genes, without_symbol={genes[2].gene_id})
    by_id, by_symbol = index.isoforms([genes[2].gene_id, genes[2].symbol])
    assert (by_id.status, by_id.symbol) == ("ok", None)
    assert by_symbol.status == "not_found"


def test_symbols_match_ignoring_case_with_a_warning(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    index = index_for(tmp_path, table())
    with caplog.at_level(logging.WARNING, logger="esm2_batch"):
        (gene,) = index.isoforms(["braf"])
    assert (gene.query, gene.symbol, gene.status) == ("braf", "BRAF", "ok")
    assert "braf -> BRAF" in caplog.text and "--species" in caplog.text


def test_noncoding_symbols_need_the_ncrna_file(tmp_path: Path) -> None:
    genes = table()
    index = index_for(tmp_path, genes, ncrna=False)
    by_symbol, by_id = index.isoforms(["GENE0007", genes[7].gene_id])
    assert by_symbol.status == "not_found"  # pep has no entry and canonical no symbols
    assert (by_id.status, by_id.symbol) == ("no_protein", None)


def test_files_of_different_releases_are_refused(tmp_path: Path) -> None:
    files = write_ensembl_files(tmp_path, table())
    with gzip.open(files.canonical, "rt") as handle:
        text = handle.read().replace(".1\tEnsembl", ".2\tEnsembl")
    with gzip.open(files.canonical, "wt") as handle:
        handle.write(text)
    with pytest.raises(InputError, match="different Ensembl releases"):
        EnsemblFilesIndex.load(find_ensembl_files(tmp_path, "homo_sapiens"))


def test_isoforms_from_a_directory_for_mouse(tmp_path: Path) -> None:
    genes = table()
    write_ensembl_files(tmp_path, genes, species="mus_musculus", assembly="GRCm39",
                        release=112)
    found = isoforms_from_files(["GENE0001", "GENE0001", "Gene0002"], tmp_path,
                                species="mus_musculus", release=112)
    assert [g.query for g in found] == ["GENE0001", "Gene0002"]
    assert all(g.status == "ok" for g in found)


# -- the whole proteome (--all_genes) and streaming -----------------------------------------
def test_all_genes_lists_coding_primary_genes_sorted(tmp_path: Path) -> None:
    genes = table()  # GENE0007 and GENE0014: lncRNA, no translation
    patch = patch_copy(genes[3], 2)  # a patch-only gene ID with proteins
    index = index_for(tmp_path, genes, patches=[patch])
    coding = sorted(g.gene_id for g in genes if g.symbol not in ("GENE0007", "GENE0014"))
    assert index.all_genes() == coding
    assert patch.gene_id not in index.all_genes(NMD)
    assert all(g.status == "ok" and g.isoforms[0].is_canonical
               for g in index.isoforms(index.all_genes()))


def test_all_genes_follows_the_biotypes(tmp_path: Path) -> None:
    nmd_only = synthetic_genes(2, coding=0, nmd=1, start=50)  # NMD translations only
    index = index_for(tmp_path, [*synthetic_genes(3), *nmd_only])
    assert [g for g in index.all_genes() if g in {n.gene_id for n in nmd_only}] == []
    assert {n.gene_id for n in nmd_only} <= set(index.all_genes(NMD))


async def test_the_source_streams_lazily_and_lists_all_genes(tmp_path: Path) -> None:
    genes = table()
    write_ensembl_files(tmp_path, genes)
    source = open_source(SourceOptions(ensembl_files=tmp_path, ensembl_release=110))
    listed = source.all_genes()
    assert listed is not None and len(listed) == len(genes) - 2
    stream = source.stream(list(listed))
    first = await anext(stream)  # an async generator: nothing built for the rest yet
    assert first.query == listed[0] and first.status == "ok"
    rest = [g async for g in stream]
    assert [g.query for g in rest] == list(listed[1:])


def test_iter_isoforms_is_an_iterator_with_the_case_warning_at_the_end(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = index_for(tmp_path, table())
    records = index.iter_isoforms(["braf", "GENE0001"])
    assert not isinstance(records, list)
    with caplog.at_level(logging.WARNING, logger="esm2_batch"):
        assert next(records).symbol == "BRAF"
        assert "ignoring case" not in caplog.text  # warned once the list is done
        assert [g.query for g in records] == ["GENE0001"]
    assert "braf -> BRAF" in caplog.text


def test_other_sources_list_genes_or_say_they_cannot(tmp_path: Path) -> None:
    fasta = tmp_path / "iso.fa"
    fasta.write_text(">ENSP1 gene=B gene_id=ENSG2 transcript=ENST1 canonical=1\nMKV\n"
                     ">ENSP2 gene=A gene_id=ENSG1 transcript=ENST2 canonical=1\nMKL\n")
    assert open_source(SourceOptions(isoforms=fasta)).all_genes() == ["B", "A"]
    assert open_source(SourceOptions()).all_genes() is None


# -- finding files -------------------------------------------------------------------------
def test_find_reports_release_assembly_and_the_optional_ncrna(tmp_path: Path) -> None:
    write_ensembl_files(tmp_path, table(), ncrna=False)
    files = find_ensembl_files(tmp_path, "homo_sapiens")
    assert (files.release, files.assembly, files.ncrna) == (110, "GRCh38", None)
    assert files.pep.name == "Homo_sapiens.GRCh38.pep.all.fa.gz"


@pytest.mark.parametrize(("species", "release", "message"), [
    ("homo_sapiens", 111, r"no canonical file for homo_sapiens.*--ensembl_release 111"),
    ("mus_musculus", None, "no canonical file for mus_musculus"),
    ("Homo sapiens", None, "production name"),
])
def test_find_says_what_is_missing(tmp_path: Path, species: str, release: int | None,
                                   message: str) -> None:
    write_ensembl_files(tmp_path, table())
    with pytest.raises(InputError, match=message):
        find_ensembl_files(tmp_path, species, release)


def test_find_refuses_ambiguity_and_a_missing_pep(tmp_path: Path) -> None:
    files = write_ensembl_files(tmp_path, table())
    write_ensembl_files(tmp_path, table(), release=111)
    with pytest.raises(InputError, match="several canonical files"):
        find_ensembl_files(tmp_path, "homo_sapiens")
    files.pep.unlink()
    with pytest.raises(InputError, match="no pep file"):
        find_ensembl_files(tmp_path, "homo_sapiens", 110)
    with pytest.raises(InputError, match="no such directory"):
        find_ensembl_files(tmp_path / "nope", "homo_sapiens")


def test_a_corrupt_file_is_one_line(tmp_path: Path) -> None:
    files = write_ensembl_files(tmp_path, table())
    files.pep.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"pep\.all\.fa\.gz.*download it again"):
        EnsemblFilesIndex.load(find_ensembl_files(tmp_path, "homo_sapiens"))


# -- URLs and download -----------------------------------------------------------------------
def test_urls_for_human_and_both_mouse_assemblies() -> None:
    assert ensembl_file_urls("homo_sapiens", 110) == [
        f"{PUB}/release-110/fasta/homo_sapiens/pep/Homo_sapiens.GRCh38.pep.all.fa.gz",
        f"{PUB}/release-110/tsv/homo_sapiens/Homo_sapiens.GRCh38.110.canonical.tsv.gz",
        f"{PUB}/release-110/fasta/homo_sapiens/ncrna/Homo_sapiens.GRCh38.ncrna.fa.gz"]
    assert "Mus_musculus.GRCm39.103.canonical" in ensembl_file_urls("mus_musculus", 103)[1]
    assert "Mus_musculus.GRCm38.pep.all" in ensembl_file_urls("mus_musculus", 102,
                                                              ncrna=False)[0]
    with pytest.raises(InputError, match=r"no known assembly.*GRCz11"):
        ensembl_file_urls("danio_rerio", 110)
    assert "Danio_rerio.GRCz11.pep" in ensembl_file_urls("danio_rerio", 110, "GRCz11")[0]


def test_download_commands_are_curl_lines(tmp_path: Path) -> None:
    (pep, canonical) = download_commands("mus_musculus", 112, tmp_path, ncrna=False)
    assert pep == (f"curl -fL --create-dirs -o {tmp_path}/Mus_musculus.GRCm39.pep.all.fa.gz "
                   f"{PUB}/release-112/fasta/mus_musculus/pep/Mus_musculus.GRCm39.pep.all.fa.gz")
    assert canonical.endswith("/tsv/mus_musculus/Mus_musculus.GRCm39.112.canonical.tsv.gz")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("ESM2_BATCH_ENSEMBL_DIR", str(tmp_path))
    assert ensembl_cache_dir(112) == tmp_path / "release-112"


@pytest.fixture
def ftp_mirror(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server laid out like ftp.ensembl.org/pub for release 110."""
    root = tmp_path / "mirror"
    staging = tmp_path / "staging"
    files = write_ensembl_files(staging, table())
    for url in ensembl_file_urls("homo_sapiens", 110, base_url=""):
        target = root / url.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        source = {"pep": files.pep, "tsv": files.canonical, "ncrna": files.ncrna}
        kind = "tsv" if "/tsv/" in url else ("ncrna" if "/ncrna/" in url else "pep")
        target.write_bytes(source[kind].read_bytes())  # type: ignore[union-attr]
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        thread.join(5)


def test_download_fetches_once_then_reuses(tmp_path: Path,
                                           ftp_mirror: tuple[str, list[str]]) -> None:
    url, requested = ftp_mirror
    files = download_ensembl_files("homo_sapiens", 110, tmp_path / "cache", base_url=url)
    assert isinstance(files, EnsemblFiles) and files.ncrna is not None
    assert len(requested) == 3
    download_ensembl_files("homo_sapiens", 110, tmp_path / "cache", base_url=url)
    assert len(requested) == 3
    (gene,) = EnsemblFilesIndex.load(files).isoforms(["BRAF"])
    assert gene.status == "ok"


def test_download_failure_names_the_url(tmp_path: Path,
                                        ftp_mirror: tuple[str, list[str]]) -> None:
    url, _ = ftp_mirror
    with pytest.raises(EnsemblUnavailableError, match=r"release-109/.*by hand"):
        download_ensembl_files("homo_sapiens", 109, tmp_path / "cache", base_url=url)
    assert not list((tmp_path / "cache").iterdir())  # no half-written file left
