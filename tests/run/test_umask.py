"""End to end: every real output gets the mode the user's umask gives, not mkstemp's 0600."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

from esm2_batch.models import LoadedModel
from esm2_batch.outputs.export import export_genes
from esm2_batch.run.fasta_mode import run_fasta
from esm2_batch.run.gene_mode import run
from esm2_batch.run.stages import StageOptions
from tests.fakes.ensembl import FakeEnsembl, FakeGene, FakeTranscript
from tests.run.flat import make_config

FILE_MODES = {0o022: 0o644, 0o077: 0o600}
GENES = [FakeGene(f"ENSG{900000100 + i:011d}", f"UMASK{i}",
                  [FakeTranscript(f"ENST{900000100 + i:011d}", "protein_coding", True,
                                  f"ENSP{900000100 + i:011d}", seq)])
         for i, seq in enumerate(["MKTAYIAKQRQISFVKSHFSRQ", "MSLEQKKGADIISKILQIQNS"])]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_fasta_mode_output(tmp_path: Path, model: LoadedModel, umask: int) -> None:
    fasta = tmp_path / "prots.fa"
    fasta.write_text(">p1\nMKTAYIAKQR\n>p2\nMSLEQKKGAD\n")
    run_fasta([fasta], model=model, stage=StageOptions(progress=False))
    assert mode(tmp_path / "prots_ESM.pt") == FILE_MODES[umask]


def test_gene_mode_outputs_and_export(tmp_path: Path, model: LoadedModel, umask: int) -> None:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("UMASK0\nNOT_A_GENE\nUMASK1\n")
    out = tmp_path / "esm_all.pt"
    with FakeEnsembl(GENES).running_in_thread() as url:
        run(make_config(hvg_file=hvg, out=out, ensembl_url=url, rate_limit=1000.0,
                        progress=False, save_isoforms=tmp_path / "iso.fa"), model=model)
    side = [tmp_path / "esm_all.not_found.txt", tmp_path / "esm_all.unresolved.tsv",
            tmp_path / "iso.fa"]
    for path in [out, *side]:
        assert mode(path) == FILE_MODES[umask], path.name
    assert side[0].read_text() == "NOT_A_GENE\n"

    npz = tmp_path / "genes.npz"
    export_genes(out, fmt="npz", out=npz)
    assert mode(npz) == FILE_MODES[umask]
    with np.load(npz) as data:
        assert list(data["genes"]) == ["UMASK0", "UMASK1"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
