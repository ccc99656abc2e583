"""inspect for the files that are not torch.save zips: the residue store (index.json), and
the exports (.npz, .parquet, .h5) and the .h5ad copy. Each is read by its header or
metadata only (numpy's .npy headers, parquet's footer, HDF5's shapes), never its data, so
inspecting a multi-GB export takes the same second as a small one.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from esm2_batch.errors import InputError

__all__ = ["inspect_other"]

Report = dict[str, Any]
_INDEX = "index.json"  # store/residues.py's INDEX_FILE (importing it would import torch)


def inspect_other(path: Path) -> Report | None:
    """The report for a store, npz, parquet, h5 or h5ad; None for anything else."""
    if path.is_dir() or path.name == _INDEX:
        return _residue_store(path if path.is_dir() else path.parent)
    suffix = path.suffix.lower()
    readers = {".npz": _npz, ".parquet": _parquet, ".h5": _h5, ".hdf5": _h5, ".h5ad": _h5ad}
    reader = readers.get(suffix)
    return reader(path) if reader is not None else None


def _residue_store(directory: Path) -> Report:
    index_path = directory / _INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        proteins = index["proteins"]
        lengths = [int(entry["length"]) for entry in proteins.values()]
    except FileNotFoundError:
        raise InputError(f"{directory}: a directory without {_INDEX}: not a residue store; "
                         "pass the <out>.residues/ directory a per_tok run wrote") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{index_path}: not a readable residue store index "
                         f"({type(exc).__name__}); rerun the per_tok run to rebuild it"
                         ) from None
    settings = index.get("settings") or {}
    return {"kind": "residues", "path": str(directory),
            "description": "per-residue states (--include per_tok residue store)",
            "provenance": {k: v for k, v in settings.items() if k != "matrices"},
            "proteins": len(proteins), "store_shards": len(index.get("shards", [])),
            "store_layers": list(index.get("layers", [])),
            "store_residues": f"{sum(lengths):,} ({min(lengths, default=0):,}-"
                              f"{max(lengths, default=0):,} per protein)",
            "matrices": {f"layer{layer}": {"rows": sum(lengths), "dim": index.get("dim"),
                                           "dtype": index.get("dtype")}
                         for layer in index.get("layers", [])}}


def _npz(path: Path) -> Report:
    import numpy as np

    arrays: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                with archive.open(name) as handle:
                    if name == "meta.npy":  # a 0-d unicode array: small, read whole
                        meta = json.loads(str(np.lib.format.read_array(
                            handle, allow_pickle=False)[()]))
                        continue
                    major, _ = np.lib.format.read_magic(handle)
                    header = (np.lib.format.read_array_header_1_0 if major == 1
                              else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = header(handle)
                    arrays[name.removesuffix(".npy")] = {"shape": list(shape),
                                                         "dtype": str(dtype)}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz ({type(exc).__name__}); pass a "
                         "file 'esm2-batch export --format npz' wrote") from None
    return {"kind": "npz", "path": str(path), "description": "per-gene export (npz)",
            "provenance": meta, "genes": arrays.get("genes", {}).get("shape", [0])[0],
            "matrices": {k: v for k, v in arrays.items() if k == "vectors"}}


def _parquet(path: Path) -> Report:
    try:
        import pyarrow.parquet as pq

        metadata = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except ImportError:
        raise InputError("inspecting .parquet needs pyarrow: pip install "
                         "'esm2-batch[parquet]'") from None
    except Exception as exc:  # pyarrow raises its own types for damaged files
        raise InputError(f"{path}: not a readable .parquet ({type(exc).__name__})") from None
    raw = (schema.metadata or {}).get(b"esm2")
    meta = json.loads(raw) if raw else {}
    return {"kind": "parquet", "path": str(path), "description": "per-gene export (parquet)",
            "provenance": meta, "genes": metadata.num_rows,
            "columns": ", ".join(schema.names)}


def _h5(path: Path) -> Report:
    h5py = _import_h5py()
    try:
        with h5py.File(path, "r") as handle:
            attrs = {k: _plain(v) for k, v in handle.attrs.items()}
            names = list(handle.keys())
            first = handle[names[0]] if names else None
            shape = list(first.shape) if first is not None else []
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from None
    return {"kind": "h5", "path": str(path), "description": "one dataset per protein "
            "(export --format h5)", "provenance": attrs, "proteins": len(names),
            "datasets": f"{len(names):,}, the first {shape}"}


def _h5ad(path: Path) -> Report:
    h5py = _import_h5py()
    try:
        with h5py.File(path, "r") as handle:
            varm = handle.get("varm")
            matrix = varm.get("X_esm2") if varm is not None else None
            uns = handle.get("uns/esm2")
            meta = {k: _plain(uns[k][()]) for k in uns} if uns is not None else {}
            n_vars = (len(handle["var"][handle["var"].attrs["_index"]])
                      if "var" in handle else 0)
            shape = list(matrix.shape) if matrix is not None else None
    except (OSError, KeyError) as exc:
        raise InputError(f"{path}: not a readable .h5ad ({exc})") from None
    if shape is None:
        raise InputError(f"{path}: an .h5ad without varm['X_esm2']; write one with "
                         "esm2-batch --hvg_file FILE.h5ad --write_h5ad OUT.h5ad")
    return {"kind": "h5ad", "path": str(path), "description": "AnnData copy with ESM2 "
            "vectors (--write_h5ad)", "provenance": meta, "vars": f"{n_vars:,}",
            "matrices": {"varm['X_esm2']": {"shape": shape, "dtype": "float32"}}}


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise InputError("inspecting HDF5 files needs h5py: pip install "
                         "'esm2-batch[anndata]'") from None
    return h5py


def _plain(value: Any) -> Any:
    """HDF5 attribute values as JSON-able Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
