"""The row cache shared across runs: a pooled row is computed once per (weights, layer,
pooler, truncation and long-sequence policy, compute dtype, sequence) and reused by any
later run, whatever gene list, FASTA file or project asks for it.

    <cache_dir>/rows.sqlite
        scopes(scope, settings)        one per (weights, layer, pooler, ...): the JSON of
                                       what the rows depend on, plus the model's name for
                                       `cache info` (the name is not part of the key)
        rows(key, scope, row, used)    key: store.keys.RowKeys(scope).of(sequence);
                                       row: float32 bytes, [dim]; used: the day it was
                                       last read or written (for `cache prune`)

Why SQLite: one file that several runs on one machine read and write at once (WAL, a
busy timeout), transactions, so a killed run never leaves a half-written row, and
lookup by key without loading anything else; it is in Python's standard library. Rows
are float32, the dtype the embedder returns: FASTA mode's float32 files and gene mode's
float16 esm_all.pt both get exactly what a fresh computation would have given them.
Keep the cache on a local disk: SQLite's locking is not to be trusted on NFS.

A cache is only ever a shortcut: any error reading or writing it (a damaged file, a full
disk, a read-only directory) is one warning, and the run goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esm2_batch.errors import StoreError, first_line
from esm2_batch.store.keys import RowKeys, settings_scope

if TYPE_CHECKING:  # torch only where rows are: `cache info` and the fetcher need none
    import torch

    from esm2_batch.embedding.options import EmbedOptions
    from esm2_batch.models import LoadedModel

__all__ = ["CACHE_ENV", "CacheInfo", "CacheView", "RowCache", "ScopeInfo",
           "default_cache_dir", "open_row_cache", "user_cache_root"]

CACHE_ENV = "ESM2_BATCH_CACHE_DIR"
DB_FILE = "rows.sqlite"
_SQL_VARS = 500  # keys per IN (...) query, below SQLite's smallest variable limit
_DAY_S = 86_400

log = logging.getLogger("esm2_batch")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scopes(scope TEXT PRIMARY KEY, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows(key BLOB PRIMARY KEY, scope TEXT NOT NULL,
                                row BLOB NOT NULL, used INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rows_scope ON rows(scope);
CREATE INDEX IF NOT EXISTS rows_used ON rows(used);
"""


def user_cache_root() -> Path:
    """$XDG_CACHE_HOME/esm2_batch, else ~/.cache/esm2_batch: where every cache of the tool
    lives by default (Ensembl files, rows)."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "esm2_batch"


def default_cache_dir() -> Path:
    """--cache_dir's default: $ESM2_BATCH_CACHE_DIR, else <user cache>/esm2_batch/rows."""
    chosen = os.environ.get(CACHE_ENV)
    return Path(chosen) if chosen else user_cache_root() / "rows"


def _today() -> int:
    return int(time.time() // _DAY_S)


@dataclass(frozen=True)
class ScopeInfo:
    """One scope of `cache info`: what its rows depend on and how much they hold."""

    scope: str
    settings: dict[str, Any]
    rows: int
    bytes: int
    last_used_day: int

    def describe(self) -> str:
        s = self.settings
        used = time.strftime("%Y-%m-%d", time.gmtime(self.last_used_day * _DAY_S))
        return (f"{s.get('model', '?')} weights {str(s.get('weights', '?'))[:12]} "
                f"layer {s.get('layer')} {s.get('pooler')} truncation {s.get('truncation')} "
                f"({s.get('long_seqs')}) {s.get('compute_dtype')}: {self.rows:,} rows, "
                f"{self.bytes / 1e6:,.1f} MB, last used {used}")


@dataclass(frozen=True)
class CacheInfo:
    """What `esm2-batch cache info` prints."""

    path: Path
    file_bytes: int
    scopes: list[ScopeInfo] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.scopes)

    def describe(self) -> list[str]:
        lines = [f"{self.path}: {self.rows:,} rows in {len(self.scopes)} settings, "
                 f"{self.file_bytes / 1e6:,.1f} MB on disk"]
        return lines + [f"  {s.scope}  {s.describe()}" for s in self.scopes]


class RowCache:
    """The cache in one directory (see the module docstring). Thread-safe: a stage's
    consumer thread reads and writes it while the main thread fetches."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / DB_FILE
        self._lock = threading.Lock()
        self._disabled = False
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"--cache_dir {directory}: cannot open the row cache "
                             f"({first_line(exc)}); pass another --cache_dir, or "
                             "--no_cache") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> RowCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def enabled(self) -> bool:
        return not self._disabled

    @contextmanager
    def _guarded(self, doing: str) -> Iterator[bool]:
        """Run one cache operation; on any error warn once and disable the cache (a run
        must never fail for its shortcut). Yields False when already disabled."""
        with self._lock:
            if self._disabled:
                yield False
                return
            try:
                yield True
            except (OSError, sqlite3.Error) as exc:
                self._disabled = True
                log.warning("row cache %s: cannot %s (%s); going on without it",
                            self.path, doing, first_line(exc))

    # -- a run's view ----------------------------------------------------------------------
    def view(self, model: LoadedModel, options: EmbedOptions) -> CacheView:
        """The scopes of one run's matrices, in its row order (a packed row is every
        matrix side by side, as run/stages.py packs them)."""
        base = {"weights": model.fingerprint,
                "compute_dtype": str(model.dtype).removeprefix("torch."),
                "embed_dim": model.embed_dim, "truncation": options.cut,
                "long_seqs": options.long_seqs}
        scopes = []
        for pooler, layer in options.matrices(name=model.name, num_layers=model.num_layers):
            settings = {**base, "pooler": pooler, "layer": layer}
            scope = settings_scope(settings)
            self._remember(scope, {**settings, "model": model.name})
            scopes.append(scope)
        return CacheView(self, tuple(scopes), model.embed_dim)

    def _remember(self, scope: str, settings: dict[str, Any]) -> None:
        with self._guarded("record settings") as ok:
            if ok:
                self._db.execute("INSERT OR IGNORE INTO scopes VALUES (?, ?)",
                                 (scope, json.dumps(settings, sort_keys=True)))

    def get(self, keys: Sequence[bytes], dim: int) -> dict[bytes, np.ndarray]:
        """The rows held under `keys` (float32 [dim]); absent keys are left out."""
        found: dict[bytes, np.ndarray] = {}
        with self._guarded("read rows") as ok:
            for start in range(0, len(keys) if ok else 0, _SQL_VARS):
                part = list(keys[start:start + _SQL_VARS])
                marks = ",".join("?" * len(part))
                for key, blob in self._db.execute(
                        f"SELECT key, row FROM rows WHERE key IN ({marks})", part):
                    if len(blob) == dim * 4:  # anything else is not a row of this dim
                        found[key] = np.frombuffer(blob, dtype="<f4")
            if found:
                self._touch(list(found))
        return found  # on an error, the rows read before it (each one whole)

    def _touch(self, keys: list[bytes]) -> None:
        """Mark rows used today (once a day per row: reads stay reads)."""
        today = _today()
        for start in range(0, len(keys), _SQL_VARS):
            part = keys[start:start + _SQL_VARS]
            marks = ",".join("?" * len(part))
            self._db.execute(f"UPDATE rows SET used = ? WHERE used < ? AND key IN ({marks})",
                             [today, today, *part])

    def put(self, entries: Sequence[tuple[bytes, str, np.ndarray]]) -> None:
        """Store (key, scope, float32 row) entries in one transaction."""
        if not entries:
            return
        today = _today()
        with self._guarded("write rows") as ok:
            if ok:
                with self._db:  # one transaction: all of them or none
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?)",
                        [(k, s, np.ascontiguousarray(r, dtype="<f4").tobytes(), today)
                         for k, s, r in entries])

    # -- cache info / cache prune -------------------------------------------------------------
    def info(self) -> CacheInfo:
        """Rows and bytes per scope, most recently used first."""
        settings = dict(self._db.execute("SELECT scope, settings FROM scopes"))
        scopes = [ScopeInfo(scope, json.loads(settings.get(scope, "{}")), rows,
                            size or 0, used)
                  for scope, rows, size, used in self._db.execute(
                      "SELECT scope, COUNT(*), SUM(LENGTH(row)), MAX(used) FROM rows "
                      "GROUP BY scope ORDER BY MAX(used) DESC")]
        return CacheInfo(self.path, _file_bytes(self.path), scopes)

    def prune(self, *, older_than_days: float | None = None, max_bytes: int | None = None,
              weights: str | None = None, everything: bool = False) -> int:
        """Delete rows: all of them, those of weights starting with `weights`, those not
        used for `older_than_days`, then the least recently used until the rows take at
        most `max_bytes`. Returns how many were deleted; the file shrinks accordingly."""
        before = self._count()
        with self._db:
            self._db.execute("BEGIN")
            if everything:
                self._db.execute("DELETE FROM rows")
            if weights:
                self._delete_weights(weights)
            if older_than_days is not None:
                self._db.execute("DELETE FROM rows WHERE used < ?",
                                 (_today() - int(older_than_days),))
            if max_bytes is not None:
                self._shrink_to(max_bytes)
            self._db.execute("DELETE FROM scopes WHERE scope NOT IN "
                             "(SELECT DISTINCT scope FROM rows)")
        self._db.execute("PRAGMA incremental_vacuum")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return before - self._count()

    def _delete_weights(self, prefix: str) -> None:
        chosen = [scope for scope, text in self._db.execute("SELECT * FROM scopes")
                  if str(json.loads(text).get("weights", "")).startswith(prefix)]
        for scope in chosen:
            self._db.execute("DELETE FROM rows WHERE scope = ?", (scope,))

    def _shrink_to(self, max_bytes: int) -> None:
        total = self._db.execute("SELECT COALESCE(SUM(LENGTH(row)), 0) FROM rows"
                                 ).fetchone()[0]
        if total <= max_bytes:
            return
        excess, doomed = total - max_bytes, []
        for key, size in self._db.execute("SELECT key, LENGTH(row) FROM rows ORDER BY used"):
            if excess <= 0:
                break
            doomed.append(key)
            excess -= size
        for start in range(0, len(doomed), _SQL_VARS):
            part = doomed[start:start + _SQL_VARS]
            self._db.execute(f"DELETE FROM rows WHERE key IN ({','.join('?' * len(part))})",
                             part)

    def _count(self) -> int:
        count: int = self._db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        return count


def _file_bytes(path: Path) -> int:
    """The database and its write-ahead log together."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal"))
               if p.exists())


@dataclass(frozen=True)
class CacheView:
    """One run's access: packed rows ([n_matrices * dim], float32) by sequence, hits only
    when every matrix of the row is held."""

    cache: RowCache
    scopes: tuple[str, ...]
    dim: int

    def _keys(self, sequence: str) -> list[bytes]:
        return [bytes.fromhex(RowKeys(scope).of(sequence)) for scope in self.scopes]

    def lookup(self, sequences: Sequence[str]) -> dict[int, torch.Tensor]:
        """{position in `sequences`: packed float32 row} for the fully cached ones."""
        import torch

        keys = [self._keys(s) for s in sequences]
        found = self.cache.get([k for ks in keys for k in ks], self.dim)
        hits: dict[int, torch.Tensor] = {}
        for position, ks in enumerate(keys):
            if all(k in found for k in ks):
                hits[position] = torch.from_numpy(np.concatenate([found[k] for k in ks]))
        return hits

    def store(self, sequences: Sequence[str], rows: torch.Tensor) -> None:
        """Keep packed rows [k, n_matrices * dim] (any float dtype) under their sequences."""
        import torch

        values = rows.detach().to("cpu", torch.float32).numpy()
        entries = []
        for sequence, row in zip(sequences, values, strict=True):
            for n, (key, scope) in enumerate(zip(self._keys(sequence), self.scopes,
                                                 strict=True)):
                entries.append((key, scope, row[n * self.dim:(n + 1) * self.dim]))
        self.cache.put(entries)


def open_row_cache(directory: Path | None, *, enabled: bool = True) -> RowCache | None:
    """The cache a run uses: `directory` (None: default_cache_dir()), or None when
    disabled (--no_cache)."""
    if not enabled:
        return None
    return RowCache(directory if directory is not None else default_cache_dir())
