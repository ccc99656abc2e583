"""ESM2 weights in the Hugging Face layout, mapped onto fair-esm's official checkpoint layout.

Many users hold ESM2 as a Hugging Face model (``facebook/esm2_t33_650M_UR50D`` in their HF
cache, or a folder with ``config.json`` + ``model.safetensors``) rather than fair-esm's
``.pt``. `read_hf_esm2` renames those weights into exactly the dict fair-esm publishes
(what ``tests/fakes/tiny_esm.official_layout`` writes), so the project's own loader
(``models._build``) and engines run them: one ESM2 implementation, one set of row
semantics, and no ``transformers`` at run time (it would pull tokenizers, hub clients and
its own attention/padding code paths into a tool that only needs a state dict).

The key map (transformers' ``convert_esm.py`` is the reference for the names), after an
optional ``esm.`` prefix (present when ``EsmForMaskedLM`` saved the file, absent when
``EsmModel`` did)::

    embeddings.word_embeddings.weight                  embed_tokens.weight
    encoder.layer.N.attention.self.{query,key,value}   layers.N.self_attn.{q,k,v}_proj
    encoder.layer.N.attention.output.dense             layers.N.self_attn.out_proj
    encoder.layer.N.attention.LayerNorm                layers.N.self_attn_layer_norm
    encoder.layer.N.intermediate.dense                 layers.N.fc1
    encoder.layer.N.output.dense                       layers.N.fc2
    encoder.layer.N.LayerNorm                          layers.N.final_layer_norm
    encoder.emb_layer_norm_after                       emb_layer_norm_after
    encoder.layer.N.attention.self.rotary_embeddings.inv_freq   layers.N.self_attn.rot_emb.inv_freq
    rotary_embeddings.inv_freq  (transformers >= 5)    every layer's rot_emb.inv_freq
    lm_head.{dense,layer_norm}, lm_head.decoder.weight, lm_head.bias   lm_head.*

Rotary frequencies: ESM2 was trained in fp16, which rounded its ``inv_freq`` buffer, and
the published checkpoints (fair-esm's and the HF ones, per layer) carry the rounded values
(0.7500 instead of 0.7499, ...). Recomputing them shifts the rows measurably, so the
checkpoint's values are carried into ``rot_emb.inv_freq`` and only recomputed (from
``rope_theta``) when a file has none. Whatever runs the result must use that buffer.

Dropped on purpose: ``contact_head.*`` (fair-esm keeps contact regression in a separate
file the project never loads), ``pooler.*``, ``embeddings.position_ids``. An ``EsmModel``
file has no LM head; fair-esm's loader requires one, so it gets the tied embedding matrix
and a neutral dense/LayerNorm: logits of such a model mean nothing, embeddings are exact.

Files are read without optional packages: ``pytorch_model.bin`` with
``torch.load(weights_only=True)``, ``model.safetensors`` with `read_safetensors`, a
short reader of that deliberately simple format (8-byte header length, a JSON header of
dtype/shape/offsets, raw little-endian bytes). That keeps ``--backend hf`` free of extras
and lets every malformed file fail as a one-line `ModelError`; the tests check the reader
against the ``safetensors`` package. Sharded checkpoints (``*.index.json``) work too.

Hub ids are looked up in the local HF cache only (``HF_HUB_CACHE``, else ``HF_HOME/hub``,
else ``~/.cache/huggingface/hub``): nothing is ever downloaded, and a missing model is a
one-line error that says how to fetch it or point ``--model_path`` at a folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from esm2_batch.errors import ModelError

Tensor = torch.Tensor

CONFIG_FILE = "config.json"
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Weight files of a Hugging Face model folder, in the order they are preferred."""

ESM2_VOCAB_SIZE = 33
ESM2_LAYER_NORM_EPS = 1e-5
ROTARY_THETA = 10000.0

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# HF name (after the optional "esm." prefix) of each per-layer fair-esm parameter.
_LAYER_MAP: dict[str, str] = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_INV_FREQ = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.self\.rotary_embeddings\.inv_freq$")
_MODEL_INV_FREQ = "rotary_embeddings.inv_freq"
_LM_HEAD_MAP: dict[str, str] = {
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.decoder.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}
_IGNORED = re.compile(
    r"^(contact_head\.regression\.(weight|bias)|pooler\.dense\.(weight|bias)"
    r"|embeddings\.position_ids|embeddings\.position_embeddings\.weight)$"
)
"""Body keys with no place in a rotary ESM2 embedder (transformers skips the last one too)."""
_TIED_DECODER_BIAS = "lm_head.decoder.bias"  # some saves repeat lm_head.bias here


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def read_hf_esm2(path_or_hub_id: str | os.PathLike[str]) -> dict[str, Any]:
    """An HF-layout ESM2 (folder, file in it, or cached hub id) in fair-esm's checkpoint layout.

    Returns ``{"model": {official name: tensor}, "cfg": {"model": Namespace(...)}}``, what
    ``esm.pretrained.load_model_and_alphabet_core`` (and ``models._build``) consume.
    """
    folder = resolve_hf_folder(path_or_hub_id)
    config = read_hf_config(folder)
    dims = _esm2_dims(config, folder)
    state = read_hf_weights(folder)
    return {"model": _to_official(state, dims, folder), "cfg": {"model": dims.namespace()}}


def is_hf_esm2_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a folder holding an HF ESM2 (config model_type "esm" plus weights).

    Never raises: it is meant for choosing a backend from what ``--model_path`` points at.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir() or _weights_file(folder) is None:
        return False
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "esm"


def looks_like_hub_id(text: str | os.PathLike[str]) -> bool:
    """Whether `text` reads as ``org/name`` and is not an existing path."""
    return isinstance(text, str) and bool(_HUB_ID.match(text)) and not Path(text).exists()


def hf_cache_dir() -> Path:
    """The HF hub cache, resolved as huggingface_hub does: HF_HUB_CACHE, the older
    HUGGINGFACE_HUB_CACHE, HF_HOME/hub, then XDG_CACHE_HOME or ~/.cache + huggingface/hub."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def find_in_hf_cache(hub_id: str, *, revision: str = "main") -> Path:
    """The snapshot folder of `hub_id` in the local HF cache; a `ModelError` when absent.

    `revision` is a branch/tag name (resolved through ``refs/``) or a commit hash. Nothing
    is downloaded: this tool works offline, so a missing model is an error saying how to
    get it there.
    """
    cache = hf_cache_dir()
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = _snapshot(repo, revision)
    if snapshot is None:
        raise ModelError(
            f"{hub_id} (revision {revision}) is not in the local Hugging Face cache {cache}; "
            f"nothing is downloaded: run `hf download {hub_id}` where there is network "
            f"(set HF_HOME or HF_HUB_CACHE to that cache) or pass its folder with --model_path"
        )
    return snapshot


def resolve_hf_folder(path_or_hub_id: str | os.PathLike[str]) -> Path:
    """The model folder behind a folder, a weights/config file inside one, or a hub id."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    if looks_like_hub_id(path_or_hub_id):
        return find_in_hf_cache(str(path_or_hub_id))
    raise ModelError(f"Hugging Face model not found: {path} is neither a folder nor a hub id "
                     f"like facebook/esm2_t33_650M_UR50D")


def hf_model_name(path_or_hub_id: str | os.PathLike[str]) -> str:
    """A readable model name: the hub id's name, the cache entry's, else the folder's."""
    text = str(path_or_hub_id)
    if looks_like_hub_id(text):
        return text.split("/", 1)[1]
    folder = Path(text).expanduser()
    folder = folder.parent if folder.is_file() else folder
    for part in (folder, *folder.parents):
        if part.name.startswith("models--"):
            return part.name.split("--")[-1]
    return folder.resolve().name


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict; a `ModelError` when missing or not JSON."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"cannot load {folder}: no {CONFIG_FILE} (a Hugging Face model "
                         f"folder needs config.json next to its weights)") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {path}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"cannot load {path}: not a JSON object")
    return config


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's weights (single file or shards), by its stored name."""
    weights = _weights_file(folder)
    if weights is None:
        names = ", ".join(WEIGHT_FILES)
        raise ModelError(f"cannot load {folder}: no weights file (expected one of {names})")
    if weights.name.endswith(".index.json"):
        return _read_sharded(weights)
    return read_weights_file(weights)


def read_weights_file(path: Path) -> dict[str, Tensor]:
    """One ``.safetensors`` file, or a torch-saved state dict read with weights_only=True."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = (f"it pickles {found.group(1)}, which weights-only loading refuses" if found
               else "not a readable checkpoint")
        raise ModelError(f"cannot load {path}: {why}") from None
    except Exception as exc:  # a corrupt file fails anywhere in the unpickler
        why = f"not a readable checkpoint ({_first_line(exc)})"
        raise ModelError(f"cannot load {path}: {why}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"cannot load {path}: not a state dict of tensors")
    return dict(state)


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file (format: u64-LE header size, JSON header, data).

    Each tensor is read into its own buffer, so nothing stays tied to the open file.
    """
    path = Path(path)
    if sys.byteorder != "little":
        raise ModelError(f"cannot load {path}: safetensors reading needs a little-endian CPU")
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            header, base = _safetensors_header(file, size, path)
            return {name: _read_tensor(file, name, info, base, size, path)
                    for name, info in header.items() if name != "__metadata__"}
    except OSError as exc:
        raise ModelError(f"cannot load {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------
# Files and the cache
# --------------------------------------------------------------------------------------


def _weights_file(folder: Path) -> Path | None:
    """The preferred weights file of an HF folder, or None."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_sharded(index: Path) -> dict[str, Tensor]:
    """Merge the shards an ``*.index.json`` names; every key of its weight_map must appear."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"cannot load {index}: not a shard index with a weight_map") from None
    state: dict[str, Tensor] = {}
    for shard in shards:
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise ModelError(f"cannot load {index}: shard {shard} is missing "
                             f"(incomplete download?)")
        state.update(read_weights_file(shard_path))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise ModelError(f"cannot load {index}: {_some(absent)} listed but in no shard")
    return state


def _safetensors_header(file: Any, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the offset where the data buffer starts."""
    prefix = file.read(8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if length < 2 or length > min(size - 8, _MAX_HEADER_BYTES):
        raise ModelError(f"cannot load {path}: not a safetensors file (bad header size)")
    try:
        header = json.loads(file.read(length))
    except (ValueError, UnicodeDecodeError):
        why = "not a safetensors file (header is not JSON)"
        raise ModelError(f"cannot load {path}: {why}") from None
    if not isinstance(header, dict):
        raise ModelError(f"cannot load {path}: not a safetensors file (header is not an object)")
    return header, 8 + length


def _read_tensor(file: Any, name: str, info: Any, base: int, size: int, path: Path) -> Tensor:
    """One tensor described by its header entry {dtype, shape, data_offsets}."""
    try:
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        why = f"bad or unsupported header entry for {name}"
        raise ModelError(f"cannot load {path}: {why}") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0 or base + end > size:
        raise ModelError(f"cannot load {path}: tensor {name} lies outside the file (truncated?)")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = bytearray(nbytes)
    file.seek(base + begin)
    if file.readinto(buffer) != nbytes:
        raise ModelError(f"cannot load {path}: file ends inside tensor {name} (truncated?)")
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _snapshot(repo: Path, revision: str) -> Path | None:
    """The cache snapshot of `revision` (refs/<name> -> commit, or a commit itself); for
    "main" without refs (a cache copied by hand), the only snapshot there is."""
    ref = repo / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if snapshot.is_dir():
        return snapshot
    if revision == "main" and not ref.exists() and (repo / "snapshots").is_dir():
        found = [path for path in (repo / "snapshots").iterdir() if path.is_dir()]
        return found[0] if len(found) == 1 else None
    return None


# --------------------------------------------------------------------------------------
# The key map
# --------------------------------------------------------------------------------------


class _Dims:
    """The architecture facts fair-esm needs, read from an ESM2 ``config.json``."""

    def __init__(self, layers: int, embed_dim: int, heads: int, token_dropout: bool,
                 rope_theta: float) -> None:
        self.layers, self.embed_dim, self.heads = layers, embed_dim, heads
        self.token_dropout, self.rope_theta = token_dropout, rope_theta

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    def namespace(self) -> argparse.Namespace:
        """fairseq's ``cfg["model"]``, as in the official files."""
        return argparse.Namespace(
            encoder_layers=self.layers, encoder_embed_dim=self.embed_dim,
            encoder_attention_heads=self.heads, token_dropout=self.token_dropout)

    def default_inv_freq(self) -> Tensor:
        """Unrounded rotary frequencies (fair-esm's formula), only for files without any."""
        exponent = torch.arange(0, self.head_dim, 2).float() / self.head_dim  # (D/2,)
        return 1.0 / (self.rope_theta ** exponent)


def _esm2_dims(config: Mapping[str, Any], folder: Path) -> _Dims:
    """Check that `config` describes an ESM2 fair-esm can build, and read its shape."""
    def refuse(why: str) -> ModelError:
        return ModelError(f"cannot load {folder}: not an ESM2 model ({why}); "
                          f"ESM-1b/1v and ESMFold checkpoints are not supported")

    if config.get("model_type", "esm") != "esm":
        raise refuse(f"model_type is {config.get('model_type')!r}, expected 'esm'")
    try:
        layers, embed = int(config["num_hidden_layers"]), int(config["hidden_size"])
        heads, ffn = int(config["num_attention_heads"]), int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        raise refuse("config.json lacks num_hidden_layers/hidden_size/num_attention_heads/"
                     "intermediate_size") from None
    checks = (
        (config.get("position_embedding_type") == "rotary", "position embeddings not rotary"),
        (not config.get("emb_layer_norm_before"), "emb_layer_norm_before is set"),
        (not config.get("is_folding_model"), "an ESMFold model"),
        (int(config.get("vocab_size", ESM2_VOCAB_SIZE)) == ESM2_VOCAB_SIZE, "vocab_size is not 33"),
        (ffn == 4 * embed, "intermediate_size is not 4 x hidden_size"),
        (heads > 0 and embed % heads == 0, "hidden_size is not a multiple of the heads"),
        (abs(float(config.get("layer_norm_eps", ESM2_LAYER_NORM_EPS)) - ESM2_LAYER_NORM_EPS)
         < 1e-9, "layer_norm_eps is not 1e-5"),
    )
    for ok, why in checks:
        if not ok:
            raise refuse(why)
    return _Dims(layers, embed, heads, bool(config.get("token_dropout", True)), _rope_theta(config))


def _rope_theta(config: Mapping[str, Any]) -> float:
    """The rotary base: ``rope_parameters.rope_theta`` (transformers 5), ``rope_theta``, 1e4."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, Mapping) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(config.get("rope_theta", ROTARY_THETA))


def _to_official(state: Mapping[str, Tensor], dims: _Dims, folder: Path) -> dict[str, Tensor]:
    """Rename HF keys to fair-esm's; strict: unknown keys, missing keys and shapes fail."""
    prefix = "esm." if any(key.startswith("esm.") for key in state) else ""
    body: dict[str, Tensor] = {}
    unknown: list[str] = []
    shared_inv_freq: Tensor | None = None
    for key, value in state.items():
        name = _official_name(key, prefix)
        if name is None:
            unknown.append(key)
        elif name == _MODEL_INV_FREQ:
            shared_inv_freq = value
        elif name:
            body[name] = value.float() if name.endswith(".inv_freq") else value
    if unknown:
        raise ModelError(f"cannot load {folder}: unexpected weights for an ESM2 ({_some(unknown)})")
    _fill_rotary(body, shared_inv_freq, dims)
    _fill_lm_head(body)
    _check_complete(body, dims, folder)
    return {_official_key(name): value for name, value in body.items()}


def _official_name(key: str, prefix: str) -> str | None:
    """fair-esm's module-level name for an HF key: "" to drop it, `_MODEL_INV_FREQ` for the
    model-level rotary buffer, None when the key is not part of an ESM2."""
    if key in _LM_HEAD_MAP:
        return _LM_HEAD_MAP[key]
    if key == _TIED_DECODER_BIAS:
        return ""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    if _IGNORED.match(rest):
        return ""
    if rest == "embeddings.word_embeddings.weight":
        return "embed_tokens.weight"
    if rest.startswith("encoder.emb_layer_norm_after."):
        return rest.removeprefix("encoder.")
    if rest == _MODEL_INV_FREQ:
        return _MODEL_INV_FREQ
    if found := _LAYER_INV_FREQ.match(rest):
        return f"layers.{found.group(1)}.self_attn.rot_emb.inv_freq"
    found = _LAYER_KEY.match(rest)
    if found and found.group(2) in _LAYER_MAP:
        return f"layers.{found.group(1)}.{_LAYER_MAP[found.group(2)]}.{found.group(3)}"
    return None


def _fill_rotary(body: dict[str, Tensor], shared: Tensor | None, dims: _Dims) -> None:
    """Each layer's rot_emb.inv_freq: its own stored value, else the model-level one, else
    recomputed. Stored values are kept exactly (as float32), rounding included."""
    fallback = dims.default_inv_freq() if shared is None else shared.float()
    for layer in range(dims.layers):
        body.setdefault(f"layers.{layer}.self_attn.rot_emb.inv_freq", fallback)


def _fill_lm_head(body: dict[str, Tensor]) -> None:
    """fair-esm requires an LM head; an EsmModel file has none: tie the decoder to the token
    embeddings (as fair-esm does) and make the rest neutral. Embeddings never use it."""
    embed = body.get("embed_tokens.weight")
    if embed is None:
        return  # reported as missing by _check_complete
    vocab, dim = embed.shape
    neutral = {
        "lm_head.weight": embed,
        "lm_head.bias": torch.zeros(vocab, dtype=embed.dtype),
        "lm_head.dense.weight": torch.eye(dim, dtype=embed.dtype),
        "lm_head.dense.bias": torch.zeros(dim, dtype=embed.dtype),
        "lm_head.layer_norm.weight": torch.ones(dim, dtype=embed.dtype),
        "lm_head.layer_norm.bias": torch.zeros(dim, dtype=embed.dtype),
    }
    for name, value in neutral.items():
        body.setdefault(name, value)


def _expected_shapes(dims: _Dims) -> dict[str, tuple[int, ...]]:
    """Every fair-esm ESM2 parameter (contact regression aside) and its shape."""
    e, ffn = dims.embed_dim, 4 * dims.embed_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (ESM2_VOCAB_SIZE, e)}
    for layer in range(dims.layers):
        at = f"layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{at}self_attn.{proj}.weight": (e, e),
                           f"{at}self_attn.{proj}.bias": (e,)})
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes.update({f"{at}{norm}.weight": (e,), f"{at}{norm}.bias": (e,)})
        shapes.update({f"{at}fc1.weight": (ffn, e), f"{at}fc1.bias": (ffn,),
                       f"{at}fc2.weight": (e, ffn), f"{at}fc2.bias": (e,),
                       f"{at}self_attn.rot_emb.inv_freq": (dims.head_dim // 2,)})
    shapes.update({"emb_layer_norm_after.weight": (e,), "emb_layer_norm_after.bias": (e,),
                   "lm_head.weight": (ESM2_VOCAB_SIZE, e), "lm_head.bias": (ESM2_VOCAB_SIZE,),
                   "lm_head.dense.weight": (e, e), "lm_head.dense.bias": (e,),
                   "lm_head.layer_norm.weight": (e,), "lm_head.layer_norm.bias": (e,)})
    return shapes


def _check_complete(body: Mapping[str, Tensor], dims: _Dims, folder: Path) -> None:
    """Same keys and shapes as the ESM2 config.json describes, or one-line errors."""
    expected = _expected_shapes(dims)
    missing = [name for name in expected if name not in body]
    extra = [name for name in body if name not in expected]
    if missing or extra:
        what = (f"missing {_some(missing)}" if missing
                else f"weights beyond config.json ({_some(extra)})")
        raise ModelError(f"cannot load {folder}: {what} for the {dims.layers}-layer ESM2 "
                         f"that config.json describes")
    for name, shape in expected.items():
        if tuple(body[name].shape) != shape:
            raise ModelError(f"cannot load {folder}: {name} has shape {tuple(body[name].shape)}, "
                             f"config.json implies {shape}")


def _official_key(name: str) -> str:
    """fairseq's prefix: the LM head sits under encoder., the rest under the sentence encoder."""
    return f"encoder.{name}" if name.startswith("lm_head.") else f"encoder.sentence_encoder.{name}"


def _some(names: Iterable[str], limit: int = 3) -> str:
    """A few names and how many more, so a message stays one line."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
