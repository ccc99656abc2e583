"""The esm2-batch command: flags, one-line errors with exit codes, nothing overwritten."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.tolerance import stored_tolerance

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with FakeEnsembl([braf(), *synthetic_genes(5)]).running_in_thread() as address:
        yield address


@pytest.fixture
def hvg(tmp_path: Path) -> Path:
    path = tmp_path / "hvg.txt"
    path.write_bytes(b"\xef\xbb\xbf# genes\r\nBRAF\r\n\r\nGENE0001\r\nBRAF\r\nNOPE\r\n")
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, stderr: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("esm2-batch: error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_run_with_dash_spellings_writes_the_file(tmp_path: Path, hvg: Path, url: str,
                                                 checkpoint: Path) -> None:
    out = tmp_path / "e.pt"
    code, _stdout, stderr = invoke("--hvg-file", str(hvg), "--out", str(out), "--model-path",
                                  str(checkpoint), "--ensembl-url", url, "--rate-limit", "100",
                                  "-q")
    assert code == 0, stderr
    data = torch.load(out, weights_only=True)
    assert data["genes"] == ["BRAF", "GENE0001", "NOPE"]
    assert (tmp_path / "e.not_found.txt").read_text() == "NOPE\n"


def test_summary_reports_counts(tmp_path: Path, hvg: Path, url: str, checkpoint: Path) -> None:
    code, stdout, _ = invoke("--hvg_file", str(hvg), "--out", str(tmp_path / "e.pt"),
                             "--model_path", str(checkpoint), "--ensembl_url", url,
                             "--rate_limit", "100", "--biotypes",
                             "protein_coding,nonsense_mediated_decay")
    assert code == 0
    assert "genes in: 3 distinct (1 duplicates dropped)" in stdout
    assert ("resolved: 2 of 3 genes (2 with a row for every isoform), not found: 1"
            in stdout)
    assert "isoforms: 18" in stdout and "not found: NOPE" in stdout  # BRAF 11 + GENE0001 7


def test_missing_gene_list(tmp_path: Path) -> None:
    code, _, err = invoke("--hvg_file", str(tmp_path / "nope.txt"), "--model_size", "8M")
    assert_one_line_error(code, err, 2, "nope.txt", "--hvg_file")


def test_empty_gene_list(tmp_path: Path) -> None:
    (tmp_path / "e.txt").write_text("# nothing\n\n")
    code, _, err = invoke("--hvg_file", str(tmp_path / "e.txt"))
    assert_one_line_error(code, err, 2, "empty")


def test_no_gene_list_at_all() -> None:
    code, _, err = invoke("--model_size", "8M")
    assert_one_line_error(code, err, 2, "--hvg_file")


def test_unwritable_output_directory(tmp_path: Path, hvg: Path) -> None:
    code, _, err = invoke("--hvg_file", str(hvg), "--out", str(tmp_path / "no" / "x.pt"))
    assert_one_line_error(code, err, 6, "does not exist", "--out")  # output problems: 6


def test_unknown_model_size_fails_before_fetching(tmp_path: Path, hvg: Path) -> None:
    fake = FakeEnsembl([braf()])
    with fake.running_in_thread() as address:
        code, _, err = invoke("--hvg_file", str(hvg), "--out", str(tmp_path / "x.pt"),
                              "--model_size", "7B", "--ensembl_url", address)
    assert_one_line_error(code, err, 4, "7B")
    assert fake.counts["requests"] == 0


def test_ensembl_unreachable_names_the_offline_flags(tmp_path: Path, hvg: Path,
                                                     checkpoint: Path) -> None:
    out = tmp_path / "x.pt"
    out.write_bytes(b"precious")
    code, _, err = invoke("--hvg_file", str(hvg), "--out", str(out), "--model_path",
                          str(checkpoint), "--ensembl_url", "http://127.0.0.1:9")
    assert_one_line_error(code, err, 6, str(out))  # refuses to touch a foreign file first
    out.unlink()
    code, _, err = invoke("--hvg_file", str(hvg), "--out", str(out), "--model_path",
                          str(checkpoint), "--ensembl_url", "http://127.0.0.1:9")
    assert_one_line_error(code, err, 3, "cannot reach", "--isoforms", "--ensembl_url")
    assert not out.exists()


def test_bad_flag_values(tmp_path: Path, hvg: Path) -> None:
    code, _, err = invoke("--hvg_file", str(hvg), "--long_seqs", "chop")
    assert code == 2 and "truncate, window" in err
    code, _, err = invoke("--hvg_file", str(hvg), "--toks_per_batch", "100", "--model_size",
                          "8M", "--model_path", "/nonexistent/esm2_x.pt")
    assert code == 4 and "esm2_x.pt" in err


def test_toks_per_batch_too_small_for_one_sequence(tmp_path: Path, hvg: Path,
                                                   checkpoint: Path) -> None:
    code, _, err = invoke("--hvg_file", str(hvg), "--out", str(tmp_path / "x.pt"),
                          "--model_path", str(checkpoint), "--toks_per_batch", "500")
    assert_one_line_error(code, err, 2, "--toks_per_batch", "1024")


def test_fasta_subcommand(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "a.fa").write_text(">x desc\nMKTAYIAKQR\n>y\nMKV\n")
    code, stdout, err = invoke("fasta", str(tmp_path / "a.fa"), "--model_path",
                               str(checkpoint))
    assert code == 0, err
    assert "2 proteins" in stdout
    data = torch.load(tmp_path / "a_ESM.pt", weights_only=True)
    assert data["proteins"] == ["x", "y"] and len(data["data"]) == 2
    code, stdout, _ = invoke("fasta", str(tmp_path / "a.fa"), "--model_path", str(checkpoint))
    assert code == 0 and "skipped (exists)" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("entry", [["-m", "esm2_batch"], ["scripts/esm2_batch.py"]])
def test_entry_points_share_the_flags(entry: list[str]) -> None:
    result = subprocess.run([sys.executable, *entry, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--hvg_file" in result.stdout
    assert "--save_isoforms" in result.stdout and "fasta" in result.stdout


def test_ray_without_ray_installed_is_one_line(tmp_path: Path, hvg: Path, checkpoint: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, _, err = invoke("--hvg_file", str(hvg), "--out", str(tmp_path / "x.pt"),
                          "--model_path", str(checkpoint), "--ray", "local")
    assert_one_line_error(code, err, 2, "esm2-batch[ray]")
    assert not (tmp_path / "x.pt").exists()


def test_reference_engine_gives_the_same_rows(tmp_path: Path, hvg: Path, url: str,
                                              checkpoint: Path) -> None:
    rows = {}
    for engine in ("fast", "reference"):
        out = tmp_path / f"{engine}.pt"
        code, _, err = invoke("--hvg_file", str(hvg), "--out", str(out), "--model_path",
                              str(checkpoint), "--ensembl_url", url, "--rate_limit", "100",
                              "--engine", engine, "--no_cache", "-q")  # both compute
        assert code == 0, err
        data = torch.load(out, weights_only=True)
        assert data["meta"]["engine"] == engine
        rows[engine] = data["emb"].float()
        dim, layers = data["emb"].shape[1], data["meta"]["layer"]
    # fp32 rows from two engines (FFN-width reductions in every layer), stored as fp16
    limit = stored_tolerance(torch.float16, magnitude=float(rows["reference"].abs().max()),
                             terms=4 * dim, depth=layers)
    assert (rows["fast"] - rows["reference"]).abs().max() <= limit
    code, _, err = invoke("--hvg_file", str(hvg), "--engine", "turbo")
    assert code == 2 and "fast, reference" in err
