"""ESM2 registry, loading (by size, fair-esm name or local checkpoint) and the forward pass.

Loading goes through fair-esm's own ``load_model_and_alphabet_core`` so the architecture
and state-dict mapping stay fair-esm's, but the file is read by us: fair-esm calls
``torch.load`` without ``weights_only``, which torch >= 2.6 refuses for its checkpoints
("Unsupported global: argparse.Namespace"). We load with ``weights_only=True`` and an
allow-list of exactly the globals the official files hold (`CHECKPOINT_GLOBALS`).

Two engines run the forward (``load_model(..., engine=...)``, recorded on the
`LoadedModel`):

- ``"fast"`` (default): `engine.FastESM2`, built from the loaded fair-esm module (sharing
  its weights): fused QKV, SDPA, no attention weights, stops at the requested layer.
  Matches fair-esm to ~1e-6 in fp32.
- ``"reference"``: fair-esm's own ``ESM2.forward(tokens, repr_layers=[L])``, unchanged;
  the thing the fast engine is measured and tested against.

`LoadedModel.module` is always the fair-esm ESM2. Two fixes are installed on it
(`Fp32RotaryEmbedding`): fair-esm casts its rotary ``inv_freq`` buffer with the model, so
under fp16 positions above 256 round; and a cos/sin cache built under
``torch.inference_mode`` breaks a later grad-enabled call of the same length. Both are
fixed by rebuilding the tables in fp32 whenever they would be wrong, from the
checkpoint's own frequencies (fp16-rounded in the published files, and what fair-esm's
forward uses). The fast engine gets the same fp32 frequencies (`rotary_frequencies`),
builds its tables per call and needs neither fix.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import esm
import torch
from esm.model.esm2 import ESM2
from esm.rotary_embedding import RotaryEmbedding
from tqdm import tqdm

from esm2_batch.errors import ModelError
from esm2_batch.models.esm2_fast import FastESM2
from esm2_batch.models.esmc import CONTEXT_TOKENS, is_esmc_source, load_esmc
from esm2_batch.models.hf_esm2 import (
    find_in_hf_cache,
    hf_model_name,
    is_hf_esm2_dir,
    looks_like_hub_id,
    read_hf_esm2,
)

Engine = Literal["fast", "reference"]
"""Which forward runs the model: `engine.FastESM2` or fair-esm's own ESM2.forward."""
ENGINES: tuple[str, ...] = get_args(Engine)
Backend = Literal["fair-esm", "hf", "esmc"]
"""Where the weights come from: fair-esm's .pt, ESM2 in the Hugging Face layout (renamed
into fair-esm's, so both engines run it), or ESM C (its own module, esmc.py)."""
BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One published ESM2 model: its size label, fair-esm name and shape."""

    size: str
    name: str
    num_layers: int
    embed_dim: int
    attention_heads: int


ESM2_MODELS: dict[str, ModelSpec] = {
    spec.size: spec
    for spec in (
        ModelSpec("8M", "esm2_t6_8M_UR50D", 6, 320, 20),
        ModelSpec("35M", "esm2_t12_35M_UR50D", 12, 480, 20),
        ModelSpec("150M", "esm2_t30_150M_UR50D", 30, 640, 20),
        ModelSpec("650M", "esm2_t33_650M_UR50D", 33, 1280, 20),
        ModelSpec("3B", "esm2_t36_3B_UR50D", 36, 2560, 40),
        ModelSpec("15B", "esm2_t48_15B_UR50D", 48, 5120, 40),
    )
}
"""The ESM2 family by size label, as fair-esm publishes it."""

MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for the download server (connect and each read): offline fails fast."""

CHECKPOINT_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""Globals allowed beyond torch's weights-only defaults: the fairseq config
``cfg["model"]`` of the official ESM2 files is an ``argparse.Namespace``. Should a file
pickle anything else, `read_checkpoint` names it in a ModelError instead of loading it."""

_REGRESSION_WARNING = "Regression weights not found"
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """An ESM2 ready to run: fair-esm's module (eval mode, on `device` in `dtype`), the
    engine that runs the forward, and facts.

    `module` is fair-esm's ESM2 whichever the engine (the reference for comparisons);
    `fast` is the `FastESM2` built from it (sharing its weights) when `engine` is "fast",
    else None. The contact-regression head is never loaded (embeddings do not use it), so
    ``module.predict_contacts`` is not meaningful on a model loaded here.
    """

    name: str
    module: ESM2
    alphabet: esm.data.Alphabet
    embed_dim: int
    num_layers: int
    device: torch.device
    dtype: torch.dtype
    engine: Engine = "reference"
    fast: FastESM2 | None = None
    backend: Backend = "fair-esm"

    @property
    def max_residues(self) -> int:
        """Residues that fit the training context next to BOS and EOS: 1022 for ESM2,
        2046 for ESM C."""
        return CONTEXT_TOKENS - 2 if self.backend == "esmc" else 1022

    def __post_init__(self) -> None:
        if (self.engine == "fast") != (self.fast is not None):
            raise ValueError(f"engine {self.engine!r} needs fast set exactly when it is 'fast'")


def load_model(
    model: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    engine: Engine = "fast",
    backend: str = "auto",
) -> LoadedModel:
    """Load an ESM2 by size ("650M"), fair-esm name or path of a local checkpoint.

    Sizes and names are read from the torch hub cache and downloaded into it when missing.
    `device` defaults to cuda when available, else cpu; `dtype` to float16 on cuda (rotary
    tables stay fp32) and float32 elsewhere. `engine` picks the forward: "fast"
    (`engine.FastESM2`) or "reference" (fair-esm's own). Every failure is a one-line
    `ModelError`.
    """
    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    target = _resolve_device(device)
    precision = _resolve_dtype(dtype, target)
    chosen = detect_backend(model) if backend == "auto" else backend
    if chosen == "esmc":
        return _load_esmc(model, target, precision)
    if chosen == "hf":
        name, path = hf_model_name(model), Path(model)
        module, alphabet = _build(name, read_hf_esm2(model), path)
    elif chosen == "fair-esm":
        source = resolve_model(model)
        if isinstance(source, ModelSpec):
            name, path = source.name, hub_checkpoint(source.name)
        else:
            name, path = source.stem, source
        module, alphabet = _build(name, read_checkpoint(path), path)
    else:
        raise ModelError(f"unknown backend {backend!r}: use one of auto, {', '.join(BACKENDS)}")
    install_fp32_rotary(module)
    module = module.eval().to(device=target, dtype=precision)
    return LoadedModel(
        name=name, module=module, alphabet=alphabet, embed_dim=module.embed_dim,
        num_layers=module.num_layers, device=target, dtype=precision, engine=engine,
        backend=chosen,  # type: ignore[arg-type]
        fast=(FastESM2.from_fair_esm(module, inv_freq=rotary_frequencies(module))
              if engine == "fast" else None),
    )


def representations(model: LoadedModel, tokens: torch.Tensor, *, layer: int) -> torch.Tensor:
    """(B, T) tokens on the model's device -> (B, T, E) states after `layer` (0 =
    embeddings), computed by the model's engine: at real positions the states of fair-esm's
    ``forward(tokens, repr_layers=[layer])``; at padded positions zeros, whichever engine
    (their states mean nothing, and the fast engine then skips computing them)."""
    if model.fast is not None:
        return model.fast(tokens, layer=layer, skip_padding=True)
    if model.backend == "esmc":
        states = model.module(tokens, layer=layer)
    else:
        states = model.module(tokens, repr_layers=[layer])["representations"][layer]
    return states.masked_fill(tokens.eq(model.alphabet.padding_idx).unsqueeze(-1), 0.0)


def detect_backend(model: str | os.PathLike[str]) -> Backend:
    """fair-esm, hf or esmc, from what `model` names: a size or fair-esm name, a .pt in
    fair-esm's layout, an HF folder (config.json + weights) or hub id in the local HF
    cache, or an ESM C checkpoint (.pth, .safetensors or folder)."""
    text = str(model)
    if isinstance(model, str) and any(text.upper() == s.size.upper() or text == s.name
                                      for s in ESM2_MODELS.values()):
        return "fair-esm"
    path = Path(text).expanduser()
    if path.is_dir():
        if is_hf_esm2_dir(path):
            return "hf"
        if is_esmc_source(path):
            return "esmc"
        raise ModelError(f"{path}: neither an ESM2 folder in the Hugging Face layout nor "
                         "an ESM C checkpoint; pass --backend to say which")
    if path.is_file():
        if path.suffix == ".pt":  # fair-esm's files; ESM C's originals are .pth
            return "fair-esm"
        if is_esmc_source(path):
            return "esmc"
        return "hf" if is_hf_esm2_dir(path.parent) else "fair-esm"
    if looks_like_hub_id(text):
        try:
            folder = find_in_hf_cache(text)
        except ModelError:
            return "hf"  # read_hf_esm2 raises the one-line not-in-cache error
        return "esmc" if is_esmc_source(folder) else "hf"
    return "fair-esm"


def _load_esmc(model: str | os.PathLike[str], device: torch.device,
               dtype: torch.dtype) -> LoadedModel:
    """ESM C runs its own module; it shares ESM2's token ids, so the same alphabet works."""
    module = load_esmc(model).to(device=device, dtype=dtype)
    name = Path(str(model)).name.split(".")[0] or str(model)
    return LoadedModel(
        name=name, module=module, alphabet=esm.data.Alphabet.from_architecture("ESM-1b"),
        embed_dim=module.embed_dim, num_layers=module.num_layers, device=device,
        dtype=dtype, engine="reference", fast=None, backend="esmc")


def resolve_model(model: str | os.PathLike[str]) -> ModelSpec | Path:
    """A registry entry for a size or fair-esm name, else the existing checkpoint path."""
    if isinstance(model, str):
        for spec in ESM2_MODELS.values():
            if model.upper() == spec.size.upper() or model == spec.name:
                return spec
    path = Path(model).expanduser()
    looks_like_path = not isinstance(model, str) or path.suffix == ".pt" or len(path.parts) > 1
    if path.is_file():
        return path
    if path.exists():
        raise ModelError(f"model path is not a checkpoint file: {path}")
    if looks_like_path:
        raise ModelError(f"model checkpoint not found: {path}")
    sizes = ", ".join(ESM2_MODELS)
    raise ModelError(f"unknown model {model!r}: use a size ({sizes}), a name like "
                     f"esm2_t33_650M_UR50D, or the path of a local checkpoint (--model_path)")


def hub_checkpoint(name: str) -> Path:
    """The cached checkpoint of a published model, downloaded first when missing."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / f"{name}.pt"
    if path.is_file():
        return path
    url = MODEL_URL.format(name=name)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        download(url, path)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ModelError(
            f"cannot download {name} from {url} ({reason}); place {name}.pt in {cache} "
            f"or pass a local checkpoint with --model_path PATH"
        ) from None
    return path


def download(url: str, dest: Path, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Stream `url` to `dest` via a temporary file, so an interrupted download leaves none.

    The timeout bounds the connect and every read, so an offline machine fails in seconds
    instead of hanging, unlike torch.hub's download, which sets none.
    """
    partial = dest.with_name(dest.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as out:
            size = int(getattr(response, "headers", {}).get("Content-Length", 0)) or None
            # disable=None: a bar on a terminal, silence in logs and tests
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a fair-esm checkpoint with weights_only=True and the `CHECKPOINT_GLOBALS`."""
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = f"it pickles {found.group(1)}, which is not allowed" if found else "not a checkpoint"
        raise ModelError(f"cannot load {path}: {why}") from None
    except Exception as exc:  # a corrupt file fails anywhere in the unpickler (IndexError...)
        why = _first_line(exc)
        raise ModelError(f"cannot load {path}: not a readable checkpoint ({why})") from None
    if not _is_esm2_layout(data):
        raise ModelError(f"cannot load {path}: not an ESM2 checkpoint in fair-esm's layout "
                         f"(needs 'model' and cfg['model'] with encoder_layers)")
    return data


def _is_esm2_layout(data: object) -> bool:
    """Whether `data` has what fair-esm's ESM2 loader reads: weights and cfg.model."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return False
    cfg = data.get("cfg")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    return all(hasattr(model_cfg, key) for key in
               ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads"))


def _build(name: str, data: dict[str, Any], path: Path) -> tuple[ESM2, esm.data.Alphabet]:
    """Build the module with fair-esm's own loader; contact regression deliberately absent."""
    # fair-esm picks its ESM2 code path by the name's prefix; the layout is checked already.
    core_name = name if name.startswith("esm2") else f"esm2_{name}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_REGRESSION_WARNING)
            module, alphabet = esm.pretrained.load_model_and_alphabet_core(
                core_name, data, regression_data=None)
    except (RuntimeError, KeyError, AttributeError, TypeError) as exc:
        raise ModelError(f"cannot load {path}: {_first_line(exc)}") from None
    return module, alphabet


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, so errors stay one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, defaulting to cuda when available; a missing GPU is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"invalid device {device!r}: {_first_line(exc)}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return target


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float16 on cuda and float32 elsewhere by default; names like "bf16" accepted."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}: use float32, float16 or bfloat16")
    return _DTYPES[key]


class Fp32RotaryEmbedding(RotaryEmbedding):
    """fair-esm's rotary embedding with tables built in fp32 and rebuilt when stale.

    fair-esm derives the tables from its ``inv_freq`` buffer, which ``.half()`` lowers too;
    here the frequencies are kept aside in fp32 and the result is cast to the activations'
    dtype. The frequencies are the checkpoint's (`inv_freq`), not recomputed: ESM2 was
    trained in fp16, the published files carry fp16-rounded values, and fair-esm's forward
    uses them. In fp32 the tables are bit-identical to fair-esm's. The cache is also
    rebuilt when it holds inference tensors outside inference mode, which autograd cannot
    save.
    """

    def __init__(self, dim: int, inv_freq: torch.Tensor | None = None) -> None:
        super().__init__(dim)
        if inv_freq is not None:
            self.inv_freq.copy_(inv_freq)
        self._inv_freq32 = self.inv_freq.detach().float().clone()

    def _update_cos_sin_tables(
        self, x: torch.Tensor, seq_dimension: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = x.shape[seq_dimension]
        if self._stale(seq_len, x):
            inv_freq = self._inv_freq32.to(x.device)
            t = torch.arange(seq_len, device=x.device).type_as(inv_freq)  # (T,)
            freqs = torch.einsum("i,j->ij", t, inv_freq)  # (T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
            self._cos_cached = emb.cos()[None, :, :].to(x.dtype)  # (1, T, D)
            self._sin_cached = emb.sin()[None, :, :].to(x.dtype)
            self._seq_len_cached = seq_len
        return self._cos_cached, self._sin_cached

    def _stale(self, seq_len: int, x: torch.Tensor) -> bool:
        cos = self._cos_cached
        return (
            cos is None
            or seq_len != self._seq_len_cached
            or cos.device != x.device
            or cos.dtype != x.dtype
            or (cos.is_inference() and not torch.is_inference_mode_enabled())
        )


def install_fp32_rotary(module: ESM2) -> None:
    """Swap every layer's rotary embedding for `Fp32RotaryEmbedding`, keeping the loaded
    frequencies (same state dict, same values); call it before casting the module."""
    for layer in module.layers:
        attention = layer.self_attn
        loaded = attention.rot_emb.inv_freq
        attention.rot_emb = Fp32RotaryEmbedding(attention.head_dim, loaded).to(loaded.device)


def rotary_frequencies(module: ESM2) -> torch.Tensor:
    """(L, D/2) fp32 rotary frequencies of every layer, as loaded (see Fp32RotaryEmbedding)."""
    return torch.stack([layer.self_attn.rot_emb._inv_freq32 for layer in module.layers])
