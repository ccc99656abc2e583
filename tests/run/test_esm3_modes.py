"""--backend esm3 through the commands users run: gene mode (from an isoforms FASTA, no
network) and FASTA mode, on the tiny ESM3 whose parity with the official code
tests/models/test_esm3.py checks."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.embedding.embed import embed_sequences
from esm2_batch.models import load_model
from esm2_batch.store.esm_file import read_esm_file
from tests.tolerance import stored_tolerance, tolerance

WEIGHTS = Path(__file__).parents[1] / "fixtures" / "esm3" / "esm3_tiny.pth"
SEQUENCES = {"P1": "MKTAYIAKQRQISFVKSHFSRQ", "P2": "MKVLAAGIVGLLLA", "P3": "MSEQUENCEW"}
runner = CliRunner()


def test_esm3_in_gene_mode_and_fasta_mode(tmp_path: Path) -> None:
    isoforms = tmp_path / "isoforms.fa"
    isoforms.write_text("".join(
        f">{pid} gene=G{i} gene_id=ENSG{i:011d} transcript=ENST{i:011d} canonical=1 "
        f"biotype=protein_coding\n{seq}\n" for i, (pid, seq) in enumerate(SEQUENCES.items())))
    out = tmp_path / "esm_all.pt"
    gene = runner.invoke(app, ["--isoforms", str(isoforms), "--out", str(out), "--model_path",
                               str(WEIGHTS), "--backend", "esm3", "--device", "cpu", "-q"])
    assert gene.exit_code == 0, gene.stderr
    fasta = tmp_path / "prots.fa"
    fasta.write_text("".join(f">{pid}\n{seq}\n" for pid, seq in SEQUENCES.items()))
    mode = runner.invoke(app, ["fasta", str(fasta), "--model_path", str(WEIGHTS), "--backend",
                               "esm3", "--device", "cpu", "-q"])
    assert mode.exit_code == 0, mode.stderr
    model = load_model(WEIGHTS, device="cpu", backend="esm3")
    expected = embed_sequences(model, list(SEQUENCES.values()))
    assert isinstance(expected, torch.Tensor)
    esm = read_esm_file(out)
    assert esm.meta["backend"] == "esm3" and esm.protein_ids == list(SEQUENCES)
    # other batch compositions (SwiGLU width 2 x 256, 3 blocks), then float16 storage
    magnitude = float(expected.abs().max())
    assert (esm.emb.float() - expected).abs().max() <= stored_tolerance(
        torch.float16, magnitude=magnitude, terms=512, depth=3)
    data = torch.load(tmp_path / "prots_ESM.pt", weights_only=True)
    assert data["proteins"] == list(SEQUENCES)
    assert (torch.stack(data["data"]) - expected).abs().max() <= tolerance(
        torch.float32, terms=512, depth=3, magnitude=magnitude)
