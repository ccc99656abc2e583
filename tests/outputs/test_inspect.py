"""`esm2-batch inspect`: every kind of file the project writes, described from its meta and
shapes without torch; a damaged, foreign or code-running file is one line and exit 2."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.errors import InputError
from esm2_batch.outputs.inspect import inspect_file, summary_lines
from esm2_batch.store.esm_file import read_esm_file
from tests.outputs.conftest import QUERIES


def test_esm_all_is_described_from_its_meta(made: Path) -> None:
    report = inspect_file(made)
    esm = read_esm_file(made)
    assert report["kind"] == "esm_all"
    assert report["provenance"]["model"] == esm.meta["model"]
    assert report["provenance"]["weights"] == esm.meta["weights"]
    genes = report["genes"]
    assert genes["in"] == len(QUERIES) and genes["not_found"] == 1  # the clone name
    assert genes["without_protein"] == 1 and genes["not_found_genes"] == ["RP11-34P13.7"]
    assert genes["resolved"] == len(QUERIES) - 1
    assert report["isoforms"]["rows"] == esm.emb.shape[0]
    distinct = len({tuple(row.tolist()) for row in esm.emb})
    assert report["isoforms"]["distinct_sequences"] == distinct
    lengths = report["isoforms"]["lengths"]
    recorded = esm.meta["protein_lengths"]
    assert lengths["max"] == max(recorded[p] for p in esm.protein_ids)
    assert lengths["truncated"] == sum(1 for p in set(esm.protein_ids) if recorded[p] > 500)
    assert lengths["truncated"] > 0  # BRAF's 766 residues are cut at 500
    assert set(report["matrices"]) == {"emb", "emb_max_layer2"}
    assert report["matrices"]["emb"] == {"shape": list(esm.emb.shape), "dtype": "float16"}
    text = "\n".join(summary_lines(report))
    assert "7 in: 6 resolved" in text and "1 not found" in text and "truncated" in text


def test_the_residue_store_and_fasta_files(made: Path, tmp_path: Path) -> None:
    store = inspect_file(made.with_name("esm_all.residues"))
    assert store["kind"] == "residues" and store["proteins"] > 0
    assert inspect_file(made.with_name("esm_all.residues") / "index.json") == store
    fasta = tmp_path / "x_ESM.pt"
    torch.save({"proteins": ["a", "b"], "data": [torch.zeros(16), torch.ones(16)]}, fasta)
    found = inspect_file(fasta)
    assert found["kind"] == "fasta" and found["proteins"] == 2 and found["dim"] == 16


def test_exports_are_described(made: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for name in ("genes.npz", "genes.parquet", "saturn.pt", "proteins.h5"):
        done = runner.invoke(app, ["export", str(made), "--out", str(tmp_path / name)])
        assert done.exit_code == 0, done.output
        report = inspect_file(tmp_path / name)
        assert report["kind"] in ("npz", "parquet", "saturn", "h5"), report
        assert summary_lines(report)


def test_inspect_never_imports_torch(made: Path) -> None:
    code = ("import sys, json\nfrom esm2_batch.outputs.inspect import inspect_file\n"
            f"inspect_file({str(made)!r})\nprint(json.dumps('torch' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip().splitlines()[-1] == "false"


def test_cli_inspect_and_json(made: Path) -> None:
    runner = CliRunner()
    plain = runner.invoke(app, ["inspect", str(made)])
    assert plain.exit_code == 0 and "not found" in plain.output
    as_json = runner.invoke(app, ["inspect", str(made), "--json"])
    assert json.loads(as_json.output)["genes"]["in"] == len(QUERIES)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this would have run",))


@pytest.mark.parametrize("damage", ["truncated", "foreign", "code", "text", "missing"])
def test_a_damaged_or_foreign_file_is_one_line_exit_2(made: Path, tmp_path: Path,
                                                      damage: str) -> None:
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes(made.read_bytes()[: made.stat().st_size // 2])
    elif damage == "foreign":
        torch.save({"encoder.weight": torch.zeros(4, 4), "bias": torch.zeros(4)}, bad)
    elif damage == "code":  # a torch-style zip whose pickle would call print()
        with zipfile.ZipFile(bad, "w") as archive:
            archive.writestr("bad/data.pkl", pickle.dumps({"emb": _Boom()}))
    elif damage == "text":
        bad.write_text("gene\nBRAF\n")
    with pytest.raises(InputError):
        inspect_file(bad)
    done = CliRunner().invoke(app, ["inspect", str(bad)])
    assert done.exit_code == 2, done.output
    assert "this would have run" not in done.output
    assert len(done.output.strip().splitlines()) == 1 and "Traceback" not in done.output
