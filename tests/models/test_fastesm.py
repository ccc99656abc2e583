"""FastESM2 (Synthyra's FastPLMs, ``model_type: fast_esm``) through backend hf / fastesm.

tests/fixtures/fastesm/ holds a tiny random FastESM written by FastPLMs' own
``FastEsmForMaskedLM.save_pretrained`` and the outputs of FastPLMs' own ``FastEsmModel``
on it (make_goldens.py ran in a separate virtual environment; SOURCES.md names the
commit). The project never imports FastPLMs: the goldens are the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import esm
import pytest
import torch

from esm2_batch.embedding.embed import embed_sequences
from esm2_batch.errors import InputError, ModelError
from esm2_batch.models import detect_backend, load_model, representations
from esm2_batch.models.weights import read_safetensors
from tests.fakes.tiny_esm import build_random_esm2
from tests.fakes.tiny_hf import add_to_hf_cache, write_hf_esm2
from tests.tolerance import tolerance

FIXTURE = Path(__file__).parents[1] / "fixtures" / "fastesm"
FOLDER = FIXTURE / "model"
LAYERS, EMBED = 2, 32
# fp32, a different implementation (fair-esm's / the fast engine vs FastPLMs' SDPA):
# reductions over the FFN width (4 * EMBED), every layer
TOLERANCE = tolerance(torch.float32, terms=4 * EMBED, depth=LAYERS)
CONTEXT = 2046


@pytest.fixture(scope="module")
def sequences() -> list[str]:
    found: list[str] = json.loads((FIXTURE / "goldens.json").read_text())["sequences"]
    assert max(map(len, found)) > 1022  # beyond ESM2's context, within FastESM2's
    return found


@pytest.fixture(scope="module")
def goldens() -> dict[str, torch.Tensor]:
    return read_safetensors(FIXTURE / "goldens.safetensors")


def _tokens(sequence: str) -> torch.Tensor:
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    return torch.tensor([[alphabet.cls_idx, *map(alphabet.get_idx, sequence), alphabet.eos_idx]])


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_states_match_fastplms(
    engine: str, sequences: list[str], goldens: dict[str, torch.Tensor]
) -> None:
    loaded = load_model(FOLDER, device="cpu", engine=engine)  # type: ignore[arg-type]
    assert loaded.backend == "hf" and loaded.max_residues == CONTEXT
    with torch.no_grad():
        for i, sequence in enumerate(sequences):
            states = representations(loaded, _tokens(sequence), layer=loaded.num_layers)[0]
            assert (states - goldens[f"states.{i}"]).abs().max().item() <= TOLERANCE, i


@pytest.mark.parametrize("long_seqs", ["truncate", "window"])
def test_rows_use_the_models_own_context(
    long_seqs: str, sequences: list[str], goldens: dict[str, torch.Tensor]
) -> None:
    """The 1,100-residue protein is one piece at FastESM2's 2,046 (one ESM2 window would
    be 1,022): rows equal FastPLMs' alone and in its padded batch."""
    loaded = load_model(FOLDER, device="cpu", backend="fastesm")
    rows = embed_sequences(loaded, sequences,  # no truncation given: the model's context
                           long_seqs=long_seqs)  # type: ignore[arg-type]
    assert isinstance(rows, torch.Tensor)
    assert (rows - goldens["rows"]).abs().max().item() <= TOLERANCE
    assert (rows - goldens["batch_rows"]).abs().max().item() <= TOLERANCE
    with pytest.raises(InputError, match="2046 residues"):
        embed_sequences(loaded, sequences[:1], truncation=CONTEXT + 1)


def test_hub_id_in_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_to_hf_cache(tmp_path / "hub", "Synthyra/FastESM2_tiny", FOLDER)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert detect_backend("Synthyra/FastESM2_tiny") == "hf"
    loaded = load_model("Synthyra/FastESM2_tiny", device="cpu", backend="fastesm")
    assert loaded.name == "FastESM2_tiny" and loaded.max_residues == CONTEXT


def test_fastesm_backend_refuses_a_plain_esm2(tmp_path: Path) -> None:
    plain = write_hf_esm2(tmp_path / "esm2", build_random_esm2(num_layers=1, embed_dim=32,
                                                               heads=2, seed=0))
    assert load_model(plain, device="cpu").max_residues == 1022
    with pytest.raises(ModelError, match="not a FastESM model") as caught:
        load_model(plain, device="cpu", backend="fastesm")
    assert "\n" not in str(caught.value)
