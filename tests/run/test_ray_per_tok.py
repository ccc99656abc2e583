"""--include per_tok on Ray: actors write residue shards into the shared store directory,
the driver adopts them; equal to one process, resumable, and refused in one line when
the workers cannot see the directory.

Marked `ray`, one local cluster for the module (starting one costs seconds); rows go to
the actors 4 at a time in windows of 8, so a handful of proteins makes several tasks,
windows and shards."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import InputError
from esm2_batch.models import LoadedModel
from esm2_batch.run import ray_cluster, ray_stage
from esm2_batch.run.config import RunConfig
from esm2_batch.run.fasta_mode import run_fasta
from esm2_batch.run.gene_mode import residues_path, run
from esm2_batch.run.stages import StageOptions
from esm2_batch.store.esm_file import read_esm_file
from esm2_batch.store.residues import INDEX_FILE, ResidueWriter, open_residues
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.run.flat import make_config, with_flags
from tests.tolerance import stored_tolerance, tolerance

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

GENES = [braf(), *synthetic_genes(3, coding=2, nmd=0)]
QUERIES = [g.symbol for g in GENES]


@pytest.fixture(autouse=True)
def small_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 rows per Ray task, windows of 8: several tasks and windows, so several shards
    from several actors, adopted while the driver is still fetching."""
    monkeypatch.setattr(ray_stage, "RayOptions", functools.partial(
        ray_stage.RayOptions, rows_per_task=4, window_rows=8))


@pytest.fixture
def config(tmp_path: Path, checkpoint: Path) -> Iterator[RunConfig]:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(QUERIES) + "\n")
    with FakeEnsembl(GENES).running_in_thread() as url:
        yield make_config(hvg_file=hvg, out=tmp_path / "ray.pt", model=str(checkpoint),
                          ensembl_url=url, rate_limit=1000.0, progress=False, ray="local",
                          ray_actors=1, toks_per_batch=2048, per_tok=True,
                          repr_layers=(1, -1))


def _same_stores(got: Path, want: Path, model: LoadedModel) -> None:
    """The same proteins with the same states at every layer, within fp32 compute in
    other batch compositions plus one fp16 rounding on each side."""
    ray_store, one = open_residues(got), open_residues(want)
    assert sorted(ray_store) == sorted(one) and ray_store.layers == one.layers == [1, 2]
    for protein in one:
        for layer in one.layers:
            a, b = ray_store.residues(protein, layer), one.residues(protein, layer)
            assert a.dtype == b.dtype == torch.float16 and a.shape == b.shape
            limit = stored_tolerance(torch.float16, magnitude=float(b.float().abs().max()),
                                     terms=4 * model.embed_dim, depth=layer)
            assert (a.float() - b.float()).abs().max() <= limit, (protein, layer)


def _named_shards(store: Path) -> list[str]:
    return list(json.loads((store / INDEX_FILE).read_text())["shards"])


def test_gene_mode_per_tok_on_ray_resumes_and_equals_one_process(
        config: RunConfig, model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-process run killed after embedding, its last shards lost (renamed but not
    yet in the index: debris), resumed on Ray: only the lost proteins are embedded, by
    actors writing shards of their own beside the first run's, and the file and the
    store equal one process's. (One Ray run: each costs seconds of actor start; the
    adopt/debris rules themselves are tests/store/test_residues.py's.)"""
    from esm2_batch.run import gene_mode

    monkeypatch.setattr(gene_mode, "ResidueWriter",  # ~one protein per shard
                        functools.partial(ResidueWriter, shard_mb=0.001))

    def crash(self: object, stage: object) -> None:
        raise KeyboardInterrupt  # after embedding, before esm_all.pt

    with monkeypatch.context() as patch:
        patch.setattr(gene_mode.GeneRun, "_finish", crash)
        with pytest.raises(KeyboardInterrupt):
            run(with_flags(config, ray=None), model=model)
    store = residues_path(config.out)
    index = json.loads((store / INDEX_FILE).read_text())
    kept = index["shards"][: len(index["shards"]) // 2]
    lost = {p for p, e in index["proteins"].items() if e["shard"] not in kept}
    index["shards"] = kept
    index["proteins"] = {p: e for p, e in index["proteins"].items() if p not in lost}
    (store / INDEX_FILE).write_text(json.dumps(index))

    resumed = run(config, model=model)
    got = read_esm_file(config.out)
    assert len(lost) >= 5 and resumed.embedded_now == len(lost)  # 2+ tasks
    assert resumed.failed == []
    assert set(got.meta["budget"]["actors"].values()) == {2048}  # as given, not re-sized
    shards = _named_shards(store)
    added = shards[len(kept):]
    assert shards[: len(kept)] == kept and all(name.startswith("ray-") for name in added)
    assert len(added) > 1  # tiny shards: the actors split their batches by size too
    # the lost shards (debris) and the probe are gone: only what the index names is left
    assert sorted(p.name for p in store.iterdir()) == sorted([*shards, INDEX_FILE])
    reference = with_flags(config, ray=None, out=config.out.with_name("single.pt"))
    run(reference, model=model)
    want = read_esm_file(reference.out)
    assert got.protein_ids == want.protein_ids
    assert got.meta["residues"] == want.meta["residues"] | {"path": "ray.residues"}
    limit = stored_tolerance(torch.float16, magnitude=float(want.emb.float().abs().max()),
                             terms=4 * model.embed_dim, depth=model.num_layers)
    assert (got.emb.float() - want.emb.float()).abs().max() <= limit
    _same_stores(store, residues_path(reference.out), model)


@pytest.mark.parametrize("seen", ["nothing", "another token"])
def test_per_tok_on_ray_without_a_shared_filesystem_is_one_line(
        tmp_path: Path, checkpoint: Path, model: LoadedModel,
        monkeypatch: pytest.MonkeyPatch, seen: str) -> None:
    """The workers really read the store directory; the probe the driver writes lands
    where they cannot see it (another filesystem), or another file is there under its
    name (a same-named directory on another machine)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def write_probe(path: Path, token: str) -> None:
        if seen == "nothing":
            (elsewhere / path.name).write_text(token)
        else:
            path.write_text("not " + token)

    monkeypatch.setattr(ray_cluster, "_write_probe", write_probe)
    fasta = tmp_path / "p.fa"
    fasta.write_text(">x\nMKTAYIAKQR\n")
    with pytest.raises(InputError) as caught:
        run_fasta([fasta], model=model, embed=EmbedOptions(per_tok=True),
                  model_source=str(checkpoint), device="cpu",
                  stage=StageOptions(progress=False, ray="local", ray_actors=1))
    message = str(caught.value)
    store = tmp_path / "p_residues"
    assert message == (f"--include per_tok with --ray: {store} is not visible to the "
                       "cluster's workers (no shared filesystem); put --out on a "
                       "filesystem every node mounts, or drop --ray")
    assert not (tmp_path / "p_ESM.pt").exists()  # nothing embedded
    assert sorted(p.name for p in store.iterdir()) == [INDEX_FILE]  # the probe removed


def test_fasta_per_tok_on_ray_equals_one_process(tmp_path: Path, checkpoint: Path,
                                                 model: LoadedModel) -> None:
    """FASTA mode's shards keep the pooled rows too: written by the actors, read back."""
    fasta = tmp_path / "p.fa"
    fasta.write_text(">x\nMKTAYIAKQR\n>bad\nMKJ\n>y\nMKVLAAGIVG\n>x2\nMKTAYIAKQR\n"
                     ">z\nACDEFGHIKLMNPQRSTVWY\n>w\nMSTNPKPQRK\n>v\nMKVLAAG\n")
    embed = EmbedOptions(per_tok=True, repr_layers=(1, -1))
    for name, stage in (("a", StageOptions(progress=False)),
                        ("b", StageOptions(progress=False, ray="local", ray_actors=1))):
        (tmp_path / name).mkdir()
        run_fasta([fasta], model=model, embed=embed, out_dir=tmp_path / name, stage=stage,
                  model_source=str(checkpoint), device="cpu")
    one = torch.load(tmp_path / "a" / "p_ESM.pt", weights_only=True)
    two = torch.load(tmp_path / "b" / "p_ESM.pt", weights_only=True)
    assert one["proteins"] == two["proteins"] == ["x", "y", "x2", "z", "w", "v"]
    limit = tolerance(torch.float32, terms=4 * model.embed_dim, depth=model.num_layers)
    for key in ("data", "data_mean_layer2"):
        assert all(torch.allclose(a, b, atol=limit, rtol=0)
                   for a, b in zip(one[key], two[key], strict=True))
    _same_stores(tmp_path / "b" / "p_residues", tmp_path / "a" / "p_residues", model)
    from safetensors import safe_open

    store = tmp_path / "b" / "p_residues"
    rows = []  # the rows a resumed file reuses, kept by the actors beside the states
    for shard in _named_shards(store):
        with safe_open(str(store / shard), framework="pt") as tensors:
            rows += [tensors.get_tensor(n) for n in tensors.keys() if n.endswith("/row")]  # noqa: SIM118
    assert len(rows) == 5 and all(r.dtype == torch.float32 for r in rows)
