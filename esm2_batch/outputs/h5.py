"""HDF5 export in the layout of UniProt's embedding downloads: one dataset per protein id
at the file's root.

    residue store  ->  /<protein id>  [L, dim]   (--h5_dtype float16, the stored precision,
                                                  or float32)
    esm_all.pt     ->  /<protein id>  [dim]      (the rows of `key`, float32 by default)

The file's attributes say what the vectors are: "source" ("residues" or "pooled"),
"model", "layer" (and for esm_all.pt "matrix", "pooling"), "dim", "dtype" and
"settings" (JSON: what the states depend on). Written protein by protein from the
store's reader (one [L, dim] tensor in memory at a time), into a temporary file renamed
only when complete (store.atomic.atomic_path): a failure leaves no partial file.

A "/" in an id would make h5py create groups, so it becomes "_" in the dataset name
(the dataset then keeps the id in its "id" attribute). A protein id met twice (esm_all.pt
rows of one protein under several genes) is written once.

h5py comes with the [anndata] extra; it is imported only here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from esm2_batch.errors import InputError
from esm2_batch.store.atomic import atomic_path
from esm2_batch.store.esm_file import read_esm_file
from esm2_batch.store.residues import INDEX_FILE, open_residues

__all__ = ["H5_DTYPES", "H5Result", "export_h5", "h5_name"]

H5_DTYPES = ("float16", "float32")
H5Dtype = Literal["float16", "float32"]
_H5PY_HINT = "pip install 'esm2-batch[anndata]' (it brings h5py)"


@dataclass(frozen=True)
class H5Result:
    """What export_h5 wrote."""

    out: Path
    source: str  # "residues" or "pooled"
    written: int
    dtype: str

    def lines(self) -> list[str]:
        shape = "[L, dim]" if self.source == "residues" else "[dim]"
        return [f"wrote {self.written} proteins ({self.source}, {shape} {self.dtype}, one "
                f"dataset per protein id) to {self.out} as h5"]


def h5_name(protein_id: str) -> str:
    """The dataset name of a protein id: "/" (a group separator in HDF5) becomes "_"."""
    return protein_id.replace("/", "_") or "_"


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise InputError(f"--format h5 needs h5py: {_H5PY_HINT}") from exc
    return h5py


def export_h5(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
              dtype: str | None = None, layer: int | None = None,
              key: str = "emb") -> H5Result:
    """Write a residue store directory (or an esm_all.pt's `key` rows) as HDF5, one
    dataset per protein id (see the module docstring). `dtype` defaults to float16 for a
    residue store (what it holds) and float32 for esm_all.pt; `layer` picks a stored layer
    of a residue store (default: its first)."""
    path, out_path = Path(source), Path(out)
    if dtype is not None and dtype not in H5_DTYPES:
        raise InputError(f"--h5_dtype must be one of {', '.join(H5_DTYPES)}; got {dtype!r}")
    if out_path.is_dir():
        raise InputError(f"{out_path}: is a directory; --out takes a file name like x.h5")
    if not out_path.resolve().parent.is_dir():
        raise InputError(f"{out_path.resolve().parent}: the output directory does not "
                         "exist; create it or choose another --out")
    if path.is_dir():
        if key != "emb":
            raise InputError("--key picks a matrix of an esm_all.pt; a residue store takes "
                             "--layer")
        items, attrs = _residue_items(path, layer)
        kind, chosen = "residues", dtype or "float16"
    elif path.is_file():
        if layer is not None:
            raise InputError("--layer picks a layer of a residue store; an esm_all.pt "
                             "takes --key")
        items, attrs = _pooled_items(path, key)
        kind, chosen = "pooled", dtype or "float32"
    else:
        raise InputError(f"{path}: no such file or residue store directory")
    h5py = _import_h5py()
    torch_dtype = torch.float16 if chosen == "float16" else torch.float32
    written = 0
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as handle:
        for name, value in {**attrs, "source": kind, "dtype": chosen}.items():
            handle.attrs[name] = value
        for protein_id, tensor in items:
            name = h5_name(protein_id)
            if name in handle:
                continue
            dataset = handle.create_dataset(name, data=tensor.to(torch_dtype).numpy())
            if name != protein_id:
                dataset.attrs["id"] = protein_id
            written += 1
    return H5Result(out_path, kind, written, chosen)


def _residue_items(directory: Path, layer: int | None
                   ) -> tuple[Iterator[tuple[str, torch.Tensor]], dict[str, Any]]:
    if not (directory / INDEX_FILE).is_file():
        raise InputError(f"{directory}: a directory without {INDEX_FILE}; --format h5 takes "
                         "a residue store (<out>.residues/, <stem>_residues/) or an "
                         "esm_all.pt")
    store = open_residues(directory)
    chosen = store.layers[0] if layer is None else layer
    if chosen not in store.layers:
        raise InputError(f"--layer {chosen} is not stored in {directory} (layers: "
                         f"{', '.join(map(str, store.layers))})")
    settings = store.settings
    attrs = {"model": str(settings.get("model", "")), "layer": chosen,
             "dim": store.dim,
             "settings": json.dumps(settings, sort_keys=True)}
    items = ((protein_id, store.residues(protein_id, chosen)) for protein_id in store)
    return items, attrs


def _pooled_items(path: Path, key: str
                  ) -> tuple[Iterator[tuple[str, torch.Tensor]], dict[str, Any]]:
    data = read_esm_file(path).select(key)
    meta = data.meta
    attrs: dict[str, Any] = {"model": str(meta.get("model", "")), "matrix": key,
                             "dim": data.dim, "settings": json.dumps(
                                 {k: v for k, v in meta.items() if _plain(v)},
                                 sort_keys=True, default=str)}
    for name in ("layer", "pooling"):
        if meta.get(name) is not None:
            attrs[name] = meta[name] if isinstance(meta[name], int) else str(meta[name])
    items = ((str(protein_id), data.emb[row])
             for row, protein_id in enumerate(data.protein_ids))
    return items, attrs


def _plain(value: object) -> bool:
    """Whether a meta value is small plain data worth keeping in the settings attribute."""
    return isinstance(value, (str, int, float, bool)) or value is None
