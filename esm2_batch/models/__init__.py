"""Encoders: a checkpoint in, the hidden states of a chosen layer out.

    load_model(model, device=, dtype=, engine=, backend=)  ->  LoadedModel
    representations(loaded, tokens (B, T), layer=L)        ->  (B, T, E), zeros at padding
    layer_states(loaded, tokens (B, T), layers=(L1, L2))   ->  (2, B, T, E): one forward

Every variant is an `Encoder`, so callers never ask which one runs:

- ESM2 from fair-esm's ``.pt`` (backend "fair-esm": a size like "650M", a fair-esm name,
  or a local file), built by fair-esm's own loader (fair_esm.py) and run by one of two
  engines: "fast" (default, esm2_fast.py: fused QKV, SDPA, stops at the requested layer;
  matches fair-esm to ~1e-6 in fp32) or "reference" (fair-esm's ``ESM2.forward``
  unchanged, what the fast engine is tested against);
- ESM2 in the Hugging Face layout (backend "hf"; "fastesm" for Synthyra's FastESM2
  folders, which "hf" loads too): its weights renamed into fair-esm's layout
  (hf_esm2.py), then exactly the same two engines, with the model's own context
  (`LoadedModel.max_residues`: 2,046 for FastESM2_650);
- ESM C (backend "esmc"): its own module (esmc.py);
- ESM3, sequence track only (backend "esm3"): its own module (esm3.py), ESM C's blocks
  fed by ESM3's track embeddings.

The checkpoint readers (weights_only loading, safetensors, shards, the local HF cache,
the download of published ESM2 files) are in weights.py; rotary tables, shared by every
model, in rotary.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import esm
import torch
from esm.model.esm2 import ESM2
from torch import nn

from esm2_batch.errors import ModelError, first_line
from esm2_batch.models.esm2_fast import FastEncoder, FastESM2
from esm2_batch.models.esm3 import ESM3, is_esm3_source, load_esm3
from esm2_batch.models.esmc import ESMC, TrunkEncoder, load_esmc
from esm2_batch.models.esmc_weights import is_esmc_source
from esm2_batch.models.fair_esm import ReferenceEncoder, build_module, prepare
from esm2_batch.models.hf_esm2 import (
    FASTESM_MODEL_TYPE,
    hf_max_residues,
    hf_model_name,
    hf_model_type,
    is_hf_esm2_dir,
    read_hf_esm2,
)
from esm2_batch.models.weights import (
    find_in_hf_cache,
    hub_checkpoint,
    local_model_hint,
    looks_like_hub_id,
    read_checkpoint,
    weights_fingerprint,
)

__all__ = [
    "BACKENDS",
    "BACKEND_ALIASES",
    "DTYPES",
    "ENGINES",
    "ESM2_MODELS",
    "Backend",
    "Encoder",
    "Engine",
    "LoadedModel",
    "ModelSpec",
    "detect_backend",
    "esm2_from_module",
    "layer_states",
    "load_model",
    "representations",
    "resolve_dtype",
    "resolve_model",
]

Engine = Literal["fast", "reference"]
"""Which forward runs an ESM2: `esm2_fast.FastESM2` or fair-esm's own ESM2.forward."""
ENGINES: tuple[str, ...] = get_args(Engine)
Backend = Literal["fair-esm", "hf", "esmc", "esm3"]
"""Where the weights come from: fair-esm's .pt, ESM2 in the Hugging Face layout (renamed
into fair-esm's, so both engines run it), ESM C (its own module, esmc.py), or ESM3's
sequence track (esm3.py)."""
BACKENDS: tuple[str, ...] = get_args(Backend)
BACKEND_ALIASES: dict[str, Backend] = {"fastesm": "hf"}
"""Other names `load_model` takes for a backend: "fastesm" is "hf" restricted to FastESM
folders (config model_type "fast_esm")."""


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

DTYPES: tuple[str, ...] = ("auto", "fp16", "bf16", "fp32")
"""The compute precisions the CLI offers (``--dtype``); "auto" is float16 on CUDA and
float32 elsewhere. `load_model` also takes torch dtypes and their long names."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class Encoder(Protocol):
    """What every model variant is to the rest of the package: (B, T) token ids (ESM2's
    alphabet, BOS and EOS added, padded with <pad>) on `device` -> (B, T, E) hidden states
    after the requested layer, in `dtype`.

    Layer 0 is the token embedding and `num_layers` the last layer's output, as fair-esm's
    ``repr_layers`` numbers them. At real positions the states are the model's own; at
    padded positions they are zeros (they mean nothing, and an engine may skip them).
    """

    @property
    def name(self) -> str: ...
    @property
    def embed_dim(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def max_residues(self) -> int:
        """Residues that fit the training context next to BOS and EOS."""
    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, tokens: torch.Tensor, *, layer: int) -> torch.Tensor: ...

    def states(self, tokens: torch.Tensor, *, layers: tuple[int, ...]) -> torch.Tensor:
        """(n, B, T, E): the states after each of `layers` (absolute, 0..num_layers), from
        one forward that stops at the deepest; ``states(t, layers=(L,))[0]`` equals
        ``self(t, layer=L)``."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to run: its `encoder`, the network behind it, and facts.

    `module` is the loaded network in eval mode on `device` in `dtype`: fair-esm's ESM2
    whichever the engine (the reference for comparisons), or the `esmc.ESMC`. `fast` is the
    `FastESM2` built from the ESM2 (sharing its weights) when `engine` is "fast", else None.
    The contact-regression head is never loaded (embeddings do not use it), so
    ``module.predict_contacts`` is not meaningful on a model loaded here.
    """

    encoder: Encoder
    module: nn.Module
    alphabet: esm.data.Alphabet
    engine: Engine = "reference"
    backend: Backend = "fair-esm"
    fast: FastESM2 | None = None
    fingerprint: str = ""
    """`weights.weights_fingerprint` of the weights as loaded: what rows are keyed by."""
    context: int | None = None
    """Residues of the checkpoint's own training context when it differs from what the
    encoder's architecture implies (FastESM2: ESM2's modules, 2,046 residues); None: the
    encoder's `max_residues`."""

    def __post_init__(self) -> None:
        if (self.engine == "fast") != (self.fast is not None):
            raise ValueError(f"engine {self.engine!r} needs fast set exactly when it is 'fast'")

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def max_residues(self) -> int:
        """Residues that fit the model's training context next to BOS and EOS: 1022 for
        ESM2, 2046 for FastESM2_650 and ESM C. Truncation and windows are sized by it."""
        return self.context if self.context is not None else self.encoder.max_residues


def representations(model: LoadedModel, tokens: torch.Tensor, *, layer: int) -> torch.Tensor:
    """(B, T) tokens on the model's device -> (B, T, E) states after `layer` (0 =
    embeddings): the model's own at real positions, zeros at padded ones (see `Encoder`)."""
    return model.encoder(tokens, layer=layer)


def layer_states(model: LoadedModel, tokens: torch.Tensor, *, layers: tuple[int, ...]
                 ) -> torch.Tensor:
    """(B, T) tokens -> (n, B, T, E) states after each of `layers` (absolute indices), from
    one forward: what several ``--repr_layers`` cost."""
    return model.encoder.states(tokens, layers=layers)


def load_model(
    model: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    engine: Engine = "fast",
    backend: str = "auto",
) -> LoadedModel:
    """Load a model by ESM2 size ("650M"), fair-esm name, local checkpoint, Hugging Face
    folder or cached hub id (`backend` "auto" tells them apart: `detect_backend`).

    Sizes and names are read from the torch hub cache and downloaded into it when missing.
    `device` defaults to cuda when available, else cpu; `dtype` ("auto" or None, "fp16",
    "bf16", "fp32", their long names or a torch dtype: `resolve_dtype`) to float16 on cuda
    (rotary tables stay fp32) and float32 elsewhere. `engine` picks the ESM2 forward: "fast"
    (`esm2_fast.FastESM2`) or "reference" (fair-esm's own); ESM C has one forward. Every
    failure is a one-line `ModelError`.
    """
    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    target = _resolve_device(device)
    precision = resolve_dtype(dtype, target)
    chosen = detect_backend(model) if backend == "auto" else backend
    loader = _LOADERS.get(chosen)
    if loader is None:
        names = ", ".join((*BACKENDS, *BACKEND_ALIASES))
        raise ModelError(f"unknown backend {backend!r}: use one of auto, {names}")
    return loader(model, target, precision, engine)


def esm2_from_module(
    module: ESM2,
    alphabet: esm.data.Alphabet,
    *,
    name: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    engine: Engine = "fast",
) -> LoadedModel:
    """An ESM2 already in memory (fair-esm's module, e.g. built with random weights for a
    benchmark) behind the same encoders `load_model` gives a checkpoint. `module` itself is
    prepared for inference and moved to `device` in `dtype` (in place: pass a copy to keep
    the original); defaults as in `load_model`."""
    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    target = _resolve_device(device)
    return _esm2(name, module, alphabet, target, resolve_dtype(dtype, target), engine,
                 "fair-esm")


def detect_backend(model: str | os.PathLike[str]) -> Backend:
    """fair-esm, hf, esmc or esm3, from what `model` names: a size or fair-esm name, a .pt
    in fair-esm's layout, an HF folder (config.json + weights) or hub id in the local HF
    cache, an ESM C checkpoint (.pth, .safetensors or folder), or ESM3's original weights
    (.pth or the esm3-sm-open-v1 folder; checked before ESM C, whose original folders
    look alike)."""
    text = str(model)
    if isinstance(model, str) and _registry_entry(model) is not None:
        return "fair-esm"
    path = Path(text).expanduser()
    if path.is_dir():
        if is_hf_esm2_dir(path):
            return "hf"
        if is_esm3_source(path):
            return "esm3"
        if is_esmc_source(path):
            return "esmc"
        raise ModelError(f"{path}: neither an ESM2 folder in the Hugging Face layout nor "
                         "an ESM C checkpoint; pass --backend to say which")
    if path.is_file():
        if path.suffix == ".pt":  # fair-esm's files; ESM C's originals are .pth
            return "fair-esm"
        if is_esm3_source(path):
            return "esm3"
        if is_esmc_source(path):
            return "esmc"
        return "hf" if is_hf_esm2_dir(path.parent) else "fair-esm"
    if looks_like_hub_id(text):
        try:
            folder = find_in_hf_cache(text)
        except ModelError:
            return "hf"  # read_hf_esm2 raises the one-line not-in-cache error
        if is_esm3_source(folder):
            return "esm3"
        return "esmc" if is_esmc_source(folder) else "hf"
    return "fair-esm"


def resolve_model(model: str | os.PathLike[str]) -> ModelSpec | Path:
    """A registry entry for a size or fair-esm name, else the existing checkpoint path."""
    if isinstance(model, str) and (spec := _registry_entry(model)) is not None:
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
                     f"esm2_t33_650M_UR50D, or a local checkpoint ({local_model_hint()})")


def _registry_entry(text: str) -> ModelSpec | None:
    """The published ESM2 that `text` names by size (any case) or fair-esm name."""
    for spec in ESM2_MODELS.values():
        if text.upper() == spec.size.upper() or text == spec.name:
            return spec
    return None


# --------------------------------------------------------------------------------------
# One loader per backend
# --------------------------------------------------------------------------------------


def _load_fair_esm(model: str | os.PathLike[str], device: torch.device,
                   dtype: torch.dtype, engine: Engine) -> LoadedModel:
    """A published size or name (hub cache, downloaded when missing) or a local .pt."""
    source = resolve_model(model)
    if isinstance(source, ModelSpec):
        name, path = source.name, hub_checkpoint(source.name)
    else:
        name, path = source.stem, source
    module, alphabet = build_module(name, read_checkpoint(path), path)
    return _esm2(name, module, alphabet, device, dtype, engine, "fair-esm")


def _load_hf(model: str | os.PathLike[str], device: torch.device,
             dtype: torch.dtype, engine: Engine) -> LoadedModel:
    """ESM2 in the Hugging Face layout (transformers' or FastESM's), renamed into fair-esm's
    and built by fair-esm, with the context of its model type."""
    name = hf_model_name(model)
    module, alphabet = build_module(name, read_hf_esm2(model), Path(model))
    return _esm2(name, module, alphabet, device, dtype, engine, "hf",
                 context=hf_max_residues(model))


def _load_fastesm(model: str | os.PathLike[str], device: torch.device,
                  dtype: torch.dtype, engine: Engine) -> LoadedModel:
    """backend "fastesm": the hf loader, for FastESM folders only."""
    found = hf_model_type(model)
    if found != FASTESM_MODEL_TYPE:
        raise ModelError(f"{model}: not a FastESM model (config model_type is {found!r}, "
                         f"expected {FASTESM_MODEL_TYPE!r}); use --backend hf")
    return _load_hf(model, device, dtype, engine)


def _esm2(name: str, module: ESM2, alphabet: esm.data.Alphabet, device: torch.device,
          dtype: torch.dtype, engine: Engine, backend: Backend, *,
          context: int | None = None) -> LoadedModel:
    """A fair-esm ESM2 prepared for inference, behind the encoder `engine` names; `context`
    overrides ESM2's 1,022 residues when the checkpoint was trained longer."""
    fingerprint = weights_fingerprint(module)
    module = prepare(module, device, dtype)
    fast = FastESM2.from_fair_esm(module) if engine == "fast" else None
    encoder: Encoder = (ReferenceEncoder(module, name, device, dtype) if fast is None
                        else FastEncoder(fast, name, device, dtype))
    if context == encoder.max_residues:
        context = None
    return LoadedModel(encoder=encoder, module=module, alphabet=alphabet, engine=engine,
                       backend=backend, fast=fast, fingerprint=fingerprint, context=context)


_Loader = Callable[[str | os.PathLike[str], torch.device, torch.dtype, Engine], LoadedModel]


def _trunk_loader(read: Callable[[str | os.PathLike[str]], ESMC | ESM3],
                  backend: Backend) -> _Loader:
    """The loader of a model that runs its own module with one forward, whatever `engine`
    asks (ESM C, ESM3); both share ESM2's token ids, so ESM2's alphabet tokenizes for them."""

    def load(model: str | os.PathLike[str], device: torch.device, dtype: torch.dtype,
             engine: Engine) -> LoadedModel:
        loaded = read(model)
        fingerprint = weights_fingerprint(loaded)  # as loaded, before the cast
        module = loaded.to(device=device, dtype=dtype)
        name = Path(str(model)).name.split(".")[0] or str(model)
        return LoadedModel(
            encoder=TrunkEncoder(module, name, device, dtype), module=module,
            alphabet=esm.data.Alphabet.from_architecture("ESM-1b"), engine="reference",
            backend=backend, fingerprint=fingerprint)

    return load


_LOADERS: dict[str, _Loader] = {
    "fair-esm": _load_fair_esm, "hf": _load_hf, "fastesm": _load_fastesm,
    "esmc": _trunk_loader(load_esmc, "esmc"), "esm3": _trunk_loader(load_esm3, "esm3")}
"""The loader of each `Backend` and `BACKEND_ALIASES` name."""


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, defaulting to cuda when available; a missing GPU is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"invalid device {device!r}: {first_line(exc)}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return target


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype for `device`: None or "auto" is float16 on cuda and float32
    elsewhere (CPUs without bf16/fp16 units run half precision several times slower);
    names like "bf16", "float16" or "torch.bfloat16" and torch dtypes are taken as they
    are. Anything else is a one-line `ModelError`."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}: use auto, fp16, bf16 or fp32 "
                         "(float16, bfloat16, float32)")
    return _DTYPES[key]
