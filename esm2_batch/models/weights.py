"""Checkpoint readers: every way weights reach this package, each failure one `ModelError` line.

- fair-esm's ``.pt`` (`read_checkpoint`): fair-esm calls ``torch.load`` without
  ``weights_only``, which torch >= 2.6 refuses for its checkpoints ("Unsupported global:
  argparse.Namespace"). Here they load with ``weights_only=True`` and an allow-list of
  exactly the globals the official files hold (`CHECKPOINT_GLOBALS`); published models are
  fetched into torch hub's cache (`hub_checkpoint`) with a timeout, so offline fails fast.
- Hugging Face folders (``config.json`` + weights): ``pytorch_model.bin`` with
  ``torch.load(weights_only=True)``, ``model.safetensors`` with `read_safetensors`, a
  short reader of that deliberately simple format (8-byte header length, a JSON header of
  dtype/shape/offsets, raw little-endian bytes), and shards (``*.index.json``). No
  optional package is needed, and a malformed file fails as one line instead of deep in a
  third-party parser; the tests check the reader against the ``safetensors`` package.
- Hub ids (``org/name``) are looked up in the local HF cache only (``HF_HUB_CACHE``, else
  ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``): nothing is downloaded from the hub,
  and a missing model is an error that says how to get it there.

What the tensors mean (ESM2 in the HF layout, ESM C) is hf_esm2.py's and esmc.py's
business; this module only reads them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import pickle
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeGuard

import torch
from tqdm import tqdm

from esm2_batch.errors import ModelError, first_line, name_some

Tensor = torch.Tensor

MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for the download server (connect and each read): offline fails fast."""

CHECKPOINT_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""Globals allowed beyond torch's weights-only defaults: the fairseq config
``cfg["model"]`` of the official ESM2 files is an ``argparse.Namespace``. Should a file
pickle anything else, `read_checkpoint` names it in a ModelError instead of loading it."""

CONFIG_FILE = "config.json"
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Weight files of a Hugging Face model folder, in the order they are preferred."""

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------
# fair-esm checkpoints and the download
# --------------------------------------------------------------------------------------


def local_model_hint(what: str = "PATH") -> str:
    """How to load a local model, for Python callers and the command line alike: the
    library raises the message and cannot tell which of the two is reading it."""
    return f"load_model({what}) in Python, --model_path {what} on the command line"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a fair-esm checkpoint with weights_only=True and the `CHECKPOINT_GLOBALS`."""
    data = load_weights_only(path, allowed=CHECKPOINT_GLOBALS)
    if not _is_esm2_layout(data):
        raise ModelError(f"cannot load {path}: not an ESM2 checkpoint in fair-esm's layout "
                         f"(needs 'model' and cfg['model'] with encoder_layers)")
    return data


def load_weights_only(path: Path, *, allowed: tuple[type, ...] = ()) -> object:
    """``torch.load(path, weights_only=True)`` with `allowed` extra globals, on the CPU.

    A pickled global outside the allow-list is named in the error (the user can see what
    the file holds); any other failure of the unpickler means a damaged or foreign file."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = (f"it pickles {found.group(1)}, which is not allowed" if found
               else "not a readable checkpoint")
        raise ModelError(f"cannot load {path}: {why}") from None
    except Exception as exc:  # a corrupt file fails anywhere in the unpickler (IndexError...)
        raise ModelError(f"cannot load {path}: not a readable checkpoint "
                         f"({first_line(exc)})") from None


def _is_esm2_layout(data: object) -> TypeGuard[dict[str, Any]]:
    """Whether `data` has what fair-esm's ESM2 loader reads: weights and cfg.model."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return False
    cfg = data.get("cfg")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    return all(hasattr(model_cfg, key) for key in
               ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads"))


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
            f"or load a local checkpoint: {local_model_hint()}"
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


# --------------------------------------------------------------------------------------
# Hugging Face folders and weight files
# --------------------------------------------------------------------------------------


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


def find_weights_file(folder: Path) -> Path | None:
    """The preferred weights file of an HF folder (see `WEIGHT_FILES`), or None."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's weights (single file or shards), by its stored name."""
    weights = find_weights_file(folder)
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
    state = load_weights_only(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"cannot load {path}: not a state dict of tensors")
    return dict(state)


def weight_names(path: Path) -> list[str]:
    """Tensor names of a weights file without reading its data (a safetensors header, or
    an mmap'd torch file), for probing what a file is. Raises on unreadable files."""
    if path.suffix == ".safetensors":
        with path.open("rb") as file:
            header, _ = _safetensors_header(file, os.fstat(file.fileno()).st_size, path)
        return [name for name in header if name != "__metadata__"]
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return list(state) if isinstance(state, Mapping) else []


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
        raise ModelError(f"cannot load {index}: {name_some(absent)} listed but in no shard")
    return state


def _safetensors_header(
    file: io.BufferedIOBase, size: int, path: Path
) -> tuple[dict[str, Any], int]:
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


def _read_tensor(
    file: io.BufferedIOBase, name: str, info: Any, base: int, size: int, path: Path
) -> Tensor:
    """One tensor described by its JSON header entry {dtype, shape, data_offsets}."""
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


def compare_keys(
    state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str]]:
    """(missing, unknown): the `expected` names `state` lacks, and its names not expected,
    each in order, for a strict load that names what is wrong."""
    missing = [name for name in expected if name not in state]
    return missing, [name for name in state if name not in expected]


def wrong_shape(
    state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """(name, its shape, the expected shape) of the first tensor of `state` whose shape is
    not the expected one, or None; every expected name must be in `state`."""
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            return name, tuple(state[name].shape), shape
    return None


# --------------------------------------------------------------------------------------
# The local Hugging Face cache
# --------------------------------------------------------------------------------------


def looks_like_hub_id(text: str | os.PathLike[str]) -> bool:
    """Whether `text` reads as ``org/name`` and is not an existing path."""
    return isinstance(text, str) and bool(_HUB_ID.match(text)) and not Path(text).exists()


def locate(path_or_hub_id: str | os.PathLike[str]) -> Path | None:
    """The existing file or folder `path_or_hub_id` names, else the cached snapshot of the
    hub id it reads as (a `ModelError` when not cached), else None."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(path_or_hub_id):
        return find_in_hf_cache(str(path_or_hub_id))
    return None


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
            f"(set HF_HOME or HF_HUB_CACHE to that cache) or load its folder: "
            f"{local_model_hint('FOLDER')}"
        )
    return snapshot


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


UNLOADED_PREFIXES = ("contact_head.",)
"""Weights the loaders never read (fair-esm's contact regression: embeddings do not use it,
so it keeps its random initialisation) and that must not change the fingerprint."""


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of the weights themselves: every state-dict entry's name, dtype, shape and
    bytes, as loaded (before any cast to the run's dtype).

    Rows are reused across runs only when this matches, so a fine-tuned checkpoint saved
    under the same file name, or another seed, can never lend its rows to a run of
    different weights. Each tensor is hashed in a worker thread (hashlib releases the GIL
    on large buffers): ESM2-650M's 2.6 GB hash in a few seconds on two cores.
    """
    state = sorted((name, tensor) for name, tensor in module.state_dict().items()
                   if not name.startswith(UNLOADED_PREFIXES))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_tensor_digest, state))
    combined = hashlib.blake2b(digest_size=16)
    for digest in digests:
        combined.update(digest)
    return combined.hexdigest()


def _tensor_digest(item: tuple[str, Tensor]) -> bytes:
    name, tensor = item
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.blake2b(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode(),
                             digest_size=16)
    digest.update(data.numpy().data)
    return digest.digest()
