"""ESM3's sequence track (backend esm3) against EvolutionaryScale's own implementation.

tests/fixtures/esm3/ holds a tiny random ESM3 in the original key layout and the
``embeddings`` that the official package (esm 3.2.1.post1, in a separate virtual
environment: make_goldens.py, SOURCES.md) returns for ten sequences through
``ESM3.encode`` + ``ESM3.logits(return_embeddings=True)``. The project never imports it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import esm
import pytest
import torch

from esm2_batch.embedding.embed import embed_sequences
from esm2_batch.errors import ModelError
from esm2_batch.models import detect_backend, load_model, representations
from esm2_batch.models.weights import read_safetensors
from tests.fakes.tiny_hf import add_to_hf_cache
from tests.tolerance import tolerance

FIXTURE = Path(__file__).parents[1] / "fixtures" / "esm3"
WEIGHTS = FIXTURE / "esm3_tiny.pth"
PARITY = 1e-5
"""The issue's bound for fp32 (|states| up to 4.3 here; measured 2.4e-6)."""
# padded vs alone: the same function, another summation order; widest reduction is the
# SwiGLU's 2 x 256, 3 blocks, states up to ~5
PADDING = tolerance(torch.float32, terms=512, depth=3, magnitude=5.0)


@pytest.fixture(scope="module")
def sequences() -> list[str]:
    found: list[str] = json.loads((FIXTURE / "goldens.json").read_text())["sequences"]
    return found


@pytest.fixture(scope="module")
def goldens() -> dict[str, torch.Tensor]:
    return read_safetensors(FIXTURE / "goldens.safetensors")


def _tokens(sequence: str) -> torch.Tensor:
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    return torch.tensor([[alphabet.cls_idx, *map(alphabet.get_idx, sequence), alphabet.eos_idx]])


def test_embeddings_match_the_official_package(
    sequences: list[str], goldens: dict[str, torch.Tensor]
) -> None:
    loaded = load_model(WEIGHTS, device="cpu")
    assert loaded.backend == "esm3" and loaded.embed_dim == 64 and loaded.num_layers == 3
    assert loaded.max_residues == 2046
    with torch.no_grad():
        for i, sequence in enumerate(sequences):
            tokens = _tokens(sequence)
            assert torch.equal(tokens[0], goldens[f"tokens.{i}"]), i  # same token ids
            states = representations(loaded, tokens, layer=loaded.num_layers)[0]
            assert (states - goldens[f"embeddings.{i}"]).abs().max().item() <= PARITY, i


def test_rows_and_per_residue_through_the_embedder(
    sequences: list[str], goldens: dict[str, torch.Tensor]
) -> None:
    """Padded batches (mean and per residue) give the seed's embedding[0, 1:-1]."""
    loaded = load_model(WEIGHTS, device="cpu", backend="esm3")
    per_residue = embed_sequences(loaded, sequences, pooling="per_residue", truncation=2046)
    rows = embed_sequences(loaded, sequences, truncation=2046)
    assert isinstance(per_residue, list) and isinstance(rows, torch.Tensor)
    for i, sequence in enumerate(sequences):
        want = goldens[f"embeddings.{i}"][1 : len(sequence) + 1]
        assert (per_residue[i] - want).abs().max().item() <= PARITY + PADDING, i
        assert (rows[i] - want.mean(0)).abs().max().item() <= PARITY + PADDING, i


def test_detection_folder_and_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The .pth itself, the model repository's layout (data/weights/), its hub id."""
    assert detect_backend(WEIGHTS) == "esm3"
    repo = tmp_path / "esm3-sm-open-v1"
    (repo / "data" / "weights").mkdir(parents=True)
    shutil.copy(WEIGHTS, repo / "data" / "weights" / "esm3_sm_open_v1.pth")
    assert detect_backend(repo) == "esm3"
    assert load_model(repo, device="cpu").num_layers == 3
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(WEIGHTS, flat / "esm3_sm_open_v1.pth")
    snapshot = add_to_hf_cache(tmp_path / "hub", "EvolutionaryScale/esm3-sm-open-v1", flat)
    (snapshot / "esm3_sm_open_v1.pth").unlink()  # the repository keeps it in data/weights/
    (snapshot / "data" / "weights").mkdir(parents=True)
    shutil.copy(WEIGHTS, snapshot / "data" / "weights" / "esm3_sm_open_v1.pth")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert detect_backend("EvolutionaryScale/esm3-sm-open-v1") == "esm3"
    assert load_model("EvolutionaryScale/esm3-sm-open-v1", device="cpu").backend == "esm3"


def test_strict_one_line_errors(tmp_path: Path) -> None:
    state = torch.load(WEIGHTS, weights_only=True)
    cases = {
        "missing": ({k: v for k, v in state.items() if "geom_attn.proj" not in k}, "missing"),
        "extra": ({**state, "transformer.blocks.0.bogus.weight": torch.zeros(1)}, "unexpected"),
        "shape": ({**state, "transformer.norm.weight": torch.zeros(3)}, "has shape"),
    }
    for name, (broken, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(broken, path)
        with pytest.raises(ModelError, match=message) as caught:
            load_model(path, device="cpu", backend="esm3")
        assert "\n" not in str(caught.value) and str(path) in str(caught.value), name
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "absent.pth", device="cpu", backend="esm3")
