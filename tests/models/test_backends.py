"""load_model's backends end to end: an HF-layout ESM2 and an ESM C checkpoint give rows
through the same embed_sequences, with the backend chosen from the path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esm2_batch.embedding.embed import embed_sequences
from esm2_batch.errors import ModelError
from esm2_batch.models import detect_backend, load_model
from esm2_batch.models.esmc import ffn_hidden_size
from tests.fakes.tiny_esm import build_random_esm2, write_tiny_checkpoint
from tests.fakes.tiny_hf import random_esmc_state, write_hf_esm2
from tests.tolerance import tolerance

PROTEINS = ["MKTAYIAKQRQISFVKSHFSRQ", "MVLSPADKTNVKAAW", "MKV"]


def test_hf_folder_gives_fair_esm_rows(tmp_path: Path) -> None:
    layers, dim = 2, 32
    module = build_random_esm2(num_layers=layers, embed_dim=dim, heads=4, seed=5)
    fair = write_tiny_checkpoint(tmp_path / "esm2_t2_fair.pt", num_layers=layers,
                                 embed_dim=dim, seed=5)
    folder = write_hf_esm2(tmp_path / "hf", module)
    assert detect_backend(folder) == "hf" and detect_backend(fair) == "fair-esm"
    hf_model = load_model(folder, device="cpu")
    assert hf_model.backend == "hf"
    want = embed_sequences(load_model(fair, device="cpu"), PROTEINS)
    got = embed_sequences(hf_model, PROTEINS)
    # fp32, another summation order: FFN-width (4 * dim) reductions in every layer
    assert (got - want).abs().max() <= tolerance(torch.float32, terms=4 * dim, depth=layers)


def test_esmc_checkpoint_embeds(tmp_path: Path) -> None:
    path = tmp_path / "esmc_tiny.pth"
    d_model, layers = 64, 2
    torch.save(random_esmc_state(d_model=d_model, n_layers=layers, seed=1), path)
    assert detect_backend(path) == "esmc"
    model = load_model(path, device="cpu")
    assert model.backend == "esmc" and model.embed_dim == d_model and model.num_layers == layers
    rows = embed_sequences(model, PROTEINS)
    assert rows.shape == (3, 64) and torch.isfinite(rows).all()
    alone = embed_sequences(model, PROTEINS[2:])
    # padding changes nothing beyond fp32 summation order (SwiGLU width, every layer)
    limit = tolerance(torch.float32, terms=ffn_hidden_size(d_model), depth=layers)
    assert (alone[0] - rows[2]).abs().max() <= limit


def test_unknown_backend_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown backend 'onnx'"):
        load_model("8M", backend="onnx")


@pytest.mark.parametrize("kind", ["hf", "esmc"])
def test_cli_writes_the_backend_into_meta(tmp_path: Path, kind: str) -> None:
    from typer.testing import CliRunner

    from esm2_batch.cli import app

    if kind == "hf":
        source = write_hf_esm2(tmp_path / "hf", build_random_esm2(num_layers=2,
                                                                  embed_dim=32, heads=4))
        dim = 32
    else:
        source = tmp_path / "esmc_tiny.pth"
        torch.save(random_esmc_state(d_model=64, n_layers=2, seed=1), source)
        dim = 64
    isoforms = tmp_path / "iso.fa"
    isoforms.write_text(">P1 gene=G1 gene_id=ENSG1 transcript=T1 canonical=1 "
                        "biotype=protein_coding\nMKTAYIAKQR\n")
    out = tmp_path / "esm_all.pt"
    result = CliRunner().invoke(app, ["--isoforms", str(isoforms), "--backend", kind,
                                      "--model_path", str(source), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["backend"] == kind and meta["embed_dim"] == dim and meta["model"]


def test_truncation_beyond_the_context_is_refused(tmp_path: Path) -> None:
    from esm2_batch.errors import InputError

    model = load_model(write_tiny_checkpoint(tmp_path, num_layers=1, embed_dim=16),
                       device="cpu")
    assert model.max_residues == 1022
    with pytest.raises(InputError, match=r"exceeds .* context of 1022 residues"):
        embed_sequences(model, ["MKV"], truncation=2000)
    esmc = tmp_path / "esmc_tiny.pth"
    torch.save(random_esmc_state(d_model=64, n_layers=1, seed=2), esmc)
    long_context = load_model(esmc, device="cpu")
    assert long_context.max_residues == 2046
    assert embed_sequences(long_context, ["MKV"], truncation=2000).shape == (1, 64)
