"""ESM C: loading both key layouts strictly, and the forward pass against two references.

The references are an independent, deliberately slow float64 implementation written here
from the reference facts (loops over layers and heads, explicit rotary pairs, explicit
softmax) and, where installed (the [test] extra), transformers' own ``EsmcModel``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from esm2_batch.errors import InputError, ModelError
from esm2_batch.models.esmc import (
    ESMC,
    ESMC_SIZES,
    PAD_IDX,
    ESMCConfig,
    check_state,
    ffn_hidden_size,
    load_esmc,
    resolve_layer,
)
from esm2_batch.models.esmc_weights import is_esmc_source
from esm2_batch.models.weights import read_safetensors
from tests.fakes.tiny_esm import build_random_esm2, official_layout
from tests.fakes.tiny_hf import (
    add_to_hf_cache,
    esmc_hf_state,
    random_esmc_state,
    write_esmc_pth,
    write_hf_esm2,
    write_hf_esmc,
    write_safetensors,
)
from tests.tolerance import tolerance

D_MODEL, N_LAYERS, N_HEADS = 128, 3, 2  # 64-wide heads, as every ESM C
# fp32 against float64 or another fp32 order: reductions over the SwiGLU width, every layer;
# relative to unit scale (LayerNorm'd), so also the rtol for the larger residual stream
TOLERANCE = tolerance(torch.float32, terms=ffn_hidden_size(D_MODEL), depth=N_LAYERS)
ALPHABET = "LAGVSERTIDPKQNFYMHWCXBUZO"  # ids 4..28, shared with ESM2


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return random_esmc_state(d_model=D_MODEL, n_layers=N_LAYERS, seed=0)


@pytest.fixture(scope="module")
def pth(original: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_esmc_pth(tmp_path_factory.mktemp("esmc") / "esmc_tiny_v0.pth", original)


@pytest.fixture(scope="module")
def hf_folder(original: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_esmc(tmp_path_factory.mktemp("esmc_hf"), original, n_heads=N_HEADS)


@pytest.fixture(scope="module")
def model(pth: Path) -> ESMC:
    return load_esmc(pth)


@pytest.fixture(scope="module")
def sequences() -> list[str]:
    rng = random.Random(11)
    return ["M", "MK", *("".join(rng.choices(ALPHABET, k=rng.randint(3, 70))) for _ in range(5))]


def encode(sequence: str) -> list[int]:
    """BOS, residues, EOS with ESM's ids."""
    return [0, *(ALPHABET.index(letter) + 4 for letter in sequence), 2]


def batch(sequences: list[str]) -> torch.Tensor:
    """(B, T) right-padded token ids."""
    ids = [encode(s) for s in sequences]
    tokens = torch.full((len(ids), max(map(len, ids))), PAD_IDX, dtype=torch.long)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = torch.tensor(seq)
    return tokens


# --------------------------------------------------------------------------------------
# The independent reference: float64, one sequence, loops over layers and heads
# --------------------------------------------------------------------------------------


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + 1e-5) * weight
    return out if bias is None else out + bias


def _rope(x: torch.Tensor) -> torch.Tensor:
    """Rotate pair (j, j + D/2) of every position p by p * 10000^(-2j/D)."""
    length, dim = x.shape
    half = dim // 2
    out = torch.empty_like(x)
    for j in range(half):
        theta = torch.arange(length, dtype=x.dtype) * 10000.0 ** (-2 * j / dim)
        a, b = x[:, j], x[:, j + half]
        out[:, j] = a * torch.cos(theta) - b * torch.sin(theta)
        out[:, j + half] = b * torch.cos(theta) + a * torch.sin(theta)
    return out


def reference_states(
    state: dict[str, torch.Tensor], ids: list[int], heads: int
) -> list[torch.Tensor]:
    """[embeddings, after block 1, ..., after block n, post-final-norm], each (T, d)."""
    w = {k: v.double() for k, v in state.items()}
    n_layers = len({k.split(".")[2] for k in w if k.startswith("transformer.blocks.")})
    scale = math.sqrt(n_layers / 36)
    x = w["embed.weight"][torch.tensor(ids)]
    d = x.shape[1]
    dh = d // heads
    states = [x]
    for i in range(n_layers):
        p = f"transformer.blocks.{i}."
        h = _layer_norm(x, w[p + "attn.layernorm_qkv.0.weight"], w[p + "attn.layernorm_qkv.0.bias"])
        q, k, v = (h @ w[p + "attn.layernorm_qkv.1.weight"].T).split(d, dim=-1)
        q = _layer_norm(q, w[p + "attn.q_ln.weight"], None)
        k = _layer_norm(k, w[p + "attn.k_ln.weight"], None)
        context = torch.zeros_like(x)
        for head in range(heads):
            cols = slice(head * dh, (head + 1) * dh)
            scores = _rope(q[:, cols]) @ _rope(k[:, cols]).T / math.sqrt(dh)
            context[:, cols] = torch.softmax(scores, dim=-1) @ v[:, cols]
        x = x + context @ w[p + "attn.out_proj.weight"].T / scale
        h = _layer_norm(x, w[p + "ffn.0.weight"], w[p + "ffn.0.bias"])
        gate, up = (h @ w[p + "ffn.1.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "ffn.3.weight"].T / scale
        states.append(x)
    states.append(_layer_norm(x, w["transformer.norm.weight"], None))
    return states


# --------------------------------------------------------------------------------------
# The forward pass
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [N_LAYERS, 1, 0])
def test_matches_the_independent_reference(
    model: ESMC, original: dict[str, torch.Tensor], sequences: list[str], layer: int
) -> None:
    """Rows (means over residues) within TOLERANCE; every state within TOLERANCE relative
    (the un-normalised residual stream of inner layers is larger than 1)."""
    tokens = batch(sequences)
    with torch.no_grad():
        states = model(tokens, layer=layer)  # (B, T, d)
    for row, sequence in enumerate(sequences):
        ids = encode(sequence)
        expected = reference_states(original, ids, N_HEADS)[layer + (layer == N_LAYERS)]
        got = states[row, : len(ids)].double()
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
        mean_diff = (got[1:-1].mean(0) - expected[1:-1].mean(0)).abs().max().item()
        assert mean_diff <= TOLERANCE


def test_padding_does_not_change_a_sequence(model: ESMC, sequences: list[str]) -> None:
    with torch.no_grad():
        padded = model(batch(sequences))
        for row, sequence in enumerate(sequences):
            alone = model(batch([sequence]))[0]
            together = padded[row, : len(encode(sequence))]
            assert (alone - together).abs().max().item() <= TOLERANCE  # SDPA kernels differ
    assert torch.isfinite(padded).all()  # padding queries see the real keys: no NaN rows


def test_layer_numbering(model: ESMC, sequences: list[str]) -> None:
    tokens = batch(sequences[:3])
    with torch.no_grad():
        last = model(tokens)
        assert torch.equal(last, model(tokens, layer=N_LAYERS))
        assert torch.equal(last, model(tokens, layer=-1))
        assert torch.equal(model(tokens, layer=0), model.embed(tokens))
        assert torch.equal(model(tokens, layer=-N_LAYERS - 1), model.embed(tokens))
    for bad in (N_LAYERS + 1, -N_LAYERS - 2):
        with pytest.raises(InputError, match="out of range"):
            model(tokens, layer=bad)
    assert resolve_layer(None, 30) == 30


def test_several_layers_from_one_forward(model: ESMC, sequences: list[str]) -> None:
    """forward_layers (what --repr_layers uses) gives each layer as a one-layer call."""
    tokens = batch(sequences[:3])
    with torch.no_grad():
        states = model.forward_layers(tokens, (1, 0, -1))
        for k, layer in enumerate((1, 0, N_LAYERS)):
            assert torch.equal(states[k], model(tokens, layer=layer))


def test_low_precision_runs_close_to_fp32(pth: Path, sequences: list[str]) -> None:
    reference = load_esmc(pth)
    half = load_esmc(pth).to(torch.bfloat16)
    tokens = batch(sequences)
    with torch.no_grad():
        want, got = reference(tokens), half(tokens).float()
    real = tokens.ne(PAD_IDX)
    assert torch.isfinite(got).all()
    assert (got - want)[real].abs().max().item() < 0.25


# --------------------------------------------------------------------------------------
# Loading: both layouts, every container
# --------------------------------------------------------------------------------------


def _assert_same_weights(a: ESMC, b: ESMC) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config == b.config


def test_loaded_model_is_eval_fp32_cpu(model: ESMC) -> None:
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.config == ESMCConfig(d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_LAYERS,
                                      ffn_hidden=ffn_hidden_size(D_MODEL))
    assert (model.embed_dim, model.num_layers) == (D_MODEL, N_LAYERS)


@pytest.mark.parametrize("weights", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("prefix", ["esmc.", ""])
def test_hf_layout_gives_the_same_model(
    model: ESMC, original: dict[str, torch.Tensor], tmp_path: Path, weights: str, prefix: str
) -> None:
    folder = write_hf_esmc(tmp_path, original, n_heads=N_HEADS, weights=weights,  # type: ignore[arg-type]
                           prefix=prefix, lm_head=bool(prefix))
    _assert_same_weights(load_esmc(folder), model)


def test_single_files_in_either_layout(
    model: ESMC, original: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    hf_file = write_safetensors(tmp_path / "esmc_hf.safetensors", esmc_hf_state(original))
    original_file = write_safetensors(tmp_path / "esmc_original.safetensors", original)
    _assert_same_weights(load_esmc(hf_file), model)
    _assert_same_weights(load_esmc(original_file), model)


def test_original_hub_folder(
    model: ESMC, original: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    weights = tmp_path / "data" / "weights"
    weights.mkdir(parents=True)
    write_esmc_pth(weights / "esmc_300m_2024_12_v0.pth", original)
    _assert_same_weights(load_esmc(tmp_path), model)
    assert is_esmc_source(tmp_path)


def test_bf16_checkpoint_loads_as_fp32(original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    stored = {k: v.to(torch.bfloat16) for k, v in original.items()}
    loaded = load_esmc(write_hf_esmc(tmp_path, stored, n_heads=N_HEADS))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.embed.weight, stored["embed.weight"].float())


def test_hub_id_from_the_local_cache(
    model: ESMC, hf_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_to_hf_cache(tmp_path / "hub", "biohub/ESMC-tiny", hf_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _assert_same_weights(load_esmc("biohub/ESMC-tiny"), model)
    with pytest.raises(ModelError, match=r"biohub/ESMC-300M .*not in the local Hugging Face cache"):
        load_esmc("biohub/ESMC-300M")


@pytest.mark.parametrize("size", ["300M", "600M"])
def test_config_inferred_from_released_shapes(size: str) -> None:
    """The released shapes (as meta tensors: no memory) give the published configs."""
    spec = ESMC_SIZES[size]
    with torch.device("meta"):
        state = ESMC(spec).state_dict()
    inferred = ESMCConfig.from_state_dict(state)
    assert inferred == spec
    assert (inferred.head_dim, inferred.ffn_hidden) == (64, {"300M": 2560, "600M": 3072}[size])
    with torch.device("meta"):
        check_state(ESMC(inferred), state, Path(size))


# --------------------------------------------------------------------------------------
# Strictness: every refusal is one ModelError line naming the file
# --------------------------------------------------------------------------------------


def _one_line_error(path: Path) -> str:
    with pytest.raises(ModelError) as caught:
        load_esmc(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_unknown_missing_and_misshapen_keys(
    original: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    extra = {**original, "transformer.blocks.0.attn.bogus.weight": torch.zeros(1)}
    assert "unexpected transformer.blocks.0.attn.bogus.weight" in _one_line_error(
        write_esmc_pth(tmp_path / "extra.pth", extra))
    missing = {k: v for k, v in original.items() if k != "transformer.blocks.1.attn.k_ln.weight"}
    assert "missing transformer.blocks.1.attn.k_ln.weight" in _one_line_error(
        write_esmc_pth(tmp_path / "missing.pth", missing))
    wrong = {**original, "transformer.blocks.0.attn.out_proj.weight": torch.zeros(4, 4)}
    assert "has shape (4, 4)" in _one_line_error(write_esmc_pth(tmp_path / "shape.pth", wrong))


def test_hf_layout_is_strict(original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    bogus = {"esmc.layers.0.self_attn.bogus.weight": torch.zeros(1)}
    folder = write_hf_esmc(tmp_path / "extra", original, n_heads=N_HEADS, extra=bogus)
    assert "layers.0.self_attn.bogus.weight" in _one_line_error(folder)
    state = esmc_hf_state(original)
    del state["esmc.layers.2.mlp.up_proj.weight"]
    lone = write_safetensors(tmp_path / "missing.safetensors", state)
    assert "missing layers.2.mlp.up_proj.weight" in _one_line_error(lone)
    gelu = write_hf_esmc(tmp_path / "gelu", original, n_heads=N_HEADS,
                         config={"hidden_act": "gelu"})
    assert "hidden_act" in _one_line_error(gelu)


def test_other_models_are_refused(tmp_path: Path) -> None:
    esm2 = build_random_esm2(num_layers=1, embed_dim=64, heads=4)
    pt = tmp_path / "esm2_t1.pt"
    torch.save(official_layout(esm2)["model"], pt)
    assert "not an ESM C checkpoint" in _one_line_error(pt)
    hf_esm2 = write_hf_esm2(tmp_path / "hf_esm2", esm2)
    assert "model_type 'esm'" in _one_line_error(hf_esm2)
    assert not is_esmc_source(hf_esm2)
    assert not is_esmc_source(pt)
    full = tmp_path / "esm2_t1_full.pt"
    torch.save(official_layout(esm2), full)  # pickles argparse.Namespace
    assert not is_esmc_source(full)
    assert "argparse.Namespace" in _one_line_error(full)
    assert not is_esmc_source(tmp_path / "absent.pth")
    with pytest.raises(ModelError, match="ESM C weights not found"):
        load_esmc(tmp_path / "absent.pth")


def test_is_esmc_source(pth: Path, hf_folder: Path, original: dict[str, torch.Tensor],
                        tmp_path: Path) -> None:
    assert is_esmc_source(pth) and is_esmc_source(hf_folder)
    assert is_esmc_source(write_safetensors(tmp_path / "x.safetensors", esmc_hf_state(original)))


def test_safetensors_reader_is_exact(original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    read = read_safetensors(write_safetensors(tmp_path / "o.safetensors", original))
    assert read.keys() == original.keys()
    assert all(torch.equal(read[k], original[k]) for k in original)


# --------------------------------------------------------------------------------------
# transformers' EsmcModel (test extra): an independent implementation on the HF layout
# --------------------------------------------------------------------------------------


def test_matches_transformers_esmc(
    model: ESMC, hf_folder: Path, sequences: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "EsmcModel"):
        pytest.skip("transformers has no EsmcModel (needs >= 5.16)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    theirs = transformers.EsmcModel.from_pretrained(hf_folder).eval()
    tokens = batch(sequences)
    real = tokens.ne(PAD_IDX)
    with torch.no_grad():
        want = theirs(input_ids=tokens, attention_mask=real.long()).last_hidden_state
        got = model(tokens)
    assert (got - want)[real].abs().max().item() <= TOLERANCE
    for row, sequence in enumerate(sequences):
        n = len(sequence)
        rows = got[row, 1 : n + 1].mean(0), want[row, 1 : n + 1].mean(0)
        assert (rows[0] - rows[1]).abs().max().item() <= TOLERANCE
