"""The embedding stage on a local Ray cluster: same file as one process, resume, guards.

Few and marked `ray`: one session-scoped cluster costs seconds to start."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esm2_batch.embedding import budget
from esm2_batch.errors import ModelError
from esm2_batch.models import LoadedModel
from esm2_batch.run import ray_stage
from esm2_batch.run.config import RunConfig
from esm2_batch.run.gene_mode import run
from esm2_batch.store.esm_file import read_esm_file
from esm2_batch.store.partial import PartialStore
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.run.flat import make_config, with_flags
from tests.tolerance import stored_tolerance, tolerance

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

GENES = [braf(), *synthetic_genes(45, coding=3, nmd=0)]  # 140 rows
QUERIES = ["BRAF", "NOPE", *[g.symbol for g in GENES[1:]]]


@pytest.fixture(autouse=True)
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks of 8 rows in windows of 32: the 140 rows go out in several windows while
    the driver is still fetching, and the fetcher waits for room (wait_for_room, from
    gene mode's worker thread)."""
    monkeypatch.setattr(ray_stage, "RayOptions", functools.partial(
        ray_stage.RayOptions, rows_per_task=8, window_rows=32))


@pytest.fixture
def config(tmp_path: Path, checkpoint: Path) -> Iterator[RunConfig]:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(QUERIES) + "\n")
    with FakeEnsembl(GENES).running_in_thread() as url:
        yield make_config(hvg_file=hvg, out=tmp_path / "ray.pt", model=str(checkpoint),
                        ensembl_url=url, rate_limit=1000.0, progress=False, ray="local",
                        ray_actors=2, toks_per_batch=2048)


def test_ray_resumes_after_the_driver_dies_and_equals_one_process(
        config: RunConfig, model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver killed mid-run, then rerun: only what was missing is embedded, and the
    file equals a single-process run's (same genes, ids, order; rows within fp16).

    The rerun asks for an "auto" budget with the driver's own "auto" made 3,000 here (as a
    GPU-less driver's 4,096 would differ from a GPU actor's): the actors, other processes,
    size theirs (4,096 on their CPU), and meta records what the rows were planned with.
    (A number the user gives reaches the actors as it is: test_ray_per_tok's 2048.)"""
    original = PartialStore.add_rows
    calls = {"n": 0}

    def dying(self: PartialStore, keys: list[str], emb: torch.Tensor) -> None:
        if calls["n"] == 1:
            raise KeyboardInterrupt("driver killed")
        calls["n"] += 1
        original(self, keys, emb)

    monkeypatch.setattr(PartialStore, "add_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        run(with_flags(config, ray_actors=1), model=model)
    monkeypatch.setattr(PartialStore, "add_rows", original)
    monkeypatch.setattr(budget, "CPU_TOKENS", 3000)
    resumed = run(with_flags(config, toks_per_batch="auto"), model=model)
    total = read_esm_file(config.out)
    assert total.meta["budget"]["requested"] == "auto"
    assert total.meta["budget"]["sized_on"] == "each Ray actor's device"
    assert set(total.meta["budget"]["actors"].values()) == {4096}
    assert 0 < resumed.embedded_now < len(total.protein_ids)  # only what was missing
    reference = with_flags(config, ray=None, out=config.out.with_name("single.pt"),
                           cache=False)  # computed here, not the Ray rows from the cache
    run(reference, model=model)
    single = read_esm_file(reference.out)
    assert total.genes == single.genes and total.protein_ids == single.protein_ids
    assert total.gene_to_isoform_indices == single.gene_to_isoform_indices
    assert resumed.failed == []
    limit = stored_tolerance(torch.float16, magnitude=float(single.emb.float().abs().max()),
                             terms=4 * model.embed_dim, depth=model.num_layers)
    assert (total.emb.float() - single.emb.float()).abs().max() <= limit


def test_asking_for_gpus_on_a_cluster_without_any_fails_fast(config: RunConfig,
                                                            model: LoadedModel) -> None:
    with pytest.raises(ModelError, match="no GPU"):
        run(with_flags(config, device="cuda"), model=model)


def test_fasta_mode_on_ray_equals_one_process(tmp_path: Path, checkpoint: Path,
                                              model: LoadedModel) -> None:
    from esm2_batch.run.fasta_mode import run_fasta
    from esm2_batch.run.stages import StageOptions

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fasta = tmp_path / "p.fa"
    fasta.write_text(">x\nMKTAYIAKQR\n>bad\nMKJ\n>y\nMKVLAAGIVG\n>x2\nMKTAYIAKQR\n")
    run_fasta([fasta], model=model, out_dir=tmp_path / "a", stage=StageOptions(progress=False))
    run_fasta([fasta], model=model, out_dir=tmp_path / "b", model_source=str(checkpoint),
              device="cpu", stage=StageOptions(progress=False, ray="local", ray_actors=1,
                                               cache=False))  # the actors compute every row
    one = torch.load(tmp_path / "a" / "p_ESM.pt", weights_only=True)
    two = torch.load(tmp_path / "b" / "p_ESM.pt", weights_only=True)
    assert one["proteins"] == two["proteins"] == ["x", "y", "x2"]
    # float32 rows from both stages (never rounded to float16 on the way); they may come
    # from other batch compositions: FFN-width reductions in every layer
    assert all(a.dtype == b.dtype == torch.float32 for a, b in zip(one["data"], two["data"],
                                                                  strict=True))
    limit = tolerance(torch.float32, terms=4 * model.embed_dim, depth=model.num_layers)
    assert all(torch.allclose(a, b, atol=limit, rtol=0) for a, b in zip(one["data"], two["data"],
                                                                        strict=True))
    assert "| bad |" in (tmp_path / "b" / "extraction_failures.log").read_text()
