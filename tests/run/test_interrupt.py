"""Ctrl-C, SIGTERM and kill -9 mid-run, then a rerun: the file equals an uninterrupted
run's, cached genes are not fetched again, and the signals that can be handled end with one
line and exit 130 / 143 (before, a Ctrl-C once rows existed aborted with exit 134 in 4 of
5 tries: "terminate called without an active exception")."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from esm2_batch.models import load_model
from esm2_batch.run.gene_mode import partial_dir, run
from esm2_batch.store.esm_file import read_esm_file
from tests.fakes.ensembl import FakeEnsembl, synthetic_genes
from tests.fakes.tiny_esm import write_tiny_checkpoint
from tests.run.flat import make_config
from tests.run.test_gene_mode import ROOT, _cli, _single_threaded_env
from tests.tolerance import stored_tolerance

EXPECTED = {signal.SIGINT: (130, "esm2-batch: interrupted; rerun the same command to resume"),
            signal.SIGTERM: (143, "esm2-batch: terminated; rerun the same command to resume"),
            signal.SIGKILL: (-signal.SIGKILL, "")}


def _chunks(out: Path) -> int:
    rows = partial_dir(out) / "rows"
    return len(list(rows.glob("*.pt"))) if rows.is_dir() else 0


def _interrupt_once_rows_grow(args: list[str], out: Path, sig: signal.Signals) -> None:
    """Start the CLI, send `sig` once a new rows chunk appears, check how it ended."""
    before = _chunks(out)
    proc = subprocess.Popen(_cli(*args), cwd=ROOT, env=_single_threaded_env(),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _chunks(out) <= before and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    code, line = EXPECTED[sig]
    assert proc.returncode == code, stderr
    assert stderr.strip() == line
    assert not out.exists()


@pytest.mark.slow
def test_interrupted_three_ways_then_rerun_gives_the_same_file(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path, num_layers=2, embed_dim=64, heads=4)
    genes = synthetic_genes(200, coding=3, nmd=0, seed=5)
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(g.symbol for g in genes) + "\n")
    out = tmp_path / "esm_all.pt"
    server = FakeEnsembl(genes, latency=0.01)
    with server.running_in_thread() as url:
        args = ["--hvg_file", str(hvg), "--out", str(out), "--model_path", str(checkpoint),
                "--ensembl_url", url, "--rate_limit", "40", "-q", "--toks_per_batch", "1024"]
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            _interrupt_once_rows_grow(args, out, sig)
        cached = (partial_dir(out) / "isoforms.jsonl").read_text().count("\n")
        server.bodies.clear()
        done = subprocess.run(_cli(*args), cwd=ROOT, env=_single_threaded_env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        refetched = {s for _, b in server.bodies for s in b.get("symbols", [])}
        assert len(refetched) == len(genes) - cached  # cached genes are not fetched again
        clean = make_config(hvg_file=hvg, out=tmp_path / "clean.pt", ensembl_url=url,
                            rate_limit=1000.0, progress=False, toks_per_batch=1024)
        model = load_model(checkpoint, device="cpu")
        run(clean, model=model)
    resumed, reference = read_esm_file(out), read_esm_file(clean.out)
    assert not partial_dir(out).exists()
    assert resumed.genes == reference.genes and resumed.protein_ids == reference.protein_ids
    assert resumed.gene_to_isoform_indices == reference.gene_to_isoform_indices
    limit = stored_tolerance(torch.float16, magnitude=float(reference.emb.float().abs().max()),
                             terms=4 * model.embed_dim, depth=model.num_layers)
    assert (resumed.emb.float() - reference.emb.float()).abs().max() <= limit
