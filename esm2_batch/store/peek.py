"""Look inside a torch.save file without torch and without running any of its code.

`esm2-batch inspect` answers "what is in this file?" in a fraction of a second, for files
of hundreds of MB, on a laptop where importing torch alone takes seconds. A torch.save
file is a zip: `<name>/data.pkl` (the object tree, pickled) and `<name>/data/<key>` (each
tensor's raw bytes). This module unpickles data.pkl with an unpickler that knows exactly
the globals our files use (a tensor rebuild, typed storages, OrderedDict) and refuses any
other: a pickle that would import or call anything else is named, never run (the same
guarantee as torch.load(weights_only=True)). Tensors come back as `TensorInfo` (dtype,
shape), and `read_rows` reads a 2-D tensor's bytes straight from the zip when a caller
wants to hash rows.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ForeignFile", "TensorInfo", "as_mapping", "peek_torch_file"]

_STORAGE_DTYPES = {
    "HalfStorage": ("float16", 2), "FloatStorage": ("float32", 4),
    "BFloat16Storage": ("bfloat16", 2), "DoubleStorage": ("float64", 8),
    "LongStorage": ("int64", 8), "IntStorage": ("int32", 4), "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1), "BoolStorage": ("bool", 1),
}


class ForeignFile(Exception):
    """The file is not a torch.save file of plain data (or it is damaged): the message
    says which, in a few words the caller puts into its own one-line error."""


@dataclass(frozen=True)
class _Storage:
    dtype: str
    itemsize: int
    key: str


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the file describes it; its data stay in the zip until asked for."""

    dtype: str
    shape: tuple[int, ...]
    storage_key: str
    offset: int  # in elements
    stride: tuple[int, ...]
    itemsize: int

    @property
    def contiguous(self) -> bool:
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        return tuple(reversed(expected)) == self.stride


@dataclass(frozen=True)
class _StorageType:
    name: str


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_: Any) -> TensorInfo:
    return TensorInfo(storage.dtype, tuple(size), storage.key, int(offset), tuple(stride),
                      storage.itemsize)


def _ordered_dict(*args: Any) -> dict[Any, Any]:
    return dict(*args)


class _PlainUnpickler(pickle.Unpickler):
    """Only the globals a torch.save of tensors, lists, dicts and scalars uses."""

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)  # type: ignore[return-value]
        if (module, name) == ("collections", "OrderedDict"):
            return _ordered_dict
        raise ForeignFile(f"its pickle asks for {module}.{name}, which a file of plain "
                          "tensors and lists never does (refused: loading it could run "
                          "code)")

    def persistent_load(self, pid: Any) -> _Storage:
        try:
            kind, storage_type, key, _location, _numel = pid
        except (TypeError, ValueError) as exc:
            raise ForeignFile("its pickle references storage in an unknown way") from exc
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise ForeignFile("its pickle references storage in an unknown way")
        dtype, itemsize = _STORAGE_DTYPES[storage_type.name]
        return _Storage(dtype, itemsize, str(key))


@dataclass
class PeekedFile:
    """The object tree of a torch.save file, tensors as TensorInfo; `read` gives bytes."""

    path: Path
    root: Any
    prefix: str

    def read_rows(self, tensor: TensorInfo, chunk_rows: int = 4096) -> Iterator[bytes]:
        """A contiguous 2-D tensor's rows, each as its raw bytes (for hashing rows)."""
        if len(tensor.shape) != 2 or not tensor.contiguous:
            raise ForeignFile("the tensor is not a contiguous matrix")
        rows, cols = tensor.shape
        width = cols * tensor.itemsize
        with zipfile.ZipFile(self.path) as archive, archive.open(
                f"{self.prefix}data/{tensor.storage_key}") as handle:
            handle.seek(tensor.offset * tensor.itemsize)
            done = 0
            while done < rows:
                take = min(chunk_rows, rows - done)
                block = handle.read(take * width)
                if len(block) != take * width:
                    raise ForeignFile("its tensor data end early (truncated)")
                for i in range(take):
                    yield block[i * width:(i + 1) * width]
                done += take


def peek_torch_file(path: Path) -> PeekedFile:
    """The file's object tree without torch; ForeignFile when it is not a torch.save zip of
    plain data, is truncated, or would run code."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")
                       or n == "data.pkl"]
            if not pickles:
                raise ForeignFile("it is a zip file without torch's data.pkl")
            data = archive.read(pickles[0])
            prefix = pickles[0].removesuffix("data.pkl")
    except zipfile.BadZipFile as exc:
        raise ForeignFile("it is not a torch.save file (not a zip archive), or it is "
                          "truncated") from exc
    except (OSError, EOFError, zipfile.LargeZipFile) as exc:
        raise ForeignFile(f"it cannot be read ({exc})") from exc
    try:
        root = _PlainUnpickler(io.BytesIO(data)).load()
    except ForeignFile:
        raise
    except Exception as exc:  # a damaged pickle raises anything: one line, not a trace
        raise ForeignFile(f"its data.pkl is damaged ({type(exc).__name__})") from exc
    return PeekedFile(path, root, prefix)


def as_mapping(value: object) -> Mapping[str, Any]:
    """A dict a file recorded (meta's per-gene maps), or an empty one when the file lacks
    it: files of older versions miss keys that newer ones write."""
    return value if isinstance(value, Mapping) else {}
