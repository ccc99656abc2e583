"""FASTA mode through the real CLI: outputs checked before the model loads, and an
existing <stem>_ESM.pt reused only when it records the same settings and weights.

Root ignores directory permissions (these tests run as root in CI), so an unwritable
directory is made the way tests/store/test_atomic.py does it: `os.access` says no for that
one directory; the chmod test asks as user nobody under root (tests/unprivileged.py).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.models import LoadedModel
from esm2_batch.run.config import ModelOptions
from esm2_batch.store.keys import settings_scope
from tests.fakes.tiny_esm import write_tiny_checkpoint
from tests.unprivileged import Unprivileged

DIM = 32  # the conftest checkpoint's width


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture and file name as `checkpoint`, other random weights."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("other"), num_layers=2,
                                 embed_dim=DIM, seed=1)


@pytest.fixture
def fasta(tmp_path: Path) -> Path:
    path = tmp_path / "in.fa"
    path.write_text(">a first\nMKTAYIAKQR\n>b\nMKV\n")
    return path


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The models the command loads, in order (the real loader still runs)."""
    loaded: list[str] = []
    real = ModelOptions.load

    def spy(self: ModelOptions) -> LoadedModel:
        loaded.append(self.model)
        return real(self)

    monkeypatch.setattr(ModelOptions, "load", spy)
    return loaded


def fasta_cli(*args: str | Path, model: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["fasta", *map(str, args), "--model_path", str(model),
                                      "--device", "cpu", "--no_cache"])
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code: int, stderr: str, expected: int, *needles: str) -> str:
    assert code == expected, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("esm2-batch: error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def deny_writes(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """`directory` reads as not writable (os.access), as a read-only one does for a user."""
    real: Callable[..., bool] = os.access
    locked = directory.resolve()

    def access(path: str | os.PathLike[str], mode: int, **kw: object) -> bool:
        if mode & os.W_OK and Path(path).resolve() == locked:
            return False
        return real(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)


# -- 3: every output checked before the model loads -----------------------------------------
@pytest.mark.parametrize("where", ["out_dir", "per_file", "input_dir"])
def test_unwritable_output_is_one_line_before_the_model_loads(
        tmp_path: Path, fasta: Path, checkpoint: Path, loads: list[str],
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Before: the model loaded, every file was embedded, then an OSError traceback (exit
    1) where the output was written (root: the write even went through)."""
    target = {"out_dir": tmp_path / "out", "per_file": tmp_path / "per",
              "input_dir": tmp_path}[where]
    target.mkdir(exist_ok=True)
    flags: list[str | Path] = {"out_dir": ["--out_dir", target],
                               "per_file": ["--per_file", target], "input_dir": []}[where]
    deny_writes(monkeypatch, target)
    code, _, err = fasta_cli(fasta, *flags, model=checkpoint)
    flag = "--per_file" if where == "per_file" else "--out_dir"
    one_line_error(code, err, 6, str(target), "not writable", flag)
    assert loads == []
    assert not (tmp_path / "in_ESM.pt").exists() and not (tmp_path / "out" / "in_ESM.pt").exists()


def test_read_only_input_directory_for_real(unprivileged: Unprivileged, checkpoint: Path,
                                            loads: list[str]) -> None:
    shared = unprivileged.root / "shared"
    shared.mkdir()
    (shared / "in.fa").write_text(">a\nMKV\n")
    model = Path(shutil.copy(checkpoint, unprivileged.root))  # where the asker may read it
    shared.chmod(0o555)
    try:
        code, _, err = unprivileged.run(lambda: fasta_cli(shared / "in.fa", model=model))
    finally:
        shared.chmod(0o755)
    one_line_error(code, err, 6, str(shared), "not writable", "--out_dir")
    assert loads == []


def test_missing_out_dir_is_refused_before_the_model_loads(
        tmp_path: Path, fasta: Path, checkpoint: Path, loads: list[str]) -> None:
    code, _, err = fasta_cli(fasta, "--out_dir", tmp_path / "nope", model=checkpoint)
    one_line_error(code, err, 6, str(tmp_path / "nope"))
    assert loads == []


def test_per_file_directory_that_cannot_be_created(
        tmp_path: Path, fasta: Path, checkpoint: Path, loads: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: PermissionError traceback (exit 1) from mkdir (root: mkdir succeeds, so the
    refusal is simulated where mkdir raises)."""
    target = tmp_path / "locked" / "per"
    real = Path.mkdir

    def mkdir(self: Path, *args: object, **kw: object) -> None:
        if self == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = fasta_cli(fasta, "--per_file", target, model=checkpoint)
    one_line_error(code, err, 6, str(target), "cannot be created", "--per_file")
    assert loads == []


def test_finished_outputs_in_a_read_only_directory_are_still_skipped(
        tmp_path: Path, fasta: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what is going to be written is checked: a rerun with nothing to write works."""
    code, _, err = fasta_cli(fasta, model=checkpoint)
    assert code == 0, err
    deny_writes(monkeypatch, tmp_path)
    code, stdout, err = fasta_cli(fasta, model=checkpoint)
    assert code == 0, err
    assert "skipped (exists)" in stdout


def test_missing_input_and_two_inputs_with_one_output(
        tmp_path: Path, fasta: Path, checkpoint: Path, loads: list[str]) -> None:
    """A typo'd input is one line (before: logged as a failure, exit 0, or a traceback
    when its directory is missing too); two inputs writing the same <stem>_ESM.pt would
    have left the second with the first one's rows ("skipped (exists)")."""
    code, _, err = fasta_cli(fasta, tmp_path / "no" / "such.fa", model=checkpoint)
    one_line_error(code, err, 2, "such.fa", "no such FASTA file")
    twin = tmp_path / "in.fasta"
    twin.write_text(">z\nMSTNPK\n")
    code, _, err = fasta_cli(fasta, twin, model=checkpoint)
    one_line_error(code, err, 2, str(fasta), str(twin), "in_ESM.pt")
    assert loads == []
    assert not (tmp_path / "in_ESM.pt").exists()
    code, stdout, err = fasta_cli(fasta, fasta, model=checkpoint)  # the same file twice
    assert code == 0, err
    assert "2 proteins" in stdout and "skipped (exists)" in stdout


# -- 4: an existing output is reused only with the same settings -----------------------------
@pytest.mark.parametrize("change, differs", [
    (["--repr_layers", "1"], "matrices"),
    (["--include", "max"], "matrices"),
    ([], "weights"),  # the other checkpoint
], ids=["layers", "poolers", "weights"])
def test_rerun_with_other_settings_is_refused(tmp_path: Path, fasta: Path, checkpoint: Path,
                                              other_weights: Path, change: list[str],
                                              differs: str) -> None:
    """Before: "skipped (exists)", exit 0, and the old model's rows kept."""
    code, _, err = fasta_cli(fasta, model=checkpoint)
    assert code == 0, err
    out = tmp_path / "in_ESM.pt"
    before = out.read_bytes()
    model = other_weights if differs == "weights" else checkpoint
    code, _, err = fasta_cli(fasta, *change, model=model)
    one_line_error(code, err, 6, str(out), "other settings", differs, "--overwrite")
    assert out.read_bytes() == before
    code, stdout, err = fasta_cli(fasta, *change, "--overwrite", model=model)
    assert code == 0, err
    assert "2 proteins" in stdout
    assert out.read_bytes() != before


def test_the_file_records_its_settings_and_loads_weights_only(
        tmp_path: Path, fasta: Path, checkpoint: Path, model: LoadedModel) -> None:
    code, _, err = fasta_cli(fasta, "--repr_layers", "1", "-1", model=checkpoint)
    assert code == 0, err
    data = torch.load(tmp_path / "in_ESM.pt", weights_only=True)
    meta = data["meta"]
    settings = meta["settings"]
    assert settings["weights"] == meta["weights"] == model.fingerprint
    assert settings["matrices"] == ["mean_layer1", "mean_layer2"]
    assert meta["scope"] == settings_scope(settings) and meta["dtype"] == "float32"
    assert data["data"][0].dtype == torch.float32 and data["proteins"] == ["a", "b"]
    code, stdout, err = fasta_cli(fasta, "--repr_layers", "1", "-1", model=checkpoint)
    assert code == 0 and "skipped (exists)" in stdout, err  # same settings: reused


def test_a_file_without_a_record_is_unknown_settings(tmp_path: Path, fasta: Path,
                                                     checkpoint: Path) -> None:
    """A file of an earlier version (or another tool) cannot prove what made its rows."""
    out = tmp_path / "in_ESM.pt"
    torch.save({"proteins": ["a", "b"], "data": [torch.zeros(DIM), torch.zeros(DIM)]}, out)
    code, _, err = fasta_cli(fasta, model=checkpoint)
    one_line_error(code, err, 6, str(out), "unknown settings", "--overwrite")
    out.write_bytes(b"not a torch file")
    code, _, err = fasta_cli(fasta, model=checkpoint)
    one_line_error(code, err, 6, str(out), "unknown settings")
    code, _, err = fasta_cli(fasta, "--overwrite", model=checkpoint)
    assert code == 0, err
    assert "settings" in torch.load(out, weights_only=True)["meta"]


def test_every_input_is_checked_before_any_is_embedded(tmp_path: Path, checkpoint: Path,
                                                       other_weights: Path) -> None:
    first, second = tmp_path / "first.fa", tmp_path / "second.fa"
    first.write_text(">a\nMKV\n")
    second.write_text(">b\nMSTNPK\n")
    code, _, err = fasta_cli(second, model=other_weights)
    assert code == 0, err
    code, _, err = fasta_cli(first, second, model=checkpoint)
    one_line_error(code, err, 6, "second_ESM.pt", "weights")
    assert not (tmp_path / "first_ESM.pt").exists()


def test_help_says_fasta_rows_are_float32() -> None:
    result = CliRunner().invoke(app, ["fasta", "--help"])
    text = " ".join(result.stdout.split())
    assert "FASTA rows are stored as float32" in text and "float16" not in text
