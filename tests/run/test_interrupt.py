"""Ctrl-C, SIGTERM and kill -9 mid-run, then a rerun: the file equals an uninterrupted
run's, cached genes are not fetched again, and the signals that can be handled end with one
line and exit 130 / 143 (before, a Ctrl-C once rows existed aborted with exit 134 in 4 of
5 tries: "terminate called without an active exception").

And nothing embedded is lost to a handled signal: a run held after its embedder produced
30 rows (tests/run/gated_cli.py), far fewer than a 256-row flush, keeps them all, and the
rerun embeds only the rest. Before, it kept none: Python 3.11's Thread.join, interrupted
by the signal, marked the still running embedding thread as ended, so the run exited
without waiting for it to hand its rows to the store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.embedding.embed import Embedded, SequenceInput
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.models import LoadedModel, load_model
from esm2_batch.records import GeneIsoforms, Isoform
from esm2_batch.run import stages
from esm2_batch.run.fasta_mode import run_fasta
from esm2_batch.run.gene_mode import partial_dir, run
from esm2_batch.run.stages import StageOptions
from esm2_batch.sources.isoforms_fasta import write_isoforms_fasta
from esm2_batch.store.cache import RowCache
from esm2_batch.store.esm_file import read_esm_file
from tests.fakes.ensembl import FakeEnsembl, synthetic_genes
from tests.fakes.tiny_esm import write_tiny_checkpoint
from tests.run.flat import make_config
from tests.run.test_gene_mode import ROOT, _single_threaded_env
from tests.tolerance import stored_tolerance, tolerance

EXPECTED = {signal.SIGINT: (130, "esm2-batch: interrupted; rerun the same command to resume"),
            signal.SIGTERM: (143, "esm2-batch: terminated; rerun the same command to resume"),
            signal.SIGKILL: (-signal.SIGKILL, "")}


def _signal_when(command: list[str], ready: Callable[[], bool], sig: signal.Signals, *,
                 wait_s: float, why: str) -> None:
    """Run `command`, send `sig` once `ready()` (an event the run wrote, polled), and check
    the one line and exit code the signal must give."""
    proc = subprocess.Popen(command, cwd=ROOT, env=_single_threaded_env(),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, why
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=wait_s)
    code, line = EXPECTED[sig]
    assert proc.returncode == code, stderr
    assert stderr.strip() == line


# -- nothing embedded is lost to a handled signal --------------------------------------------
HOLD = 30
"""Rows the embedder has handed over when the test interrupts: far below a 256-row flush."""


@dataclass(frozen=True)
class Inputs:
    """A gene list with its isoforms in a FASTA (no Ensembl, so fetching ends at once and
    the run waits on its embedder, where the interrupt comes), and a tiny model."""

    checkpoint: Path
    hvg: Path
    isoforms: Path
    sequences: int  # distinct protein sequences, all to be embedded


def gene_inputs(tmp_path: Path, genes: int = 40) -> Inputs:
    checkpoint = write_tiny_checkpoint(tmp_path, num_layers=2, embed_dim=32, heads=4)
    records = [GeneIsoforms(
        query=g.symbol, gene_id=g.gene_id, symbol=g.symbol, status="ok",
        isoforms=tuple(Isoform(str(t.protein_id), t.transcript_id, g.gene_id,
                               str(t.sequence), t.is_canonical, t.biotype)
                       for t in g.transcripts))
        for g in synthetic_genes(genes, coding=3, nmd=0, seed=11)]
    isoforms, hvg = tmp_path / "isoforms.fa", tmp_path / "hvg.txt"
    written = write_isoforms_fasta(isoforms, records)
    hvg.write_text("".join(r.query + "\n" for r in records))
    sequences = {i.sequence for r in records for i in r.isoforms}
    assert len(sequences) == written  # random sequences: no two alike
    return Inputs(checkpoint, hvg, isoforms, written)


def gated(log: Path, *args: str, hold: int = 0) -> list[str]:
    """The CLI with its embedder logged to `log` (and held after `hold` rows)."""
    return [sys.executable, "-m", "tests.run.gated_cli", str(log), "--hold", str(hold),
            "--", *args]


def logged(log: Path, kind: str) -> list[str]:
    """The names `log` lists under `kind` ("asked": sent to the embedder; "row": rows
    the stage took from it)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split(" ", 1)[1] for line in lines if line.startswith(kind + " ")]


def interrupt_when_held(args: list[str], log: Path, sig: signal.Signals) -> None:
    """Run the held CLI, send `sig` once it holds, check the one line and exit code."""
    _signal_when(gated(log, *args, hold=HOLD), lambda: logged(log, "held"), sig, wait_s=120,
                 why="the run ended before it was held")


def stored_keys(out: Path) -> set[str]:
    """The keys of every rows chunk of `out`'s partial store (each one loads: none torn)."""
    chunks = sorted((partial_dir(out) / "rows").iterdir())
    assert all(chunk.suffix == ".pt" for chunk in chunks)  # no temporary file left
    return {key for chunk in chunks for key in torch.load(chunk, weights_only=True)["keys"]}


def embedded_by(args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], str]:
    """Run the CLI in this process (it ends normally); the names of the sequences it sent
    to the embedder, and its stdout."""
    asked: list[str] = []
    original = stages.embed_rows

    def counting(model: LoadedModel, sequences: Sequence[SequenceInput],
                 options: EmbedOptions) -> Iterator[Embedded]:
        asked.extend(str(item[0]) if isinstance(item, tuple) else item for item in sequences)
        return original(model, sequences, options)

    monkeypatch.setattr(stages, "embed_rows", counting)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return asked, result.stdout


@pytest.mark.slow
def test_interrupted_three_ways_then_rerun_gives_the_same_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run is interrupted once its embedder has handed over HOLD rows (an event, so
    no run can finish first however slow the machine), far fewer than a 256-row flush:
    Ctrl-C, then SIGTERM, each keeping every row it embedded, then kill -9 (whose rows
    since the last flush are lost, and only recomputed)."""
    checkpoint = write_tiny_checkpoint(tmp_path, num_layers=2, embed_dim=32, heads=4)
    genes = synthetic_genes(60, coding=3, nmd=0, seed=5)  # 180 rows: 3 x HOLD never ends it
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(g.symbol for g in genes) + "\n")
    out = tmp_path / "esm_all.pt"
    server = FakeEnsembl(genes, latency=0.01)
    with server.running_in_thread() as url:
        args = ["--hvg_file", str(hvg), "--out", str(out), "--model_path", str(checkpoint),
                "--ensembl_url", url, "--rate_limit", "40", "-q", "--toks_per_batch", "1024",
                "--no_cache"]  # no row cache: the partial store alone must keep the rows
        kept: set[str] = set()
        for run_number, sig in enumerate((signal.SIGINT, signal.SIGTERM, signal.SIGKILL)):
            log = tmp_path / f"run{run_number}.log"
            interrupt_when_held(args, log, sig)
            assert not out.exists()
            before, kept = kept, stored_keys(out)
            assert kept >= before  # nothing stored is lost
            if sig != signal.SIGKILL:  # a handled signal keeps every row it took
                assert len(kept) >= len(before) + len(logged(log, "row")) >= HOLD
        cached = (partial_dir(out) / "isoforms.jsonl").read_text().count("\n")
        server.bodies.clear()
        asked, _ = embedded_by(args, monkeypatch)
        refetched = {s for _, b in server.bodies for s in b.get("symbols", [])}
        assert len(refetched) == len(genes) - cached  # cached genes are not fetched again
        assert len(asked) == 3 * len(genes) - len(kept)  # kept rows are not embedded again
        clean = make_config(hvg_file=hvg, out=tmp_path / "clean.pt", ensembl_url=url,
                            rate_limit=1000.0, progress=False, toks_per_batch=1024,
                            cache=False)
        model = load_model(checkpoint, device="cpu")
        run(clean, model=model)
    resumed, reference = read_esm_file(out), read_esm_file(clean.out)
    assert not partial_dir(out).exists()
    assert resumed.genes == reference.genes and resumed.protein_ids == reference.protein_ids
    assert resumed.gene_to_isoform_indices == reference.gene_to_isoform_indices
    limit = stored_tolerance(torch.float16, magnitude=float(reference.emb.float().abs().max()),
                             terms=4 * model.embed_dim, depth=model.num_layers)
    assert (resumed.emb.float() - reference.emb.float()).abs().max() <= limit


@pytest.mark.slow
def test_fasta_mode_keeps_every_row_embedded_before_ctrl_c_in_the_row_cache(
        tmp_path: Path, own_row_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FASTA mode writes each input's file at its end; what an interrupt must not lose
    are the rows embedded so far, and those are in the row cache (store/cache.py)."""
    inputs = gene_inputs(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["fasta", str(inputs.isoforms), "--out_dir", str(out_dir), "--model_path",
            str(inputs.checkpoint), "--toks_per_batch", "1024"]
    interrupt_when_held([*args, "-q"], tmp_path / "first.log", signal.SIGINT)
    assert not list(out_dir.iterdir())
    with RowCache(own_row_cache) as cache:
        kept = cache.info().rows
    assert kept >= len(logged(tmp_path / "first.log", "row")) >= HOLD

    asked, stdout = embedded_by(args, monkeypatch)
    assert len(asked) == inputs.sequences - kept  # the rest, and only the rest
    assert f"({kept} rows from the row cache)" in stdout
    model = load_model(inputs.checkpoint, device="cpu")
    reference = tmp_path / "reference"
    reference.mkdir()
    [result] = run_fasta([inputs.isoforms], model=model, out_dir=reference,
                         stage=StageOptions(progress=False, cache=False))
    resumed = torch.load(out_dir / result.out.name, weights_only=True)
    expected = torch.load(result.out, weights_only=True)
    assert resumed["proteins"] == expected["proteins"]
    limit = tolerance(torch.float32, terms=4 * model.embed_dim, depth=model.num_layers,
                      magnitude=max(float(r.abs().max()) for r in expected["data"]))
    for got, want in zip(resumed["data"], expected["data"], strict=True):
        assert (got - want).abs().max() <= limit


def assert_equals_a_clean_run(inputs: Inputs, out: Path, clean_out: Path) -> None:
    """The resumed esm_all.pt at `out` equals an uninterrupted run of the same inputs:
    the same rows in the same order, values within float16 storage of the same compute."""
    clean = make_config(hvg_file=inputs.hvg, isoforms=inputs.isoforms, out=clean_out,
                        progress=False, toks_per_batch=1024, cache=False)
    model = load_model(inputs.checkpoint, device="cpu")
    run(clean, model=model)
    resumed, reference = read_esm_file(out), read_esm_file(clean.out)
    assert not partial_dir(out).exists()
    assert resumed.protein_ids == reference.protein_ids
    assert resumed.gene_to_isoform_indices == reference.gene_to_isoform_indices
    limit = stored_tolerance(torch.float16, magnitude=float(reference.emb.float().abs().max()),
                             terms=4 * model.embed_dim, depth=model.num_layers)
    assert (resumed.emb.float() - reference.emb.float()).abs().max() <= limit
