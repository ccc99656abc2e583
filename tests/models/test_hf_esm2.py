"""ESM2 in the Hugging Face layout: the key map back to fair-esm's official layout, the rows
it gives, the local HF cache, and strict one-line errors.

A tiny random fair-esm ESM2 (LayerNorms randomised, rotary inv_freq rounded through fp16
as the published checkpoints carry it) is written as an HF folder by tests/fakes/tiny_hf.py
and read back. Where installed (the [test] extra), transformers' EsmModel on the same folder
is the independent check, and the safetensors package checks the hand-written reader.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import esm
import pytest
import torch
from esm.model.esm2 import ESM2

from esm2_batch.embedding.embed import embed_sequences
from esm2_batch.errors import ModelError
from esm2_batch.models import fair_esm, load_model
from esm2_batch.models.esm2_fast import FastESM2
from esm2_batch.models.hf_esm2 import hf_model_name, is_hf_esm2_dir, read_hf_esm2
from esm2_batch.models.weights import (
    find_in_hf_cache,
    hf_cache_dir,
    looks_like_hub_id,
    read_safetensors,
)
from tests.fakes.tiny_esm import build_random_esm2, official_layout
from tests.fakes.tiny_hf import (
    add_to_hf_cache,
    hf_esm2_state,
    random_esmc_state,
    randomize_norms,
    round_inv_freq,
    write_hf_esm2,
    write_hf_esmc,
    write_safetensors,
    write_weights,
)
from tests.tolerance import tolerance

LAYERS, EMBED, HEADS = 3, 64, 2  # 32-wide heads: 16 rotary frequencies, most rounded
# fp32, different summation order: reductions over the FFN width (4 * EMBED), every layer
TOLERANCE = tolerance(torch.float32, terms=4 * EMBED, depth=LAYERS)
AMINO = "ACDEFGHIKLMNPQRSTVWY"
HUB_ID = "facebook/esm2_t3_tiny_UR50D"


@pytest.fixture(scope="module")
def esm2() -> ESM2:
    """fair-esm's own module: random weights and norms, fp16-rounded inv_freq."""
    module = build_random_esm2(num_layers=LAYERS, embed_dim=EMBED, heads=HEADS, seed=0)
    return round_inv_freq(randomize_norms(module)).eval()  # type: ignore[return-value]


@pytest.fixture(scope="module")
def folder(esm2: ESM2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_esm2(tmp_path_factory.mktemp("hf") / "esm2_t3_tiny_UR50D", esm2)


@pytest.fixture(scope="module")
def proteins() -> list[str]:
    rng = random.Random(5)
    return ["M", "MKV", *("".join(rng.choices(AMINO, k=rng.randint(4, 90))) for _ in range(5)),
            "".join(rng.choices(AMINO, k=300))]


def tokenize(sequences: list[str]) -> torch.Tensor:
    """(B, T) padded tokens from fair-esm's own batch converter."""
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    _, _, tokens = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
    return tokens


def fair_states(module: ESM2, tokens: torch.Tensor, layer: int = LAYERS) -> torch.Tensor:
    """fair-esm's forward: (B, T, E) states after `layer`."""
    with torch.no_grad():
        return module(tokens, repr_layers=[layer])["representations"][layer]


def mean_rows(states: torch.Tensor, sequences: list[str]) -> torch.Tensor:
    """esm-extract's pooling: t[i, 1 : n + 1].mean(0) per sequence."""
    return torch.stack([states[i, 1 : len(s) + 1].mean(0) for i, s in enumerate(sequences)])


def build(data: dict[str, object], where: Path) -> ESM2:
    """The project's loader on a converted dict (fair-esm's loader, strict about keys)."""
    module, _ = fair_esm.build_module("esm2_t3_tiny_UR50D", data, where)
    return module.eval()


# --------------------------------------------------------------------------------------
# The key map
# --------------------------------------------------------------------------------------


def _assert_official(data: dict[str, object], module: ESM2, *, skip: tuple[str, ...] = ()) -> None:
    want = official_layout(module)
    got_state, want_state = data["model"], want["model"]
    assert isinstance(got_state, dict) and isinstance(want_state, dict)
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        if not key.startswith(skip):
            assert torch.equal(got_state[key], value), key
    assert vars(data["cfg"]["model"]) == vars(want["cfg"]["model"])  # type: ignore[index]


@pytest.mark.parametrize("weights", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("inv_freq", ["per_layer", "model"])
def test_round_trip_is_the_official_layout(
    esm2: ESM2, tmp_path: Path, weights: str, inv_freq: str
) -> None:
    """EsmForMaskedLM files (esm. prefix), rotary buffers per layer (hub files) or once
    (transformers >= 5): exactly fair-esm's published dict, rounded inv_freq included."""
    write_hf_esm2(tmp_path, esm2, weights=weights, inv_freq=inv_freq)  # type: ignore[arg-type]
    _assert_official(read_hf_esm2(tmp_path), esm2)


def test_esm_model_file_without_prefix_or_lm_head(esm2: ESM2, tmp_path: Path) -> None:
    """EsmModel saved directly: no esm. prefix, no LM head, a pooler (dropped). The LM head
    fair-esm requires is tied to the embeddings; the rest of it is neutral."""
    write_hf_esm2(tmp_path, esm2, prefix="", lm_head=False)
    data = read_hf_esm2(tmp_path)
    _assert_official(data, esm2, skip=("encoder.lm_head.",))
    state = data["model"]
    assert torch.equal(state["encoder.lm_head.weight"], esm2.embed_tokens.weight)
    build(data, tmp_path)  # fair-esm's loader accepts it


def test_checkpoint_inv_freq_is_kept(esm2: ESM2, folder: Path) -> None:
    state = read_hf_esm2(folder)["model"]
    recomputed = 1.0 / (10000 ** (torch.arange(0, EMBED // HEADS, 2).float() / (EMBED // HEADS)))
    for layer in range(LAYERS):
        kept = state[f"encoder.sentence_encoder.layers.{layer}.self_attn.rot_emb.inv_freq"]
        assert kept.dtype == torch.float32
        assert torch.equal(kept, esm2.layers[layer].self_attn.rot_emb.inv_freq)
        assert not torch.equal(kept, recomputed)  # the fixture really is rounded


def test_inv_freq_recomputed_only_when_absent(tmp_path: Path) -> None:
    plain = build_random_esm2(num_layers=2, embed_dim=EMBED, heads=HEADS, seed=4)
    write_hf_esm2(tmp_path, plain, inv_freq="none")
    _assert_official(read_hf_esm2(tmp_path), plain)


# --------------------------------------------------------------------------------------
# Rows: the converted model is fair-esm's model
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [LAYERS, 1])
def test_rows_match_fair_esm(esm2: ESM2, folder: Path, proteins: list[str], layer: int) -> None:
    converted = build(read_hf_esm2(folder), folder)
    tokens = tokenize(proteins)
    want = mean_rows(fair_states(esm2, tokens, layer), proteins)
    got = mean_rows(fair_states(converted, tokens, layer), proteins)
    assert (got - want).abs().max().item() <= TOLERANCE
    fast = FastESM2.from_fair_esm(converted)  # fp32 module: its own inv_freq buffers
    engine = mean_rows(fast(tokens, layer=layer), proteins)
    assert (engine - want).abs().max().item() <= TOLERANCE


def test_padding_is_masked(folder: Path, proteins: list[str]) -> None:
    """fair-esm masks padding itself: a row alone equals the row in a padded batch."""
    converted = build(read_hf_esm2(folder), folder)
    together = mean_rows(fair_states(converted, tokenize(proteins)), proteins)
    for row, sequence in enumerate(proteins):
        alone = mean_rows(fair_states(converted, tokenize([sequence])), [sequence])[0]
        # fp32, different summation order: reductions over the FFN width, 3 layers
        limit = tolerance(torch.float32, terms=4 * EMBED, depth=LAYERS)
        assert (alone - together[row]).abs().max().item() <= limit


def test_project_loader_keeps_the_checkpoint_inv_freq(
    esm2: ESM2, proteins: list[str], tmp_path: Path
) -> None:
    """The project's public path on a checkpoint with rounded inv_freq (as every published
    ESM2) should give fair-esm's rows."""
    path = tmp_path / "esm2_t3_rounded.pt"
    torch.save(official_layout(esm2), path)
    rows = embed_sequences(load_model(path, device="cpu"), proteins)
    want = mean_rows(fair_states(esm2, tokenize(proteins)), proteins)
    assert isinstance(rows, torch.Tensor)
    assert (rows - want).abs().max().item() <= TOLERANCE


# --------------------------------------------------------------------------------------
# transformers' EsmModel (test extra): an independent implementation on the same folder
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("inv_freq", ["per_layer", "model"])
def test_matches_transformers_esm_model(
    esm2: ESM2, tmp_path: Path, proteins: list[str], monkeypatch: pytest.MonkeyPatch,
    inv_freq: str,
) -> None:
    """With the attention mask, as the issue demands (without it rows differ by > 2)."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = write_hf_esm2(tmp_path, esm2, inv_freq=inv_freq)  # type: ignore[arg-type]
    theirs = transformers.EsmModel.from_pretrained(folder, add_pooling_layer=False).eval()
    converted = build(read_hf_esm2(folder), folder)
    tokens = tokenize(proteins)
    real = tokens.ne(1)
    with torch.no_grad():
        want = theirs(input_ids=tokens, attention_mask=real.long()).last_hidden_state
    got = fair_states(converted, tokens)
    assert (got - want)[real].abs().max().item() <= TOLERANCE
    rows = mean_rows(got, proteins), mean_rows(want, proteins)
    assert (rows[0] - rows[1]).abs().max().item() <= TOLERANCE


# --------------------------------------------------------------------------------------
# Files: the hand-written safetensors reader
# --------------------------------------------------------------------------------------


def _assorted() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 2, 2, generator=generator).bfloat16(),
        "f64": torch.randn(4, generator=generator).double(),
        "i64": torch.arange(6).reshape(1, 6),
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_safetensors_reader_round_trip(tmp_path: Path) -> None:
    tensors = _assorted()
    read = read_safetensors(write_safetensors(tmp_path / "a.safetensors", tensors))
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_safetensors_reader_agrees_with_the_package(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = _assorted()
    theirs = tmp_path / "theirs.safetensors"
    safetensors_torch.save_file(tensors, str(theirs), metadata={"format": "pt"})
    ours = read_safetensors(theirs)
    ours_file = write_safetensors(tmp_path / "ours.safetensors", tensors)
    back = safetensors_torch.load_file(str(ours_file))
    for name, tensor in tensors.items():
        assert torch.equal(ours[name], tensor) and torch.equal(back[name], tensor), name


# --------------------------------------------------------------------------------------
# Strictness: every refusal is one ModelError line naming the folder or file
# --------------------------------------------------------------------------------------


def _one_line_error(source: Path | str, contains: str) -> None:
    with pytest.raises(ModelError) as caught:
        read_hf_esm2(source)
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(source) in message and contains in message, message


def test_folder_problems(esm2: ESM2, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(empty, "no config.json")
    (empty / "config.json").write_text("{}")
    _one_line_error(empty, "not an ESM2 model")
    no_weights = write_hf_esm2(tmp_path / "no_weights", esm2)
    (no_weights / "model.safetensors").unlink()
    _one_line_error(no_weights, "no weights file")
    shards = write_hf_esm2(tmp_path / "shards", esm2, weights="sharded")
    (shards / "model-00002-of-00002.safetensors").unlink()
    _one_line_error(shards / "model.safetensors.index.json", "shard model-00002-of-00002")


def test_damaged_safetensors(esm2: ESM2, tmp_path: Path) -> None:
    truncated = write_hf_esm2(tmp_path / "truncated", esm2)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    _one_line_error(truncated / "model.safetensors", "truncated")
    garbage = write_hf_esm2(tmp_path / "garbage", esm2)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    _one_line_error(garbage / "model.safetensors", "not a safetensors file")
    bad_bin = write_hf_esm2(tmp_path / "bad_bin", esm2, weights="bin")
    (bad_bin / "pytorch_model.bin").write_bytes(b"not a zip")
    _one_line_error(bad_bin / "pytorch_model.bin", "not a readable checkpoint")


def test_unexpected_and_missing_weights(esm2: ESM2, tmp_path: Path) -> None:
    bogus = {"esm.encoder.layer.0.attention.self.bogus.weight": torch.zeros(2)}
    _one_line_error(write_hf_esm2(tmp_path / "extra", esm2, extra=bogus),
                    "unexpected weights for an ESM2 (esm.encoder.layer.0.attention.self.bogus")
    state = hf_esm2_state(esm2)
    del state["esm.encoder.layer.2.output.dense.bias"]
    missing = write_hf_esm2(tmp_path / "missing", esm2)
    write_weights(missing, state, "safetensors")
    _one_line_error(missing, "missing layers.2.fc2.bias")
    _one_line_error(write_hf_esm2(tmp_path / "deeper", esm2, config={"num_hidden_layers": 2}),
                    "weights beyond config.json")
    _one_line_error(write_hf_esm2(tmp_path / "wider", esm2, config={"hidden_size": 128,
                                                                     "intermediate_size": 512}),
                    "has shape")


@pytest.mark.parametrize(("override", "why"), [
    ({"position_embedding_type": "absolute"}, "not rotary"),
    ({"model_type": "esmc"}, "model_type"),
    ({"intermediate_size": 100}, "intermediate_size"),
    ({"emb_layer_norm_before": True}, "emb_layer_norm_before"),
    ({"is_folding_model": True}, "ESMFold"),
    ({"layer_norm_eps": 1e-12}, "layer_norm_eps"),
])
def test_not_an_esm2(esm2: ESM2, tmp_path: Path, override: dict[str, object], why: str) -> None:
    _one_line_error(write_hf_esm2(tmp_path, esm2, config=override), why)


# --------------------------------------------------------------------------------------
# The local HF cache (never a download)
# --------------------------------------------------------------------------------------


def test_hub_id_from_hf_hub_cache(
    esm2: ESM2, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = add_to_hf_cache(tmp_path / "hub", HUB_ID, folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins
    assert find_in_hf_cache(HUB_ID) == snapshot
    _assert_official(read_hf_esm2(HUB_ID), esm2)
    assert hf_model_name(HUB_ID) == hf_model_name(snapshot) == "esm2_t3_tiny_UR50D"
    assert find_in_hf_cache(HUB_ID, revision=snapshot.name) == snapshot


def test_hub_id_from_hf_home(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = add_to_hf_cache(tmp_path / "hf" / "hub", HUB_ID, folder)
    assert hf_cache_dir() == tmp_path / "hf" / "hub"
    assert find_in_hf_cache(HUB_ID) == snapshot
    (snapshot.parents[1] / "refs" / "main").unlink()  # a cache copied without refs/
    assert find_in_hf_cache(HUB_ID) == snapshot


def test_hub_id_not_cached_is_a_clear_offline_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as caught:
        read_hf_esm2("facebook/esm2_t33_650M_UR50D")
    message = str(caught.value)
    assert "\n" not in message
    for part in ("facebook/esm2_t33_650M_UR50D", str(tmp_path), "nothing is downloaded",
                 "--model_path"):
        assert part in message


def test_names_and_detection(esm2: ESM2, folder: Path, tmp_path: Path) -> None:
    assert is_hf_esm2_dir(folder)
    assert _assert_official(read_hf_esm2(folder / "model.safetensors"), esm2) is None
    assert hf_model_name(folder) == "esm2_t3_tiny_UR50D"
    esmc = write_hf_esmc(tmp_path / "esmc", random_esmc_state(d_model=64, n_layers=1), n_heads=1)
    pt = tmp_path / "esm2_t3.pt"
    torch.save(official_layout(esm2), pt)
    assert not is_hf_esm2_dir(esmc)
    assert not is_hf_esm2_dir(pt)
    assert not is_hf_esm2_dir(tmp_path / "absent")
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text(json.dumps({"model_type": "esm"}))
    assert not is_hf_esm2_dir(tmp_path / "config_only")
    assert looks_like_hub_id(HUB_ID) and not looks_like_hub_id(str(folder))
    assert not looks_like_hub_id("esm2_t33_650M_UR50D")
