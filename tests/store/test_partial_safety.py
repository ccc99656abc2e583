"""The partial store under stress: a second run, kill -9, damaged files, a full disk.

Each test names a promise of store/partial.py: one run at a time (and no stale lock),
damage named in one line and dropped (never a traceback), a full disk one StoreError line
that loses nothing finished.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch

from esm2_batch.errors import StoreError
from esm2_batch.records import GeneIsoforms, Isoform
from esm2_batch.store.atomic import disk_errors
from esm2_batch.store.partial import PartialStore

SETTINGS = {"model": "m", "layer": 2, "truncation": 1022}


def gene(query: str, *seqs: str) -> GeneIsoforms:
    isos = tuple(Isoform(f"P{query}{i}", f"T{i}", f"G{query}", s, i == 0, "protein_coding")
                 for i, s in enumerate(seqs))
    return GeneIsoforms(query, f"G{query}", query, isos, "ok" if seqs else "no_protein")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "esm2_batch" and r.levelno == logging.WARNING]


# -- one run at a time ---------------------------------------------------------------------
def hold(directory: str, conn: Connection) -> None:
    """Child process: open the store, say so, keep it until told to let go (or killed)."""
    store = PartialStore(Path(directory), SETTINGS)
    store.append_genes([gene("A", "MK")])
    conn.send("held")
    conn.recv()
    store.close()


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Any, Connection]]:
    """Another process holding tmp_path/p (spawned: no fork of a torch process)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=hold, args=(str(tmp_path / "p"), theirs), daemon=True)
    child.start()
    assert ours.poll(120), "the child never took the lock"
    assert ours.recv() == "held"
    yield child, ours
    if child.is_alive():
        child.kill()
    child.join(30)


@pytest.mark.slow  # a second Python process (spawned: it imports torch, seconds)
def test_a_second_run_fails_at_once_naming_the_first_and_kill_9_leaves_no_stale_lock(
        tmp_path: Path, holder: tuple[Any, Connection]) -> None:
    child, _ = holder
    for overwrite in (False, True):  # --overwrite must not wipe a run in progress
        with pytest.raises(StoreError) as caught:
            PartialStore(tmp_path / "p", SETTINGS, overwrite=overwrite)
        message = str(caught.value)
        assert f"pid {child.pid})" in message and "wait for it or stop it" in message
        assert "\n" not in message
    os.kill(child.pid, signal.SIGKILL)  # the first run dies without closing the store
    child.join(30)
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        assert list(store.cached_genes()) == ["A"]


def test_the_lock_is_released_on_every_exit_path(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    with pytest.raises(RuntimeError), PartialStore(directory, SETTINGS):
        raise RuntimeError("the run failed")
    store = PartialStore(directory, SETTINGS)
    with pytest.raises(StoreError, match="already open in this process"):
        PartialStore(directory, SETTINGS)
    store.close()
    with pytest.raises(StoreError, match="other settings"):  # a refused open frees it too
        PartialStore(directory, {**SETTINGS, "layer": 3})
    done = PartialStore(directory, SETTINGS)
    done.remove()
    assert not directory.exists()
    PartialStore(directory, SETTINGS).close()


# -- damaged state -------------------------------------------------------------------------
def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _torch_saved(obj: object) -> Any:
    return lambda path: torch.save(obj, path)


CHUNK_DAMAGE = {
    "truncated": _truncated,
    "garbage": lambda path: path.write_bytes(b"\x00\xffnot a torch file" * 10),
    "no keys": _torch_saved({"emb": torch.zeros(1, 2, dtype=torch.float16)}),
    "rows != keys": _torch_saved({"keys": ["k2", "kx"],
                                  "emb": torch.zeros(1, 2, dtype=torch.float16)}),
    "not a dict": _torch_saved([1, 2, 3]),
}


@pytest.mark.parametrize("damage", sorted(CHUNK_DAMAGE))
def test_a_damaged_rows_chunk_is_named_dropped_and_embedded_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        for key in ("k1", "k2", "k3"):
            store.add_rows([key], torch.ones(1, 2))
    CHUNK_DAMAGE[damage](tmp_path / "p" / "rows" / "000001.pt")
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        assert store.embedded_keys() == {"k1", "k3"}
        [warning] = warnings_of(caplog)
        assert "000001.pt: damaged rows chunk" in warning and "\n" not in warning
        store.add_rows(["k2"], torch.ones(1, 2))  # a new name: never over chunk 2
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        assert sorted(store.load_rows()) == ["k1", "k2", "k3"]
    names = sorted(p.name for p in (tmp_path / "p" / "rows").iterdir())
    assert names == ["000000.pt", "000002.pt", "000003.pt"]


@pytest.mark.parametrize("bad", [b"\xff\xfe\x00 binary", b"not json", b'["a", "list"]',
                                 b'{"query": "X"}', b"\x00" * 40])
def test_a_damaged_isoform_line_is_dropped_and_the_rest_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: bytes) -> None:
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        store.append_genes([gene("A", "MK")])
        with open(tmp_path / "p" / "isoforms.jsonl", "ab") as handle:
            handle.write(bad + b"\n")
        store.append_genes([gene("B")])
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        assert list(store.cached_genes()) == ["A", "B"]
        [warning] = warnings_of(caplog)
        assert "isoforms.jsonl: 1 damaged line(s) dropped (line 2)" in warning
        store.append_genes([gene("C", "MV")])
    caplog.clear()
    with PartialStore(tmp_path / "p", SETTINGS) as store:  # dropped once, not every time
        assert list(store.cached_genes()) == ["A", "B", "C"]
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\xfd", b"[1, 2]", b""])
def test_unreadable_settings_start_the_store_clean(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes) -> None:
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        store.append_genes([gene("A", "MK")])
        store.add_rows(["k1"], torch.ones(1, 2))
    (tmp_path / "p" / "settings.json").write_bytes(content)
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        assert store.cached_genes() == {} and store.load_rows() == {}
    [warning] = warnings_of(caplog)
    assert "settings.json" in warning and "starts again from scratch" in warning
    assert json.loads((tmp_path / "p" / "settings.json").read_text()) == SETTINGS


def test_overwrite_always_starts_clean(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    with PartialStore(directory, SETTINGS) as store:  # same settings: still wiped
        store.append_genes([gene("A", "MK")])
    (directory / "settings.json").write_bytes(b"\xff garbage")
    (directory / "rows").rename(directory / "old_rows")
    (directory / "rows").write_text("a file where rows/ belongs")
    (directory / "junk").mkdir()
    (directory / ".isoforms.jsonl.123.tmp").write_text("a killed writer's debris")
    with PartialStore(directory, SETTINGS, overwrite=True) as store:
        assert store.cached_genes() == {} and store.load_rows() == {}
        store.add_rows(["k"], torch.ones(1, 2))
    assert sorted(p.name for p in directory.iterdir()) == ["lock", "rows", "settings.json"]


def test_a_file_in_place_of_the_directory_needs_overwrite(tmp_path: Path) -> None:
    (tmp_path / "p").write_text("not a directory")
    with pytest.raises(StoreError, match=r"is a file.*--overwrite"):
        PartialStore(tmp_path / "p", SETTINGS)
    PartialStore(tmp_path / "p", SETTINGS, overwrite=True).close()
    assert (tmp_path / "p" / "rows").is_dir()


# -- a full disk ---------------------------------------------------------------------------
FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
RESUME = "free space and rerun the same command to resume"


def _full(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize("code", sorted(FULL))
def test_disk_full_writing_a_chunk_is_one_line_and_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    real_save = torch.save

    def save_until_full(obj: object, handle: BinaryIO) -> None:
        handle.write(b"half a chunk")
        raise _full(code)

    with PartialStore(tmp_path / "p", SETTINGS) as store:
        store.add_rows(["k1"], torch.ones(1, 2048))
        monkeypatch.setattr(torch, "save", save_until_full)
        with pytest.raises(StoreError) as caught:
            store.add_rows(["k2"], torch.ones(1, 2048))  # 4 KiB of float16 rows
        monkeypatch.setattr(torch, "save", real_save)
        assert os.listdir(tmp_path / "p" / "rows") == ["000000.pt"]  # no temp, no half
        store.add_rows(["k2"], torch.ones(1, 2048))
    message = str(caught.value)
    assert f"000001.pt: {FULL[code]} writing 4.0 KiB (" in message
    assert " free); " + RESUME in message and "\n" not in message
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        assert sorted(store.load_rows()) == ["k1", "k2"]


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_disk_full_appending_isoforms_leaves_no_torn_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    real_write = os.write

    def write_some(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[:7])  # part of a line lands, then the disk is full
        raise _full(errno.ENOSPC)

    def fsync_full(fd: int) -> None:
        raise _full(errno.ENOSPC)

    with PartialStore(tmp_path / "p", SETTINGS) as store:
        store.append_genes([gene("A", "MK")])
        log = tmp_path / "p" / "isoforms.jsonl"
        before = log.read_bytes()
        with monkeypatch.context() as patch, pytest.raises(StoreError) as caught:
            patch.setattr(os, failing, write_some if failing == "write" else fsync_full)
            store.append_genes([gene("B", "MV")])
        assert log.read_bytes() == before
        store.append_genes([gene("C")])
    size = len(json.dumps(gene("B", "MV").to_dict())) + 1
    assert f"isoforms.jsonl: no space left on device writing {size} B (" in str(caught.value)
    assert RESUME in str(caught.value)
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        assert list(store.cached_genes()) == ["A", "C"]


def test_disk_full_writing_settings_is_one_line_and_a_rerun_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync_full(fd: int) -> None:
        raise _full(errno.ENOSPC)

    with monkeypatch.context() as patch, pytest.raises(StoreError) as caught:
        patch.setattr(os, "fsync", fsync_full)
        PartialStore(tmp_path / "p", SETTINGS)
    assert "settings.json: no space left on device writing" in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["lock", "rows"]
    with PartialStore(tmp_path / "p", SETTINGS) as store:  # lock freed, nothing torn
        assert json.loads((tmp_path / "p" / "settings.json").read_text()) == SETTINGS
        assert store.load_rows() == {}


def test_disk_errors_translates_only_a_full_disk(tmp_path: Path) -> None:
    with pytest.raises(PermissionError), disk_errors(tmp_path / "x", 10):
        raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(StoreError, match=r"x: no space left on device \(.* free\); free"), \
            disk_errors(tmp_path / "x"):
        raise _full(errno.ENOSPC)
