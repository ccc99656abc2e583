"""Hugging Face ESM2 folders exactly as the installed transformers writes them.

tests/models/test_hf_esm2.py builds its folders with a hand-written key map; here the
folders come from transformers' own ``save_pretrained`` of a tiny random EsmConfig, so
whatever the installed version writes (5.24: LayerNorm ``gamma``/``beta``, the shared
rotary buffer under a literal ``encoder.layer.*.attention.self.rotary_embeddings.inv_freq``,
no tied decoder, no position_ids) must load through ``load_model(folder)`` and give
transformers' own rows (EsmModel with the attention mask, mean over residues) and
fair-esm's (the reference engine is fair-esm's ESM2.forward on the renamed weights).
transformers is a test-only reference (the [test] extra): skipped where absent.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from esm2_batch.embedding.embed import embed_sequences
from esm2_batch.errors import ModelError
from esm2_batch.models import detect_backend, load_model
from esm2_batch.models.weights import read_weights_file, weight_names
from tests.fakes.tiny_hf import write_safetensors
from tests.tolerance import tolerance

transformers = pytest.importorskip("transformers")

LAYERS, EMBED, HEADS = 2, 64, 2
# fp32, different summation order (SDPA vs bmm, fused vs split QKV): reductions over the
# FFN width (4 * EMBED), every layer
TOLERANCE = tolerance(torch.float32, terms=4 * EMBED, depth=LAYERS)
AMINO = "ACDEFGHIKLMNPQRSTVWY"
PROTEINS = ["M", "MKXU", *("".join(random.Random(i).choices(AMINO, k=20 + 37 * i))
                           for i in range(4)), "".join(random.Random(9).choices(AMINO, k=300))]


def _config() -> Any:
    return transformers.EsmConfig(
        vocab_size=33, hidden_size=EMBED, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=4 * EMBED, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=1026, layer_norm_eps=1e-5, position_embedding_type="rotary",
        emb_layer_norm_before=False, token_dropout=True, pad_token_id=1, mask_token_id=32)


def _random(cls_name: str) -> Any:
    """A tiny transformers ESM2 with random LayerNorms, biases and fp16-rounded rotary
    frequencies (as the published checkpoints carry them)."""
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(_config()).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("inv_freq"):
                tensor.copy_(tensor.half().float())
            elif "LayerNorm.weight" in name or "layer_norm.weight" in name:
                tensor.copy_(1 + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith(".bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model


def _save(model: Any, folder: Path, how: str) -> Path:
    """save_pretrained with or without safetensors, or the bare state dict as
    pytorch_model.bin (what transformers 4 wrote, module names as they are today)."""
    if how == "state_dict_bin":
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, safe_serialization=how == "safetensors")
    return folder


def _transformers_rows(folder: Path, sequences: list[str]) -> torch.Tensor:
    """transformers' EsmModel on the folder, with the attention mask: mean over residues."""
    model = transformers.EsmModel.from_pretrained(folder, add_pooling_layer=False).eval()
    alphabet = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
    rows = []
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor([[0, *(4 + alphabet.index(a) for a in sequence), 2]])
            states = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            rows.append(states[0, 1 : len(sequence) + 1].mean(0))
    return torch.stack(rows)


@pytest.fixture(scope="module", params=["EsmForMaskedLM", "EsmModel"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    """One folder per way of saving, for each class."""
    model = _random(request.param)
    root = tmp_path_factory.mktemp(request.param)
    return {how: _save(model, root / how, how)
            for how in ("safetensors", "no_safetensors", "state_dict_bin")}


@pytest.mark.parametrize("how", ["safetensors", "no_safetensors", "state_dict_bin"])
def test_save_pretrained_folder_gives_transformers_and_fair_esm_rows(
    saved: dict[str, Path], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = saved[how]
    assert detect_backend(folder) == "hf"
    want = _transformers_rows(folder, PROTEINS)
    for engine in ("reference", "fast"):  # reference: fair-esm's own ESM2.forward
        loaded = load_model(folder, device="cpu", engine=engine)
        assert loaded.backend == "hf" and loaded.max_residues == 1022
        rows = embed_sequences(loaded, PROTEINS)
        assert isinstance(rows, torch.Tensor)
        assert (rows - want).abs().max().item() <= TOLERANCE, (how, engine)


def test_the_installed_version_layout_is_what_is_tested(saved: dict[str, Path]) -> None:
    """Documents what save_pretrained wrote (transformers 5.24: gamma/beta and the "*"
    rotary key); the loading tests above hold whatever it is."""
    folder = saved["safetensors"]
    names = weight_names(folder / "model.safetensors")
    assert any(n.endswith("attention.self.query.weight") for n in names)
    if transformers.__version__.startswith("5.24"):
        assert any(n.endswith("LayerNorm.gamma") for n in names)
        assert any("encoder.layer.*." in n for n in names)


def test_unknown_key_next_to_saved_ones_is_one_line(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    source = saved["safetensors"]
    state = read_weights_file(source / "model.safetensors")
    state["encoder.layer.0.attention.self.bogus.gamma"] = torch.zeros(2)
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(ModelError, match="unexpected weights for an ESM2") as caught:
        load_model(tmp_path, device="cpu")
    assert "\n" not in str(caught.value) and "bogus" in str(caught.value)


def test_same_weight_under_both_names_is_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    source = saved["safetensors"]
    state = read_weights_file(source / "model.safetensors")
    gamma = next(n for n in state if n.endswith("LayerNorm.gamma"))
    state[gamma.removesuffix("gamma") + "weight"] = state[gamma].clone()
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(ModelError, match="stored twice") as caught:
        load_model(tmp_path, device="cpu")
    assert "\n" not in str(caught.value)
