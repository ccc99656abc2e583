"""Honest imports: a command imports only what its work needs (checked in a fresh process).

`esm2-batch --help` must not pay for torch, fair-esm, aiohttp or Ray; the fetcher API needs
aiohttp but never torch; exporting reads a torch file but needs no model, network or Ray.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import esm2_batch
from esm2_batch.store.esm_file import write_esm_file

HEAVY = ("torch", "esm", "aiohttp", "ray")

# Runs `code` (which may set `argv` to call the CLI), then prints which of the watched
# top-level modules were imported, as the last line of stdout.
PROBE = """
import json, sys
argv = None
{code}
if argv is not None:
    from esm2_batch.cli import app
    sys.argv = ["esm2-batch", *argv]
    try:
        app(prog_name="esm2-batch")
        status = 0
    except SystemExit as exit:
        status = exit.code or 0
else:
    status = 0
watched = {watched!r}
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(watched))
print("\\n" + json.dumps({{"status": status, "loaded": loaded}}))
"""


def imported(code: str, watched: tuple[str, ...] = HEAVY) -> tuple[int, list[str], str]:
    """Run `code` in a fresh interpreter: (exit status, watched modules loaded, output)."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(code=code, watched=watched)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["status"], result["loaded"], done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["fasta", "--help"]],
                         ids=" ".join)
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    status, loaded, output = imported(f"argv = {argv!r}")
    assert status == 0 and "Usage" in output
    assert loaded == [], f"esm2-batch {' '.join(argv)} imported {loaded}"


@pytest.mark.slow
def test_import_package_imports_nothing_heavy() -> None:
    _, loaded, _ = imported("import esm2_batch\nassert esm2_batch.__version__")
    assert loaded == [], f"import esm2_batch imported {loaded}"


@pytest.mark.slow
def test_fetcher_api_needs_aiohttp_but_not_torch() -> None:
    code = ("import esm2_batch\n"
            "assert callable(esm2_batch.fetch_isoforms)\n"
            "assert isinstance(esm2_batch.EnsemblClient, type)")
    _, loaded, _ = imported(code)
    assert loaded == ["aiohttp"], f"the fetcher API imported {loaded}"


@pytest.mark.slow
def test_export_to_npz_reads_torch_but_no_model_network_or_ray(tmp_path: Path) -> None:
    esm = tmp_path / "esm_all.pt"
    write_esm_file(esm, {
        "emb": torch.randn(3, 4).half(), "genes": ["TP53", "BRCA1", "LINC00001"],
        "protein_ids": ["ENSP00000000000", "ENSP00000000001", "ENSP00000000002"],
        "gene_to_isoform_indices": {"TP53": [0], "BRCA1": [1, 2], "LINC00001": []},
        "meta": {"model": "esm2_t6_8M_UR50D", "layer": 6, "pooling": "mean",
                 "species": "homo_sapiens", "ensembl_release": 114},
    })
    out = tmp_path / "genes.npz"
    argv = ["export", str(esm), "--out", str(out), "--format", "npz", "-q"]
    status, loaded, output = imported(f"argv = {argv!r}")
    assert status == 0, output
    assert out.is_file()
    assert set(loaded) <= {"torch"}, f"esm2-batch export imported {loaded}"


def test_version_is_the_installed_metadata() -> None:
    assert esm2_batch.__version__ == importlib.metadata.version("esm2-batch")
