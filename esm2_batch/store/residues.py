"""The residue store: per-residue states ([L, dim] per protein) that never have to fit in
memory, in a directory of safetensors shards.

    <dir>/index.json           {"format", "settings", "scope", "layers", "dim", "dtype",
                                "shards": [names], "proteins": {id: {"shard", "length",
                                "key"}}}
    <dir>/000000.safetensors   tensors "<sequence key>/<layer>", float16 [L, dim]
                               (FASTA mode also "<sequence key>/row": the float32 pooled
                               row, so a resumed file needs no sequence embedded twice)

Why this layout: safetensors holds no pickle (a shard from elsewhere cannot run code) and
is memory-mapped, so the reader reads one protein's tensor, not its shard; it is what
FastPLMs and Hugging Face write. Proteins with the same sequence share one tensor.

Crash safety: a shard is written to a temporary name and renamed (store.atomic), and only
then does index.json (also atomic) name it; kill -9 loses at most the shards being filled.
A shard file the index does not name is debris of such a crash and is removed on open;
its proteins are embedded again. `settings` is what the rows depend on (as in
store.keys): a store made with other settings or another model is one StoreError line.

Shards written elsewhere (run/ray_stage.py: each Ray actor fills `ShardBuffer`s and
writes them straight into the store directory, which every node shares, under names
unique to the actor) are named by this process with `ResidueWriter.adopt`, through the
same index code as its own shards: the states never travel through the process that
owns the index, and the crash rule stays one rule (a shard counts once the index names
it). The index itself has one writer, so adopting needs no locking.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from esm2_batch.errors import StoreError
from esm2_batch.store.atomic import atomic_json, atomic_path, disk_errors
from esm2_batch.store.keys import settings_scope
from esm2_batch.store.partial import describe_difference

__all__ = ["INDEX_FILE", "SHARD_SUFFIX", "ResidueStore", "ResidueWriter", "ShardBuffer",
           "ShardEntries", "check_residue_settings", "open_residues"]

INDEX_FILE = "index.json"
FORMAT = 1
SHARD_SUFFIX = ".safetensors"


ShardEntries = Mapping[str, tuple[str, int]]
"""What a shard holds, by sequence key: (the protein id it was embedded for, its length)."""


def _tensor_name(key: str, layer: int) -> str:
    return f"{key}/{layer}"


class ShardBuffer:
    """One shard being filled: float16 states (and optionally float32 pooled rows) by
    tensor name, and which sequences they are. Both the store's own writer and a Ray
    actor (which writes its shards itself) fill shards through here, so a shard has one
    layout whoever wrote it."""

    def __init__(self, layers: Sequence[int], *, keep_rows: bool = False) -> None:
        self.layers = [int(layer) for layer in layers]
        self.keep_rows = keep_rows
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, tuple[str, int]] = {}  # key -> (first id, length)
        self.size = 0

    def add(self, key: str, protein_id: str, residues: Sequence[torch.Tensor],
            row: torch.Tensor | None = None) -> int:
        """Buffer one sequence's [L, dim] states, one per layer (with `keep_rows` its
        pooled `row` too); the states' length L."""
        if len(residues) != len(self.layers):
            raise ValueError(f"{len(residues)} residue tensors for layers {self.layers}")
        length = int(residues[0].shape[0])
        tensors = {_tensor_name(key, layer): states.to(torch.float16)
                   for layer, states in zip(self.layers, residues, strict=True)}
        if row is not None and self.keep_rows:
            tensors[f"{key}/row"] = row.to(torch.float32)
        for name, tensor in tensors.items():
            self.tensors[name] = tensor.detach().to("cpu").contiguous().clone()
            self.size += tensor.nbytes
        self.entries[key] = (protein_id, length)
        return length

    def write(self, path: Path) -> None:
        """Write the shard at `path` atomically (fsynced before its rename, so a shard
        under its name is whole and durable before any index can name it)."""
        from safetensors.torch import save_file

        with atomic_path(path, needed_bytes=self.size) as tmp:
            save_file(self.tensors, str(tmp))


class ResidueWriter:
    """Appends proteins' residue states to a store, a shard every `shard_mb` MB.

    `add` buffers one sequence's states (one [L, dim] per layer, in `layers` order) under
    its sequence key and the protein id it was embedded for; `link` names further protein
    ids of stored sequences; `flush` writes the buffered shard and then the index;
    `adopt` names a shard someone else wrote into the directory (a Ray actor); `close`
    flushes what is left. `stored_keys` are the sequences a rerun skips.
    """

    def __init__(self, directory: Path, settings: dict[str, Any], *,
                 layers: Sequence[int], dim: int, overwrite: bool = False,
                 shard_mb: float = 256.0, keep_rows: bool = False) -> None:
        self.directory = directory
        self.keep_rows = keep_rows
        self.settings = settings
        self.layers = [int(layer) for layer in layers]
        self.dim = dim
        self.shard_bytes = max(1, int(shard_mb * 2**20))
        self._shard = ShardBuffer(self.layers, keep_rows=keep_rows)
        self._links: dict[str, str] = {}  # protein id -> buffered key, named at flush
        self.index = self._open(overwrite)
        # key -> its index entry (finished shards): `add` asks once per protein
        self._stored: dict[str, dict[str, Any]] = {
            entry["key"]: entry for entry in self.index["proteins"].values()}

    # -- opening -------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> dict[str, Any]:
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(f"{self.directory}: is a file, not a residue store; move it "
                             "away or pass --overwrite")
        with disk_errors(self.directory):
            self.directory.mkdir(parents=True, exist_ok=True)
        fresh: dict[str, Any] = {
            "format": FORMAT, "settings": self.settings,
            "scope": settings_scope(self.settings), "layers": self.layers, "dim": self.dim,
            "dtype": "float16", "shards": [], "proteins": {}}
        index = fresh if overwrite else check_residue_settings(self.directory,
                                                                 self.settings) or fresh
        named = set(index["shards"])
        for entry in self.directory.iterdir():  # crash debris: unnamed shards, temp files
            if entry.name != INDEX_FILE and entry.name not in named and entry.is_file():
                entry.unlink()
        atomic_json(self.directory / INDEX_FILE, index)
        return index

    # -- writing -------------------------------------------------------------------------
    def stored_keys(self) -> set[str]:
        """Sequence keys in a finished shard (or buffered): never embedded again."""
        return set(self._stored) | set(self._shard.entries)

    def add(self, key: str, protein_id: str, residues: Sequence[torch.Tensor],
            row: torch.Tensor | None = None) -> None:
        """Buffer one sequence's [L, dim] states, one per layer (and with `keep_rows`
        its pooled `row`, float32); flush when a shard is full."""
        if len(residues) != len(self.layers):
            raise ValueError(f"{len(residues)} residue tensors for layers {self.layers}")
        if key in self._stored or key in self._shard.entries:
            self.link({protein_id: key})
            return
        self._shard.add(key, protein_id, residues, row)
        if self._shard.size >= self.shard_bytes:
            self.flush()

    def link(self, ids: Mapping[str, str]) -> None:
        """Name protein ids of sequences already added (ids of unknown keys are ignored:
        their sequence failed); recorded in the index at the next flush or close."""
        for protein_id, key in ids.items():
            if key in self._stored:
                self.index["proteins"][protein_id] = dict(self._stored[key])
            elif key in self._shard.entries:
                self._links[protein_id] = key

    def flush(self) -> None:
        """Write the buffered shard atomically, then the index that names it."""
        if self._shard.entries:
            name = f"{len(self.index['shards']):06d}{SHARD_SUFFIX}"
            self._shard.write(self.directory / name)  # on errors the buffer stays
            shard, self._shard = self._shard, ShardBuffer(self.layers,
                                                          keep_rows=self.keep_rows)
            self._name(name, shard.entries)
        self._write_index()

    def adopt(self, name: str, entries: ShardEntries) -> None:
        """Name a shard another process wrote into this directory (a Ray actor, under a
        name of its own, with the layout of `ShardBuffer`), holding `entries` (key ->
        (protein id, length)); the index is written at once, as after `flush`. The shard
        must already be whole and durable there: only then is it safe to name. Adopting
        the same shard again (its rows split across deliveries) adds to its entries."""
        path = self.directory / name
        if Path(name).name != name or not name.endswith(SHARD_SUFFIX):
            raise StoreError(f"{path}: not a shard name of this store (a bare "
                             f"'*{SHARD_SUFFIX}' name)")
        if not path.is_file():
            raise StoreError(f"{path}: a worker reported this shard but it is not in the "
                             "store directory; is the output on a filesystem every node "
                             "shares?")
        self._name(name, entries)
        self._write_index()

    def _name(self, name: str, entries: ShardEntries) -> None:
        """Record a written shard and its sequences in the index (in memory)."""
        if name not in self.index["shards"]:
            self.index["shards"].append(name)
        for key, (protein_id, length) in entries.items():
            entry = {"shard": name, "length": int(length), "key": key}
            self.index["proteins"][protein_id] = self._stored[key] = entry

    def _write_index(self) -> None:
        """Name pending links, then write index.json atomically."""
        links, self._links = self._links, {}
        self.link(links)
        atomic_json(self.directory / INDEX_FILE, self.index)

    def close(self) -> None:
        """Flush what is buffered (call on success and on errors: finished work is kept)."""
        self.flush()

    def stored_rows(self) -> dict[str, torch.Tensor]:
        """The pooled rows kept beside the states (`add(..., row=)`), by sequence key."""
        from safetensors import safe_open

        rows: dict[str, torch.Tensor] = {}
        for name in self.index["shards"]:
            with safe_open(str(self.directory / name), framework="pt") as shard:
                for tensor in shard.keys():  # noqa: SIM118 (safe_open is no dict)
                    if tensor.endswith("/row"):
                        rows[tensor.removesuffix("/row")] = shard.get_tensor(tensor)
        return rows

    @property
    def proteins(self) -> set[str]:
        """Protein ids the index names (finished shards only)."""
        return set(self.index["proteins"])


def check_residue_settings(directory: Path, settings: dict[str, Any]
                           ) -> dict[str, Any] | None:
    """The index of the store at `directory` (None: no store yet); a store made with
    other settings (another model, layer, truncation ...) is one StoreError line, so a
    run can refuse it before any work."""
    index = _read_index(directory, missing_ok=True)
    if index is not None and index.get("settings") != settings:
        old = index.get("settings")
        diff = describe_difference(old, settings) if isinstance(old, dict) else "none"
        raise StoreError(f"{directory}: a residue store made with other settings ({diff}); "
                         "pass --overwrite to replace it or choose another output")
    return index


def _read_index(directory: Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    path = directory / INDEX_FILE
    if missing_ok and not path.exists():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: not a readable residue store index ({exc}); pass "
                         "--overwrite to start the store again") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise StoreError(f"{path}: not a residue store index of format {FORMAT}; pass "
                         "--overwrite to start the store again")
    return index


class ResidueStore(Mapping[str, torch.Tensor]):
    """A read-only view of a residue store: `store[protein_id]` is the first layer's
    [L, dim] float16 tensor, read from its shard alone (memory-mapped); `residues(id,
    layer)` any stored layer; iteration gives the protein ids."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = _read_index(directory)
        assert index is not None
        self._index = index
        self._proteins: dict[str, dict[str, Any]] = index["proteins"]

    @property
    def layers(self) -> list[int]:
        """The absolute layers stored for every protein, the first being `store[id]`'s."""
        return list(self._index["layers"])

    @property
    def dim(self) -> int:
        """The width of every stored state."""
        return int(self._index["dim"])

    @property
    def settings(self) -> dict[str, Any]:
        """What the states depend on (model, weights fingerprint, truncation, ...)."""
        return dict(self._index["settings"])

    def __getitem__(self, protein_id: str) -> torch.Tensor:
        return self.residues(protein_id)

    def residues(self, protein_id: str, layer: int | None = None) -> torch.Tensor:
        """[L, dim] float16 states of one protein at `layer` (default: the first stored)."""
        entry = self._proteins[protein_id]
        layer = self.layers[0] if layer is None else layer
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not stored (layers: {self.layers})")
        from safetensors import safe_open

        with safe_open(str(self.directory / entry["shard"]), framework="pt") as shard:
            tensor: torch.Tensor = shard.get_tensor(_tensor_name(entry["key"], layer))
        return tensor

    def __len__(self) -> int:
        return len(self._proteins)

    def __iter__(self) -> Iterator[str]:
        return iter(self._proteins)

    def __contains__(self, protein_id: object) -> bool:
        return protein_id in self._proteins


def open_residues(path: str | Path) -> ResidueStore:
    """Open a residue store directory for reading (lazy: nothing but index.json is read)."""
    directory = Path(path)
    if not (directory / INDEX_FILE).is_file():
        raise StoreError(f"{directory}: no {INDEX_FILE}; not a residue store")
    return ResidueStore(directory)
