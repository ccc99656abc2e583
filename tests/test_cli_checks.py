"""Flag values are checked before any model loads or any partial store exists: one line,
exit 2, and a corrected rerun is never blocked by a half-made run."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from esm2_batch.cli import app

runner = CliRunner()


@pytest.fixture
def hvg(tmp_path: Path) -> Path:
    path = tmp_path / "hvg.txt"
    path.write_text("BRAF\nTP53\n")
    return path


def invoke_checked(tmp_path: Path, *args: str) -> str:
    """Run with a model path that does not exist: were the model loaded first, the
    error would be about the model (exit 4), not the flag."""
    out = tmp_path / "esm_all.pt"
    result = runner.invoke(app, [*args, "--out", str(out), "--model_path",
                                 str(tmp_path / "absent.pt"), "-q"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("esm2-batch: error: "), result.stderr
    assert not (tmp_path / "esm_all.pt.partial").exists()  # nothing blocks the corrected run
    return lines[0]


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_rate_limit_must_be_positive_and_finite(tmp_path: Path, hvg: Path, value: str) -> None:
    line = invoke_checked(tmp_path, "--hvg_file", str(hvg), "--rate_limit", value)
    assert "--rate_limit" in line and "positive finite" in line


def test_parallel_workers_must_be_at_least_one(tmp_path: Path, hvg: Path) -> None:
    line = invoke_checked(tmp_path, "--hvg_file", str(hvg), "--parallel_workers", "0")
    assert "--parallel_workers 0" in line


@pytest.mark.parametrize("url", ["not a url", "ftp://ftp.ensembl.org/pub", "rest.ensembl.org"])
def test_ensembl_url_must_be_http(tmp_path: Path, hvg: Path, url: str) -> None:
    line = invoke_checked(tmp_path, "--hvg_file", str(hvg), "--ensembl_url", url)
    assert "not an http(s) URL" in line and url in line


def test_a_binary_gene_list_is_refused(tmp_path: Path) -> None:
    nul = tmp_path / "genes.txt"
    nul.write_bytes(b"\0" * 64)
    line = invoke_checked(tmp_path, "--hvg_file", str(nul))
    assert "binary data" in line and str(nul) in line


def test_a_directory_is_not_reported_as_missing(tmp_path: Path) -> None:
    folder = tmp_path / "lists"
    folder.mkdir()
    line = invoke_checked(tmp_path, "--hvg_file", str(folder))
    assert "is a directory" in line and "no such" not in line


def test_toks_per_batch_is_checked_before_the_model(tmp_path: Path, hvg: Path) -> None:
    line = invoke_checked(tmp_path, "--hvg_file", str(hvg), "--toks_per_batch", "0")
    assert "toks_per_batch" in line


def test_model_and_ensembl_both_unreachable_are_reported_together(tmp_path: Path,
                                                                   hvg: Path) -> None:
    result = runner.invoke(app, ["--hvg_file", str(hvg), "--out", str(tmp_path / "e.pt"),
                                 "--model_path", str(tmp_path / "esm2_absent.pt"),
                                 "--ensembl_url", "http://127.0.0.1:9", "-q"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 4 and len(lines) == 1, result.stderr
    assert "model checkpoint not found" in lines[0]
    assert "Ensembl cannot be used either" in lines[0] and "127.0.0.1:9" in lines[0]
    assert "--isoforms" in lines[0]


def test_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"esm2-batch {version('esm2-batch')}"
