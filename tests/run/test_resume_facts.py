"""A resumed or reused run keeps every fact an uninterrupted one records, and one gene
written several ways is one gene."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest

from esm2_batch.models import LoadedModel, load_model
from esm2_batch.outputs.export import export_genes
from esm2_batch.run import gene_mode
from esm2_batch.run.config import RunConfig
from esm2_batch.run.gene_mode import partial_dir, run
from esm2_batch.store.esm_file import read_esm_file
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.run.flat import make_config, with_flags

GENES = [braf(), *synthetic_genes(4, coding=2, nmd=0, noncoding_every=4)]


@pytest.fixture
def fake() -> Iterator[FakeEnsembl]:
    server = FakeEnsembl(GENES)
    with server.running_in_thread():
        yield server


def config_for(tmp_path: Path, fake: FakeEnsembl, queries: list[str]) -> RunConfig:
    hvg = tmp_path / f"hvg{len(queries)}.txt"
    hvg.write_text("\n".join(queries) + "\n")
    return make_config(hvg_file=hvg, out=tmp_path / "esm_all.pt", ensembl_url=fake.url,
                       rate_limit=1000.0, progress=False)


def test_the_ensembl_release_survives_a_resume(tmp_path: Path, fake: FakeEnsembl,
                                               model: LoadedModel,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for(tmp_path, fake, ["BRAF", "GENE0001"])

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("crash after every gene was fetched")

    with monkeypatch.context() as patch:
        patch.setattr(gene_mode, "write_esm_file", crash)
        with pytest.raises(OSError):
            run(config, model=model)
    assert partial_dir(config.out).is_dir()
    run(config, model=model)  # nothing left to fetch: the server is not asked again
    assert read_esm_file(config.out).meta["ensembl_release"] == 114


def test_engine_names_the_engine_that_computed_the_rows(tmp_path: Path, fake: FakeEnsembl,
                                                        checkpoint: Path) -> None:
    fast = load_model(checkpoint, device="cpu", engine="fast")
    reference = load_model(checkpoint, device="cpu", engine="reference")
    config = config_for(tmp_path, fake, ["BRAF", "GENE0001"])
    run(config, model=fast)
    run(config, model=reference)  # every row reused from the file the fast engine wrote
    assert read_esm_file(config.out).meta["engine"] == "fast"
    run(config_for(tmp_path, fake, ["BRAF", "GENE0001", "GENE0002"]), model=reference)
    assert read_esm_file(config.out).meta["engine"] == "fast+reference"


def test_a_reused_file_keeps_the_symbols_of_its_unresolved_report(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    config = config_for(tmp_path, fake, ["BRAF", "GENE0004", "NOPE"])  # GENE0004: no protein
    report = tmp_path / "esm_all.unresolved.tsv"
    run(config, model=model)
    first = report.read_text()
    run(config, model=model)
    assert report.read_text() == first
    rows = {r["query"]: r for r in csv.DictReader(report.open(), delimiter="\t")}
    assert rows["GENE0004"]["symbol"] == "GENE0004"


def test_spellings_of_one_gene_are_one_gene(tmp_path: Path, fake: FakeEnsembl,
                                            model: LoadedModel) -> None:
    config = config_for(tmp_path, fake, ["BRAF", "ENSG00000157764", "braf", "GENE0001"])
    summary = run(config, model=model)
    esm = read_esm_file(config.out)
    assert esm.genes == ["BRAF", "GENE0001"]
    assert esm.meta["aliases"] == {"ENSG00000157764": "BRAF", "braf": "BRAF"}
    assert len(esm.protein_ids) == len(set(esm.protein_ids))  # BRAF's rows once
    assert summary.aliases == esm.meta["aliases"]
    assert any("ENSG00000157764 -> BRAF" in line for line in summary.lines())
    saturn = export_genes(config.out, fmt="saturn", out=tmp_path / "saturn.pt")
    assert saturn.duplicate_keys == () and saturn.written == 2  # one BRAF, no key taken


def test_a_rerun_fetches_incomplete_genes_again(tmp_path: Path, fake: FakeEnsembl,
                                                model: LoadedModel) -> None:
    config = config_for(tmp_path, fake, ["GENE0001", "GENE0002"])
    dropped = next(t.protein_id for t in GENES[1].transcripts if not t.is_canonical)
    assert dropped is not None
    fake.drop_ids, fake.drop_once = {dropped}, False
    run(config, model=model)
    assert read_esm_file(config.out).meta["status"]["GENE0001"] == "incomplete"
    fake.drop_ids = set()  # Ensembl answers again
    asked = len(fake.bodies)
    summary = run(config, model=model)
    esm = read_esm_file(config.out)
    assert esm.meta["status"] == {"GENE0001": "ok", "GENE0002": "ok"}
    assert dropped in esm.protein_ids and summary.incomplete == []
    fetched = {s for _, body in fake.bodies[asked:] for s in body.get("symbols", [])}
    assert fetched == {"GENE0001"}  # only the incomplete gene was asked for


def test_overwrite_replaces_what_a_reuse_would_keep(tmp_path: Path, fake: FakeEnsembl,
                                                    model: LoadedModel) -> None:
    config = config_for(tmp_path, fake, ["BRAF"])
    run(config, model=model)
    summary = run(with_flags(config, overwrite=True), model=model)
    assert summary.reused_rows == 0  # the old file's rows are not kept ...
    assert summary.cached_rows == summary.distinct_sequences > 0  # ... the cache's are
    uncached = run(with_flags(config, overwrite=True, cache=False), model=model)
    assert uncached.reused_rows == 0 and uncached.embedded_now == summary.distinct_sequences
