"""--dry_run (issue 24): the plan of a run, fetched exactly as the real run would, with
no weights loaded, nothing embedded and nothing written; and the real run's summary
showing the estimate next to the measured time."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import esm2_batch.models
import esm2_batch.run.config
from esm2_batch.cli import app
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.models import load_model
from esm2_batch.run.config import ModelOptions
from esm2_batch.run.estimate import _measured_rate, architecture_of, estimate
from esm2_batch.run.fasta_mode import run_fasta
from esm2_batch.run.stages import StageOptions
from esm2_batch.sources.fasta import read_fasta
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.fakes.tiny_esm import write_random_checkpoint

GENES = [braf(), *synthetic_genes(12, coding=2, nmd=1)]
QUERIES = [*(g.symbol for g in GENES), "NOSUCHGENE"]


@pytest.fixture
def fake() -> Iterator[FakeEnsembl]:
    server = FakeEnsembl(GENES)
    with server.running_in_thread():
        yield server


def base_flags(tmp_path: Path, fake: FakeEnsembl, checkpoint: Path, out: str) -> list[str]:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(QUERIES) + "\n")
    return ["--hvg_file", str(hvg), "--model_path", str(checkpoint), "--device", "cpu",
            "--ensembl_url", fake.url, "--rate_limit", "1000", "--out", str(tmp_path / out)]


def requests(fake: FakeEnsembl) -> tuple[Counter[str], list[str]]:
    """What the source asked for, order aside (requests run concurrently)."""
    return Counter(fake.counts), sorted(json.dumps(b, sort_keys=True) for b in fake.bodies)


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(esm2_batch.run.config, "load_model", refuse)
    monkeypatch.setattr(esm2_batch.models, "load_model", refuse)


def test_dry_run_fetches_as_the_real_run_and_writes_nothing(
        tmp_path: Path, fake: FakeEnsembl, checkpoint: Path, no_weights: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    flags = base_flags(tmp_path, fake, checkpoint, "esm_all.pt")
    saved = tmp_path / "isoforms.fa"
    result = CliRunner().invoke(app, [*flags, "--dry_run", "--save_isoforms", str(saved)])
    assert result.exit_code == 0, result.stderr
    dry = requests(fake)
    assert not (tmp_path / "esm_all.pt").exists()
    assert not (tmp_path / "esm_all.pt.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hvg.txt", "isoforms.fa"]
    out = result.stdout
    assert "dry run: nothing embedded" in out
    assert f"genes: {len(QUERIES)} in, {len(GENES)} resolved" in out
    assert "1 not found (e.g. NOSUCHGENE)" in out
    isoforms = len(read_fasta(saved))
    assert f"isoforms: {isoforms}," in out
    assert "row cache: unknown without loading the weights" in out
    assert "estimated embedding time with" in out and "measured on this cpu" in out

    monkeypatch.undo()  # the real run, for its requests and its summary
    fake.counts.clear()
    fake.bodies.clear()
    real = CliRunner().invoke(app, [*flags, "--no_cache"])
    assert real.exit_code == 0, real.stderr
    assert requests(fake) == dry
    assert "embedding time: estimated" in real.stdout and ", measured " in real.stdout


def test_json_plan_and_what_earlier_work_holds(tmp_path: Path, fake: FakeEnsembl,
                                               checkpoint: Path) -> None:
    flags = base_flags(tmp_path, fake, checkpoint, "esm_all.pt")
    assert CliRunner().invoke(app, [*flags, "--no_cache", "-q"]).exit_code == 0
    before = (tmp_path / "esm_all.pt").stat().st_mtime_ns
    result = CliRunner().invoke(app, [*flags, "--dry_run", "--json", "--no_cache"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and plan["genes_in"] == len(QUERIES)
    assert plan["not_found"] == ["NOSUCHGENE"] and plan["row_cache"] == "off"
    assert plan["tokens"] > plan["distinct_sequences"] > 0
    assert plan["estimate"]["seconds"] > 0
    assert f"holds {len(QUERIES)} of these genes" in plan["existing"][0]
    assert (tmp_path / "esm_all.pt").stat().st_mtime_ns == before


def test_fasta_dry_run(tmp_path: Path, checkpoint: Path, no_weights: None) -> None:
    fasta = tmp_path / "p.fa"
    fasta.write_text(">a\nMKTAYIAK\n>b\nMKTAYIAK\n>c\nMQQ1\n>d\n" + "A" * 1100 + "\n")
    result = CliRunner().invoke(app, ["fasta", str(fasta), "--model_path", str(checkpoint),
                                      "--device", "cpu", "--dry_run", "--json"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["distinct_sequences"] == 2 and plan["truncated"] == 1
    assert plan["tokens"] == (8 + 2) + (1022 + 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.fa"]


@pytest.mark.slow
@pytest.mark.parametrize("size", ["8M", "35M"])
def test_estimate_within_2x_of_the_real_run(tmp_path: Path, size: str) -> None:
    """Estimate and real run measured back to back in one process, so the machine's load
    is about the same for both; a shared machine's load still swings 2x from one minute
    to the next, so one unlucky pair is measured again (a fresh calibration) before the
    test fails."""
    checkpoint = write_random_checkpoint(tmp_path, size=size)
    rng = random.Random(0)
    sequences = ["M" + "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY")
                               for _ in range(rng.randint(100, 400)))
                 for _ in range(24 if size == "8M" else 12)]
    fasta = tmp_path / "s.fa"
    fasta.write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(sequences)))
    options = EmbedOptions().for_model(1022)
    arch = architecture_of(ModelOptions(model=str(checkpoint)))
    assert arch is not None
    model = load_model(checkpoint, device="cpu")
    ratios = []
    for _ in range(2):
        _measured_rate.cache_clear()
        guess = estimate(arch, [options.tokens(len(s)) for s in sequences],
                         span=options.cut + 2, device="cpu", dtype=None, engine="fast")
        began = time.perf_counter()
        run_fasta([fasta], model=model, out_dir=tmp_path, overwrite=True,
                  stage=StageOptions(progress=False, cache=False))
        ratios.append(guess.seconds / (time.perf_counter() - began))
        if 0.5 <= ratios[-1] <= 2.0:
            return
    pytest.fail(f"estimate / measured = {ratios} (not within 2x)")
