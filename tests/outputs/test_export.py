"""Per-gene exports (saturn, npz, parquet) and the pooling they share with load_esm_matrix."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from esm2_batch.errors import InputError, StoreError
from esm2_batch.nn import load_esm_matrix
from esm2_batch.outputs.export import export_genes, gene_symbols
from esm2_batch.store.esm_file import EsmFile, gene_vectors, read_esm_file
from tests.tolerance import tolerance

DIM = 8
BRAF = "ENSG00000157764"
INDEX: dict[str, list[int]] = {
    "TP53": [0],
    "BRCA1": [1, 2, 3],
    "LINC00001": [],
    f"{BRAF}.13": [4, 5],
    "EGFR": [6],
    "ENSG00000000999": [7],  # an ID the run recorded no symbol for
    "Egfr": [8],  # same symbol as EGFR ignoring case (a mixed-species list)
}
N_ROWS = 9


@pytest.fixture
def esm_path(tmp_path: Path) -> Path:
    path = tmp_path / "esm_all.pt"
    emb = torch.randn(N_ROWS, DIM, generator=torch.Generator().manual_seed(0)).half()
    torch.save({
        "emb": emb, "genes": list(INDEX),
        "protein_ids": [f"ENSP{i:011d}" for i in range(N_ROWS)],
        "gene_to_isoform_indices": INDEX,
        "meta": {"model": "esm2_t6_8M_UR50D", "layer": 6, "pooling": "mean",
                 "species": "homo_sapiens", "ensembl_release": 114,
                 "symbols": {f"{BRAF}.13": "BRAF", "TP53": "TP53"}},
    }, path)
    return path


@pytest.fixture
def esm(esm_path: Path) -> EsmFile:
    return read_esm_file(esm_path)


@pytest.mark.parametrize("pooling", ["canonical", "mean"])
def test_pooling_is_load_esm_matrix_to_the_bit(esm_path: Path, esm: EsmFile,
                                               pooling: str) -> None:
    genes = ["BRCA1", "ENSG00000157764", "LINC00001", "NOT_IN_FILE", "TP53"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, has = load_esm_matrix(esm_path, genes, isoform=pooling)
    vectors = gene_vectors(esm, genes, gene_pooling=pooling)
    assert torch.equal(vectors.matrix, expected) and torch.equal(vectors.has_protein, has)
    assert vectors.protein_ids == ("ENSP00000000001", "ENSP00000000004", None, None,
                                   "ENSP00000000000")
    assert vectors.n_isoforms == (3, 2, 0, 0, 1)
    assert vectors.in_file == (True, True, True, False, True)


def test_mean_averages_every_isoform(esm: EsmFile) -> None:
    vectors = gene_vectors(esm, ["BRCA1"], gene_pooling="mean")
    rows = esm.emb[1:4].float()  # BRCA1's 3 fp16 isoforms, averaged in fp32 in another order
    limit = tolerance(torch.float32, terms=len(rows), magnitude=float(rows.abs().max()))
    assert torch.allclose(vectors.matrix[0], rows.mean(0), atol=limit, rtol=0)


def test_symbols_prefer_the_query_then_the_recorded_symbol(esm: EsmFile) -> None:
    names = gene_symbols(esm, symbols={"EGFR": "EGFR_GIVEN"})
    assert names[f"{BRAF}.13"] == "BRAF" and names["TP53"] == "TP53"
    assert names["EGFR"] == "EGFR_GIVEN" and names["ENSG00000000999"] is None


def test_saturn_writes_symbol_keys_as_the_readers_load_them(tmp_path: Path,
                                                           esm: EsmFile) -> None:
    out = tmp_path / "X.pt"
    result = export_genes(esm, fmt="saturn", gene_pooling="mean", out=out)
    data = torch.load(out, weights_only=True)
    assert list(data) == ["TP53", "BRCA1", "BRAF", "EGFR"]
    mean = gene_vectors(esm, gene_pooling="mean")
    assert torch.equal(data["BRAF"], mean.matrix[3]) and data["BRAF"].dtype == torch.float32
    assert result.written == 4 and result.without_protein == ("LINC00001",)
    assert result.without_symbol == ("ENSG00000000999",)
    assert result.duplicate_keys == ("Egfr",)
    assert any("without a symbol" in line for line in result.lines())
    # SATURN and UCE lower-case keys and var_names alike: each symbol appears once
    assert len({k.lower() for k in data}) == len(data)


def test_saturn_keeps_the_case_on_request(tmp_path: Path, esm: EsmFile) -> None:
    out = tmp_path / "X.pt"
    export_genes(esm, fmt="saturn", out=out, key_case="as_is",
                 symbols={"ENSG00000000999": "Sox2"})
    assert "Sox2" in torch.load(out, weights_only=True)


def test_npz_is_plain_arrays(tmp_path: Path, esm_path: Path, esm: EsmFile) -> None:
    out = tmp_path / "genes.npz"
    result = export_genes(esm_path, gene_pooling="canonical", out=out)  # format from suffix
    with np.load(out) as data:  # allow_pickle=False: no object arrays inside
        assert list(data["genes"]) == ["TP53", "BRCA1", f"{BRAF}.13", "EGFR",
                                       "ENSG00000000999", "Egfr"]
        assert list(data["symbols"])[2] == "BRAF" and data["symbols"][4] == ""
        assert data["vectors"].dtype == np.float32 and data["vectors"].shape == (6, DIM)
        assert np.array_equal(data["vectors"][1], esm.emb[1].float().numpy())
        assert list(data["n_isoforms"]) == [1, 3, 2, 1, 1, 1]
        meta = json.loads(str(data["meta"]))
    assert meta["gene_pooling"] == "canonical" and meta["ensembl_release"] == 114
    assert result.fmt == "npz" and result.written == 6


def test_npz_can_keep_genes_without_protein_as_zero_rows(tmp_path: Path, esm: EsmFile) -> None:
    out = tmp_path / "genes.npz"
    result = export_genes(esm, fmt="npz", out=out, include_missing=True)
    with np.load(out) as data:
        row = list(data["genes"]).index("LINC00001")
        assert not data["vectors"][row].any() and data["protein_ids"][row] == ""
    assert result.without_protein == ()


def test_parquet_has_one_row_per_gene(tmp_path: Path, esm: EsmFile) -> None:
    out = tmp_path / "genes.parquet"
    export_genes(esm, fmt="parquet", gene_pooling="mean", out=out)
    table = pq.read_table(out)
    assert table.column_names == ["gene", "symbol", "protein_id", "n_isoforms", "vector"]
    assert table.schema.field("vector").type.list_size == DIM
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    expected = gene_vectors(esm, table.column("gene").to_pylist(), gene_pooling="mean")
    assert np.array_equal(vectors, expected.matrix.numpy())
    assert table.column("symbol").to_pylist()[4] is None
    meta = json.loads(table.schema.metadata[b"esm2"])
    assert meta["gene_pooling"] == "mean" and meta["dim"] == DIM


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, esm: EsmFile,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match=r"esm2-batch\[parquet\]"):
        export_genes(esm, fmt="parquet", out=tmp_path / "x.parquet")
    assert not list(tmp_path.glob("*x.parquet*"))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"fmt": None, "out": "x.csv"}, InputError, "--format"),
    ({"fmt": "h5", "out": "x.h5"}, InputError, "one dataset per protein id.*export_h5"),
    ({"fmt": "hdf", "out": "x.h5"}, InputError, "--format must be one of saturn, npz, "
                                                "parquet, h5"),
    ({"fmt": "npz", "out": "x.npz", "gene_pooling": "max"}, InputError, "canonical, mean"),
    ({"fmt": "npz", "out": "missing/x.npz"}, StoreError, "does not exist"),
])
def test_bad_options_are_one_line(tmp_path: Path, esm: EsmFile, kwargs: dict[str, object],
                                  error: type[Exception], message: str) -> None:
    kwargs = {**kwargs, "out": tmp_path / str(kwargs["out"])}
    with pytest.raises(error, match=message):
        export_genes(esm, **kwargs)  # type: ignore[arg-type]


def test_a_missing_esm_file_is_a_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such embedding file"):
        export_genes(tmp_path / "nope.pt", fmt="npz", out=tmp_path / "x.npz")


def test_the_suffix_error_names_every_format_h5_included(tmp_path: Path, esm: EsmFile) -> None:
    with pytest.raises(InputError) as info:
        export_genes(esm, out=tmp_path / "x.csv")
    message = str(info.value)
    assert ".h5" in message and "--format saturn|npz|parquet|h5" in message
    assert not (tmp_path / "x.csv").exists()


def test_include_missing_is_refused_with_saturn(tmp_path: Path, esm: EsmFile) -> None:
    """SATURN's format is {symbol: vector}: a zero vector would be read as that gene's
    protein, so a gene without one cannot be kept there (it was dropped silently)."""
    with pytest.raises(InputError, match=r"--include_missing .* only, not in saturn"):
        export_genes(esm, fmt="saturn", out=tmp_path / "s.pt", include_missing=True)
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize(("args", "needles"), [
    (["{missing}", "--out", "{tmp}/x.npz"], ["nope.pt", "no such embedding file"]),
    (["{esm}", "--out", "{tmp}/x.csv"], [".h5", "--format saturn|npz|parquet|h5"]),
    (["{esm}", "--out", "{tmp}/s.pt", "--include_missing"], ["--include_missing", "saturn"]),
    (["{esm}", "--out", "{tmp}/s.pt", "--format", "saturn", "--include_missing"],
     ["--include_missing"]),
    (["{esm}", "--out", "{tmp}/r.h5", "--include_missing"], ["--include_missing", "h5"]),
    (["{esm}", "--out", "{tmp}/x.npz", "--key", "emb_max_layer9"], ["no matrix"]),
    # a flag of another format is refused, not dropped (it was ignored without a word)
    (["{esm}", "--out", "{tmp}/x.npz", "--layer", "20"],
     ["--layer applies only to --format h5", "writes npz"]),
    (["{esm}", "--out", "{tmp}/x.parquet", "--h5_dtype", "float32", "--layer", "1"],
     ["--h5_dtype, --layer apply only to --format h5", "writes parquet"]),
    (["{esm}", "--out", "{tmp}/r.h5", "--gene_pooling", "mean"],
     ["--gene_pooling applies only to gene exports", "writes h5"]),
])
def test_cli_bad_export_inputs_exit_2_in_one_line(tmp_path: Path, esm_path: Path,
                                                  args: list[str], needles: list[str]) -> None:
    from tests.test_cli import assert_one_line_error, invoke

    values = {"missing": tmp_path / "nope.pt", "esm": esm_path, "tmp": tmp_path}
    code, _, stderr = invoke("export", *(a.format(**values) for a in args))
    assert_one_line_error(code, stderr, 2, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esm_all.pt"]  # nothing written


def test_non_finite_rows_are_named(esm: EsmFile) -> None:
    esm.emb[1, 0] = float("nan")
    with pytest.raises(StoreError, match="BRCA1"):
        gene_vectors(esm, ["BRCA1"], gene_pooling="mean")
