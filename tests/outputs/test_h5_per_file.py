"""export --format h5 (UniProt's one-dataset-per-protein layout) and FASTA mode's
--per_file (one <label>.pt per protein, plain or esm-extract's layout)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import InputError, StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.outputs import h5 as h5_module
from esm2_batch.outputs.h5 import export_h5
from esm2_batch.outputs.per_file import safe_label, write_per_file
from esm2_batch.run.fasta_mode import run_fasta
from esm2_batch.run.stages import StageOptions
from esm2_batch.store.residues import ResidueStore, ResidueWriter, open_residues

DIM = 4
PROTEINS = {"ENSP1": 5, "sp|P04637|P53_HUMAN": 3, "a/b": 2, "ENSP2": 5}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A residue store with two layers; ENSP2 shares ENSP1's sequence."""
    directory = tmp_path / "esm_all.residues"
    writer = ResidueWriter(directory, {"model": "tiny", "weights": "abc"}, layers=[1, 2],
                           dim=DIM, shard_mb=0.0001)
    gen = torch.Generator().manual_seed(0)
    for n, (protein, length) in enumerate(PROTEINS.items()):
        key = "k0" if protein == "ENSP2" else f"k{n}"
        writer.add(key, protein, [torch.randn(length, DIM, generator=gen) for _ in (1, 2)])
    writer.close()
    return directory


def test_h5_round_trip_equals_open_residues(tmp_path: Path, store: Path) -> None:
    residues = open_residues(store)
    for dtype, layer in (("float16", None), ("float32", 2)):
        out = tmp_path / f"{dtype}.h5"
        result = export_h5(store, out, dtype=dtype, layer=layer)
        assert result.written == len(PROTEINS)
        with h5py.File(out, "r") as handle:
            assert handle.attrs["model"] == "tiny" and handle.attrs["layer"] == (layer or 1)
            assert json.loads(handle.attrs["settings"]) == residues.settings
            assert sorted(handle) == sorted(p.replace("/", "_") for p in PROTEINS)
            assert handle["a_b"].attrs["id"] == "a/b"
            for protein in PROTEINS:
                data = torch.from_numpy(handle[protein.replace("/", "_")][()])
                want = residues.residues(protein, layer)
                assert str(data.dtype) == f"torch.{dtype}"
                assert torch.equal(data, want.to(data.dtype))


def test_h5_from_esm_all_pt_writes_pooled_rows(tmp_path: Path) -> None:
    emb = torch.randn(3, DIM)
    path = tmp_path / "esm_all.pt"
    torch.save({"emb": emb, "genes": ["G1", "G2"], "protein_ids": ["P1", "P2", "P1"],
                "gene_to_isoform_indices": {"G1": [0, 1], "G2": [2]},
                "meta": {"model": "tiny", "layer": 6, "pooling": "mean"}}, path)
    result = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "x.h5", "r") as handle:
        assert sorted(handle) == ["P1", "P2"] and handle.attrs["layer"] == 6
        assert torch.equal(torch.from_numpy(handle["P2"][()]), emb[1])


def test_h5_failure_leaves_no_partial_file(tmp_path: Path, store: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = ResidueStore.residues
    calls: list[str] = []

    def failing(self: ResidueStore, protein_id: str, layer: int | None = None
                ) -> torch.Tensor:
        calls.append(protein_id)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(self, protein_id, layer)

    monkeypatch.setattr(ResidueStore, "residues", failing)
    with pytest.raises(OSError, match="disk went away"):
        export_h5(store, tmp_path / "x.h5")
    assert list(tmp_path.iterdir()) == [store]  # no x.h5, no temporary file


def test_h5_bad_input_is_one_line(tmp_path: Path, store: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "empty"), "--out", "x.h5"], "without index.json"),
        ([str(store), "--out", str(tmp_path / "x.h5"), "--layer", "7"], "--layer 7 is not"),
        ([str(store), "--out", str(tmp_path / "x.h5"), "--h5_dtype", "int8"], "--h5_dtype"),
        ([str(store), "--out", str(tmp_path / "x.npz")], "exports only as --format h5"),
        ([str(tmp_path / "nothing"), "--format", "h5", "--out", "x.h5"], "no such file"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["export", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    real_import = builtins.__import__

    def no_h5py(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "h5py":
            raise ImportError("no h5py")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(InputError, match=r"esm2-batch\[anndata\]"):
        h5_module.export_h5(store, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_safe_label() -> None:
    assert safe_label("sp|P04637|P53_HUMAN") == "sp_P04637_P53_HUMAN"
    assert safe_label("../etc/passwd") == "_._etc_passwd"
    assert safe_label("") == "_" and len(safe_label("x" * 500)) == 200


def test_per_file_both_formats_and_skip_on_rerun(tmp_path: Path, store: Path) -> None:
    residues = open_residues(store)
    plain, extract = tmp_path / "plain", tmp_path / "extract"
    assert write_per_file(residues, plain).written == len(PROTEINS)
    write_per_file(residues, extract, "esm-extract")
    for protein in PROTEINS:
        tensor = torch.load(plain / f"{safe_label(protein)}.pt", weights_only=True)
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, residues[protein].float())
        data = torch.load(extract / f"{safe_label(protein)}.pt", weights_only=True)
        assert data["label"] == protein and set(data["representations"]) == {1, 2}
        for layer in (1, 2):
            states = residues.residues(protein, layer).float()
            assert torch.equal(data["representations"][layer], states)
            assert torch.equal(data["mean_representations"][layer], states.mean(0))
    marker = plain / "ENSP1.pt"
    torch.save("kept", marker)
    again = write_per_file(residues, plain)
    assert (again.written, again.skipped) == (0, len(PROTEINS))
    assert torch.load(marker, weights_only=True) == "kept"


def test_fasta_per_file_implies_per_tok(tmp_path: Path, model: LoadedModel) -> None:
    fasta = tmp_path / "in.fa"
    fasta.write_text(">sp|P1|A x\nMKVLAAGIVG\n>b\nMSTNPK\n")
    out = tmp_path / "per"
    run_fasta([fasta], model=model, embed=EmbedOptions(), per_file=out,
              per_file_format="esm-extract", stage=StageOptions(progress=False))
    residues = open_residues(tmp_path / "in_residues")
    assert sorted(p.name for p in out.iterdir()) == ["b.pt", "sp_P1_A.pt"]
    data = torch.load(out / "sp_P1_A.pt", weights_only=True)
    assert data["label"] == "sp|P1|A"
    layer = residues.layers[0]
    assert torch.equal(data["representations"][layer], residues["sp|P1|A"].float())
    assert data["representations"][layer].shape == (10, model.embed_dim)
    (out / "b.pt").unlink()  # a rerun skips the input and writes only the missing file
    results = run_fasta([fasta], model=model, per_file=out, stage=StageOptions(progress=False),
                        per_file_format="esm-extract")
    assert results[0].skipped and (results[0].per_file_written,
                                   results[0].per_file_skipped) == (1, 1)


def test_cli_per_file_and_its_bad_flags(tmp_path: Path, checkpoint: Path) -> None:
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKV\n")
    (tmp_path / "afile").write_text("")
    runner = CliRunner()
    for extra, code, message in (
            (["--per_file", str(tmp_path / "d"), "--per_file_format", "npy"], 2,
             "--per_file_format must be one of"),
            (["--per_file", str(tmp_path / "afile")], 6, "is a file")):
        result = runner.invoke(app, ["fasta", str(fasta), "--model_path", str(checkpoint),
                                     "--device", "cpu", "-q", *extra])
        assert result.exit_code == code, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "in_ESM.pt").exists()
    result = runner.invoke(app, ["fasta", str(fasta), "--model_path", str(checkpoint),
                                 "--device", "cpu", "--per_file", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "1 <label>.pt written, 0 existed" in result.output
    assert torch.load(tmp_path / "d" / "a.pt", weights_only=True).shape[0] == 3
    writer = ResidueWriter(tmp_path / "s", {"model": "m"}, layers=[1], dim=DIM)
    writer.add("k", "p", [torch.zeros(2, DIM)])
    writer.close()
    with pytest.raises(StoreError, match="is a file"):
        write_per_file(open_residues(tmp_path / "s"), tmp_path / "afile")
