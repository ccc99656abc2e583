"""Loading ESM2 by path, size and name; offline failure; the engine option; the fp32
rotary fix and the checkpoint's rotary frequencies."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
import warnings
from pathlib import Path, PurePosixPath

import pytest
import torch
from esm.rotary_embedding import RotaryEmbedding

import esm2_batch
from esm2_batch.errors import ModelError
from esm2_batch.models import (
    ESM2_MODELS,
    load_model,
    representations,
    resolve_model,
)
from esm2_batch.models.esm2_fast import FastESM2
from esm2_batch.models.fair_esm import Fp32RotaryEmbedding
from esm2_batch.models.weights import read_checkpoint
from tests.fakes.tiny_esm import build_random_esm2, official_layout, write_tiny_checkpoint
from tests.tolerance import tolerance


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub dir and a network that refuses at once (nothing real is hit)."""
    calls: list[str] = []

    def refuse(url: str, timeout: float | None = None) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tmp_path


def test_load_local_checkpoint_without_warnings(checkpoint: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no regression-weights warning, no torch.load warning
        model = load_model(checkpoint)
    assert model.name == "esm2_t2_tiny_test"
    assert (model.embed_dim, model.num_layers) == (64, 2)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.alphabet.get_idx("A") == 5
    assert model.engine == "fast" and isinstance(model.fast, FastESM2)
    assert not model.module.training
    assert all(isinstance(layer.self_attn.rot_emb, Fp32RotaryEmbedding)
               for layer in model.module.layers)


def test_checkpoint_read_with_weights_only(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy)
    load_model(checkpoint)
    assert seen == [True]


def test_no_unsafe_load_anywhere_in_package() -> None:
    package = Path(esm2_batch.__file__).parent
    for source in package.rglob("*.py"):
        assert "weights_only=False" not in source.read_text(), source


def test_state_dict_keys_unchanged_by_rotary_swap(checkpoint: Path) -> None:
    model = load_model(checkpoint)
    saved = official_layout(model.module)["model"]
    assert set(read_checkpoint(checkpoint)["model"]) == set(saved)


@pytest.mark.parametrize("name", ["8M", "650m", "esm2_t36_3B_UR50D"])
def test_resolve_sizes_and_names(name: str) -> None:
    spec = resolve_model(name)
    assert spec in ESM2_MODELS.values()


def test_unknown_model_is_one_line_error() -> None:
    with pytest.raises(ModelError, match=r"unknown model '7M'.*--model_path") as info:
        load_model("7M")
    assert "\n" not in str(info.value)


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "esm2_nowhere.pt"
    with pytest.raises(ModelError, match="not found") as info:
        load_model(missing)
    assert str(missing) in str(info.value)


def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"neither an ESM2 folder .* nor an ESM C"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="not a checkpoint file"):
        load_model(tmp_path, backend="fair-esm")


def test_garbage_file_names_path(tmp_path: Path) -> None:
    bad = tmp_path / "esm2_garbage.pt"
    bad.write_text("this is not a checkpoint\n")
    with pytest.raises(ModelError) as info:
        load_model(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_wrong_layout_names_path(tmp_path: Path) -> None:
    bad = tmp_path / "esm2_dict.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ModelError, match="not an ESM2 checkpoint") as info:
        load_model(bad)
    assert str(bad) in str(info.value)


def test_disallowed_global_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "esm2_evil.pt"
    torch.save({"model": {}, "extra": PurePosixPath("/x")}, bad)
    with pytest.raises(ModelError, match="PurePosixPath") as info:
        load_model(bad)
    assert "\n" not in str(info.value)


def test_size_offline_fails_fast_naming_file_and_flag(
        offline_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse, timeouts = urllib.request.urlopen, []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: (
        timeouts.append(timeout), refuse(url, timeout)))
    with pytest.raises(ModelError) as info:
        load_model("8M")
    message = str(info.value)
    assert len(timeouts) == 1 and timeouts[0] is not None  # one bounded try, no retries
    assert "esm2_t6_8M_UR50D.pt" in message and "--model_path" in message
    assert str(offline_hub / "checkpoints") in message and "\n" not in message
    assert list((offline_hub / "checkpoints").iterdir()) == []  # no partial file left
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_size_loads_from_hub_cache_without_network(offline_hub: Path) -> None:
    (offline_hub / "checkpoints").mkdir()
    write_tiny_checkpoint(offline_hub / "checkpoints" / "esm2_t6_8M_UR50D.pt")
    model = load_model("8M")
    assert model.name == "esm2_t6_8M_UR50D" and model.embed_dim == 64


def test_size_downloads_into_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Path
) -> None:
    urls: list[str] = []

    def serve(url: str, timeout: float | None = None) -> io.BytesIO:
        urls.append(url)
        assert timeout is not None and timeout <= 30
        return io.BytesIO(checkpoint.read_bytes())

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", serve)
    model = load_model("35M")
    assert urls == ["https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t12_35M_UR50D.pt"]
    assert (tmp_path / "checkpoints" / "esm2_t12_35M_UR50D.pt").is_file()
    assert model.num_layers == 2


def test_bad_dtype_and_missing_cuda(checkpoint: Path) -> None:
    with pytest.raises(ModelError, match="unsupported dtype"):
        load_model(checkpoint, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_model(checkpoint, device="cuda")


def test_half_model_keeps_rotary_tables_in_fp32(checkpoint: Path) -> None:
    model = load_model(checkpoint, dtype="float16")
    assert next(model.module.parameters()).dtype == torch.float16
    rotary = model.module.layers[0].self_attn.rot_emb
    x = torch.zeros(1, 300, rotary._inv_freq32.numel() * 2, dtype=torch.float16)
    cos, _ = rotary._update_cos_sin_tables(x, seq_dimension=-2)
    exact = RotaryEmbedding(x.shape[-1])  # fair-esm's, in fp32
    want, _ = exact._update_cos_sin_tables(x.float(), seq_dimension=-2)
    assert cos.dtype == torch.float16
    assert torch.equal(cos, want.half())
    # fair-esm's own table, cast with the model, rounds position 257 to 256
    lowered = RotaryEmbedding(x.shape[-1]).half()
    bad, _ = lowered._update_cos_sin_tables(x, seq_dimension=-2)
    assert not torch.equal(bad, want.half())


def test_fp32_rotary_tables_bit_identical_to_fair_esm() -> None:
    ours, theirs = Fp32RotaryEmbedding(16), RotaryEmbedding(16)
    x = torch.randn(2, 1024, 16)
    assert all(torch.equal(a, b) for a, b in zip(
        ours._update_cos_sin_tables(x, -2), theirs._update_cos_sin_tables(x, -2), strict=True))


def test_rotary_cache_from_inference_mode_not_reused_with_grad() -> None:
    rotary = Fp32RotaryEmbedding(16)
    with torch.inference_mode():
        rotary(torch.randn(4, 10, 16), torch.randn(4, 10, 16))
    q = torch.randn(4, 10, 16, requires_grad=True)
    out_q, out_k = rotary(q, torch.randn(4, 10, 16))
    (out_q.sum() + out_k.sum()).backward()
    assert q.grad is not None


def test_reference_engine_runs_fair_esm_forward(checkpoint: Path) -> None:
    reference = load_model(checkpoint, engine="reference")
    fast = load_model(checkpoint)
    assert reference.engine == "reference" and reference.fast is None
    tokens = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    with torch.no_grad():
        want = reference.module(tokens, repr_layers=[2])["representations"][2]
    want[1, 3:] = 0.0  # padded positions come back as zeros from either engine
    assert torch.equal(representations(reference, tokens, layer=2), want)
    # fp32, another summation order: FFN-width (4 * embed_dim) reductions in 2 layers
    limit = tolerance(torch.float32, terms=4 * fast.embed_dim, depth=2)
    assert (representations(fast, tokens, layer=2) - want).abs().max() <= limit


def test_unknown_engine_is_one_line_error(checkpoint: Path) -> None:
    with pytest.raises(ModelError, match=r"unknown engine 'sdpa'.*fast, reference"):
        load_model(checkpoint, engine="sdpa")  # type: ignore[arg-type]


def test_checkpoint_rotary_frequencies_kept_by_both_engines(tmp_path: Path) -> None:
    """Published ESM2 files carry fp16-rounded inv_freq (trained in fp16); fair-esm uses
    them, so neither the rotary fix nor the fast engine may recompute them."""
    module = build_random_esm2(num_layers=2, embed_dim=64, heads=4).eval()
    for layer in module.layers:
        layer.self_attn.rot_emb.inv_freq.copy_(layer.self_attn.rot_emb.inv_freq.half())
    path = tmp_path / "esm2_t2_rounded.pt"
    torch.save(official_layout(module), path)
    tokens = torch.tensor([[0, *range(4, 24), *range(4, 24), 2]])
    with torch.no_grad():
        want = module(tokens, repr_layers=[2])["representations"][2]
    limit = tolerance(torch.float32, terms=4 * module.embed_dim, depth=module.num_layers)
    for engine in ("fast", "reference"):
        model = load_model(path, engine=engine)
        rotary = model.module.layers[1].self_attn.rot_emb
        assert torch.equal(rotary._inv_freq32, module.layers[1].self_attn.rot_emb.inv_freq)
        with torch.no_grad():
            got = representations(model, tokens, layer=2)
        assert (got - want).abs().max() <= limit, engine
    half = load_model(path, dtype="float16")
    assert half.fast is not None and half.fast.inv_freq.dtype == torch.float32
    assert torch.equal(half.fast.inv_freq[1], module.layers[1].self_attn.rot_emb.inv_freq)
