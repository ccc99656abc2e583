"""The one atomic writer: whole new content or the old file, the umask's mode, no debris."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
import torch

from esm2_batch.errors import StoreError
from esm2_batch.store.atomic import (
    atomic_copy,
    atomic_json,
    atomic_path,
    atomic_save,
    atomic_text,
    atomic_write,
    check_writable,
    file_mode,
)
from tests.unprivileged import Unprivileged

# umask -> (file mode, directory mode) any file or directory the user creates gets
MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def debris(directory: Path) -> list[str]:
    """Temporary names the writer uses: .<name>.*.tmp files, .<name>.* staging dirs."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- the mode follows the umask --------------------------------------------------------------
def _write(path: Path) -> None:
    def write(handle: BinaryIO) -> None:
        handle.write(b"bytes")
    atomic_write(path, write)


def _path(path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"by name")


WRITERS: dict[str, Callable[[Path], None]] = {
    "atomic_write": _write,
    "atomic_text": lambda p: atomic_text(p, "text\n"),
    "atomic_json": lambda p: atomic_json(p, {"a": 1}),
    "atomic_save": lambda p: atomic_save({"x": torch.ones(2)}, p),
    "atomic_path": _path,
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_new_file_mode_follows_the_umask(tmp_path: Path, umask: int, writer: str) -> None:
    target = tmp_path / "out.bin"
    WRITERS[writer](target)
    assert mode(target) == MODES[umask][0] == file_mode()
    assert debris(tmp_path) == []


def test_replacing_a_file_gives_the_umask_mode_not_the_old_one(tmp_path: Path,
                                                               umask: int) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_text(target, "new")
    assert target.read_text() == "new" and mode(target) == MODES[umask][0]


def test_copied_file_mode_follows_the_umask(tmp_path: Path, umask: int) -> None:
    source = tmp_path / "src.h5ad"
    source.write_bytes(b"source bytes")
    source.chmod(0o400)  # a read-only source must not hand its mode to the copy
    atomic_copy(source, tmp_path / "dst.h5ad")
    assert mode(tmp_path / "dst.h5ad") == MODES[umask][0]
    assert (tmp_path / "dst.h5ad").read_bytes() == b"source bytes"


def test_copied_directory_modes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    source = tmp_path / "src.zarr"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"a")
    (source / "sub" / "b.bin").write_bytes(b"b")
    for path in (source / "a.bin", source / "sub" / "b.bin"):
        path.chmod(0o400)
    (source / "sub").chmod(0o500)
    try:
        atomic_copy(source, tmp_path / "dst.zarr")
    finally:
        (source / "sub").chmod(0o700)
    target = tmp_path / "dst.zarr"
    file_m, dir_m = MODES[umask]
    assert mode(target) == dir_m and mode(target / "sub") == dir_m
    assert mode(target / "a.bin") == file_m and mode(target / "sub" / "b.bin") == file_m
    assert (target / "sub" / "b.bin").read_bytes() == b"b"
    assert debris(tmp_path) == []


def test_copy_of_a_read_only_directory_is_writable_for_edit(tmp_path: Path, umask: int) -> None:
    """A shared, read-only dataset (a .zarr store) still gives a copy `edit` can change: the
    copy's files and directories get the umask's modes before `edit` runs, not the source's
    (as a non-root user, opening a 0400 file for writing fails)."""
    source = tmp_path / "src.zarr"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "b.bin").write_bytes(b"b")
    (source / "sub" / "b.bin").chmod(0o444)
    (source / "sub").chmod(0o555)
    file_m, dir_m = MODES[umask]

    def edit(copy: Path) -> None:
        assert mode(copy) == dir_m and mode(copy / "sub") == dir_m
        assert mode(copy / "sub" / "b.bin") == file_m
        (copy / "sub" / "b.bin").write_bytes(b"edited")
        (copy / "sub" / "c.bin").write_bytes(b"added")

    try:
        atomic_copy(source, tmp_path / "dst.zarr", edit=edit)
    finally:
        (source / "sub").chmod(0o755)
    assert (source / "sub" / "b.bin").read_bytes() == b"b"
    assert (tmp_path / "dst.zarr" / "sub" / "b.bin").read_bytes() == b"edited"
    assert mode(tmp_path / "dst.zarr" / "sub" / "c.bin") == file_m
    assert debris(tmp_path) == []


# -- content: complete, replacing, the source untouched --------------------------------------
def test_content_is_complete_and_replaces_the_old(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content that is longer than the new one" * 100)
    chunks = [bytes([i]) * 4096 for i in range(64)]

    def write(handle: BinaryIO) -> None:
        for chunk in chunks:
            handle.write(chunk)

    atomic_write(target, write)
    assert target.read_bytes() == b"".join(chunks)
    atomic_text(target, "héllo\n")
    assert target.read_bytes() == "héllo\n".encode()
    atomic_json(target, {"b": [1, 2], "a": None})
    assert json.loads(target.read_text()) == {"a": None, "b": [1, 2]}
    assert target.read_text().endswith("\n") and target.read_text().index('"a"') < \
        target.read_text().index('"b"')  # sorted keys: diffable
    atomic_save({"emb": torch.arange(6.0).reshape(2, 3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["emb"],
                       torch.arange(6.0).reshape(2, 3))
    assert debris(tmp_path) == []


def test_atomic_path_publishes_only_at_the_end(tmp_path: Path) -> None:
    target = tmp_path / "out.h5"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.h5.")
        assert tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # a reader still sees the old file
    assert target.read_bytes() == b"new" and debris(tmp_path) == []


def test_copy_file_never_modifies_the_source_and_edit_sees_the_copy(tmp_path: Path) -> None:
    source = tmp_path / "src.h5ad"
    original = os.urandom(10_000)
    source.write_bytes(original)
    target = tmp_path / "dst.h5ad"
    target.write_bytes(b"stale")
    seen: list[Path] = []

    def edit(copy: Path) -> None:
        seen.append(copy)
        assert copy != source and copy.read_bytes() == original
        with open(copy, "ab") as handle:
            handle.write(b"EDITED")

    atomic_copy(source, target, edit=edit)
    assert source.read_bytes() == original
    assert target.read_bytes() == original + b"EDITED"
    assert seen and seen[0].parent == tmp_path and not seen[0].exists()
    assert debris(tmp_path) == []


def test_copy_directory_never_modifies_the_source_and_edit_sees_the_copy(
        tmp_path: Path) -> None:
    source = tmp_path / "src.zarr"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"aaa")
    (source / "sub" / "b.bin").write_bytes(b"bbb")
    seen: list[Path] = []

    def edit(copy: Path) -> None:
        seen.append(copy)
        assert copy.resolve() != source.resolve()
        assert (copy / "sub" / "b.bin").read_bytes() == b"bbb"
        (copy / "a.bin").write_bytes(b"changed")
        (copy / "new.bin").write_bytes(b"new")

    atomic_copy(source, tmp_path / "dst.zarr", edit=edit)
    assert (source / "a.bin").read_bytes() == b"aaa" and not (source / "new.bin").exists()
    assert sorted(p.name for p in source.rglob("*")) == ["a.bin", "b.bin", "sub"]
    target = tmp_path / "dst.zarr"
    assert (target / "a.bin").read_bytes() == b"changed"
    assert (target / "new.bin").read_bytes() == b"new"
    assert (target / "sub" / "b.bin").read_bytes() == b"bbb"
    assert seen and not seen[0].exists()
    assert debris(tmp_path) == []


# -- a failure inside the write leaves the old file and no temporary --------------------------
FAILURES = [ValueError("boom"), KeyboardInterrupt()]


def _raiser(error: BaseException) -> Callable[..., None]:
    def fail(*_: object) -> None:
        raise error
    return fail


def _failing_write(path: Path, error: BaseException) -> None:
    def write(handle: BinaryIO) -> None:
        handle.write(b"half of the new ")
        raise error
    atomic_write(path, write)


def _failing_path(path: Path, error: BaseException) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise error


def _failing_save(path: Path, error: BaseException) -> None:
    class Unpicklable:
        def __reduce__(self) -> tuple[object, ...]:
            raise error
    atomic_save({"emb": torch.ones(3), "bad": Unpicklable()}, path)


def _failing_file_copy(path: Path, error: BaseException) -> None:
    source = path.with_name("src.bin")
    source.write_bytes(b"source")
    atomic_copy(source, path, edit=_raiser(error))


FAILING: dict[str, Callable[[Path, BaseException], None]] = {
    "atomic_write": _failing_write,
    "atomic_path": _failing_path,
    "atomic_save": _failing_save,
    "atomic_copy": _failing_file_copy,
}


@pytest.mark.parametrize("error", FAILURES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("writer", sorted(FAILING))
def test_failure_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path: Path, writer: str, error: BaseException) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"the old content")
    target.chmod(0o640)
    with pytest.raises(type(error)):
        FAILING[writer](target, error)
    assert target.read_bytes() == b"the old content" and mode(target) == 0o640
    assert debris(tmp_path) == []


@pytest.mark.parametrize("error", FAILURES, ids=lambda e: type(e).__name__)
def test_failure_without_an_old_file_creates_nothing(tmp_path: Path,
                                                     error: BaseException) -> None:
    with pytest.raises(type(error)):
        _failing_write(tmp_path / "out.bin", error)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", FAILURES, ids=lambda e: type(e).__name__)
def test_failed_directory_copy_creates_nothing_and_keeps_the_source(
        tmp_path: Path, error: BaseException) -> None:
    source = tmp_path / "src.zarr"
    source.mkdir()
    (source / "a.bin").write_bytes(b"aaa")

    def edit(copy: Path) -> None:
        (copy / "a.bin").write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        atomic_copy(source, tmp_path / "dst.zarr", edit=edit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.zarr"]
    assert (source / "a.bin").read_bytes() == b"aaa"


# -- check_writable ---------------------------------------------------------------------------
def _one_line_naming(error: pytest.ExceptionInfo[StoreError], path: Path, flag: str) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message and flag in message


def test_check_writable_accepts_a_new_file_and_an_existing_one(tmp_path: Path) -> None:
    check_writable(tmp_path / "esm_all.pt", flag="--out", example="esm_all.pt")
    (tmp_path / "old.pt").write_bytes(b"")
    check_writable(tmp_path / "old.pt", flag="--out", example="esm_all.pt")


def test_check_writable_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as error:
        check_writable(tmp_path, flag="--out", example="esm_all.pt")
    _one_line_naming(error, tmp_path, "--out")
    assert "esm_all.pt" in str(error.value)


def test_check_writable_refuses_a_missing_parent(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(StoreError) as error:
        check_writable(missing / "esm_all.pt", flag="--out", example="esm_all.pt")
    _one_line_naming(error, missing, "--out")


def test_check_writable_refuses_an_unwritable_parent(unprivileged: Unprivileged) -> None:
    locked = unprivileged.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # read-only for everyone
    try:
        with pytest.raises(StoreError) as error:
            unprivileged.run(lambda: check_writable(locked / "esm_all.pt", flag="--out",
                                                    example="esm_all.pt"))
    finally:
        locked.chmod(0o700)
    _one_line_naming(error, locked, "--out")


def test_check_writable_message_for_an_unwritable_parent(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusal where permissions cannot be made to bite (root): os.access says no."""
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)
    with pytest.raises(StoreError) as error:
        check_writable(tmp_path / "esm_all.pt", flag="--save_isoforms", example="iso.fa")
    _one_line_naming(error, tmp_path, "--save_isoforms")


def test_check_writable_names_a_directory_that_cannot_be_entered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output under a directory the user cannot enter (mode 0500 of another owner): the
    stat itself fails with EACCES, which pathlib does not swallow. One line, not a trace."""
    out = tmp_path / "locked" / "esm_all.pt"

    def refuse(self: Path, *args: object, **kwargs: object) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_dir", refuse)
    with pytest.raises(StoreError, match="cannot be entered") as error:
        check_writable(out, flag="--out", example="esm_all.pt")
    _one_line_naming(error, tmp_path / "locked", "--out")
