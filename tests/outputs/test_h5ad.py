"""AnnData in and out, on small AnnData objects built in memory (10x, CELLxGENE, scanpy)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from esm2_batch.errors import InputError, StoreError
from esm2_batch.outputs.h5ad import ESM_KEY, annotate_anndata, write_h5ad
from esm2_batch.sources.h5ad_genes import read_h5ad_genes
from esm2_batch.store.esm_file import EsmFile, gene_vectors, validate

DIM = 6
IDS = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003", "ENSG00000000004",
       "ENSG00000000005", "ENSG00000000006"]
SYMBOLS = ["TBCE", "TBCE-1", "NKX2-1", "CD3E", "MALAT1", "GAPDH"]
HVG = [True, True, True, False, True, True]


def adata(var: pd.DataFrame) -> ad.AnnData:
    x = np.arange(3 * len(var), dtype=np.float32).reshape(3, len(var))
    return ad.AnnData(X=x, var=var)


def tenx() -> ad.AnnData:
    """Cell Ranger via scanpy: symbols (made unique) as names, IDs in gene_ids."""
    return adata(pd.DataFrame({"gene_ids": IDS, "feature_types": "Gene Expression",
                               "highly_variable": HVG}, index=SYMBOLS))


def cellxgene() -> ad.AnnData:
    """CELLxGENE: Ensembl IDs as names, symbols in feature_name (categorical)."""
    var = pd.DataFrame({"feature_name": pd.Categorical(["TBCE", "TBCE", "NKX2-1", "CD3E",
                                                        "MALAT1", "GAPDH"]),
                        "highly_variable": HVG}, index=IDS)
    return adata(var)


def symbols_only() -> ad.AnnData:
    return adata(pd.DataFrame({"highly_variable": HVG}, index=SYMBOLS))


def save(obj: ad.AnnData, path: Path) -> Path:
    obj.write_h5ad(path)
    return path


def esm_for(queries: list[str], *, no_protein: tuple[str, ...] = (), **meta: object) -> EsmFile:
    """An esm_all.pt in memory: two isoforms per gene, none for `no_protein`."""
    index: dict[str, list[int]] = {}
    rows = 0
    for query in queries:
        n = 0 if query in no_protein else 2
        index[query] = list(range(rows, rows + n))
        rows += n
    emb = torch.randn(rows, DIM, generator=torch.Generator().manual_seed(1)).half()
    return validate({"emb": emb, "genes": queries,
                     "protein_ids": [f"ENSP{i:011d}" for i in range(rows)],
                     "gene_to_isoform_indices": index,
                     "meta": {"model": "esm2_t6_8M_UR50D", "layer": 6, "pooling": "mean",
                              "species": "homo_sapiens", "created": "2025-01-01T00:00:00",
                              **meta}})


def values(column: pd.Series) -> list[object]:
    """A nullable column as a list, <NA> as None (pd.NA has no truth value)."""
    return [None if pd.isna(v) else v for v in column.tolist()]


# -- reading -------------------------------------------------------------------------------
def test_10x_takes_gene_ids(tmp_path: Path) -> None:
    genes = read_h5ad_genes(save(tenx(), tmp_path / "a.h5ad"))
    assert genes.genes.genes == (IDS[0], IDS[1], IDS[2], IDS[4], IDS[5])
    assert (genes.id_column, genes.id_kind, genes.n_hvg, genes.n_vars) == (
        "gene_ids", "ensembl_ids", 5, 6)
    assert "var['gene_ids']" in genes.describe() and "5 highly variable of 6" in \
        genes.describe()
    assert genes.symbol_map()[IDS[1]] == "TBCE"  # the make_unique copy, cleaned


def test_cellxgene_takes_the_id_index_or_a_named_column(tmp_path: Path) -> None:
    path = save(cellxgene(), tmp_path / "c.h5ad")
    by_index = read_h5ad_genes(path)
    assert (by_index.id_column, by_index.id_kind) == ("var_names", "ensembl_ids")
    assert by_index.genes.genes[0] == IDS[0]
    assert by_index.symbol_map()[IDS[1]] == "TBCE"  # from feature_name
    by_name = read_h5ad_genes(path, id_column="feature_name")
    assert by_name.genes.genes == ("TBCE", "NKX2-1", "MALAT1", "GAPDH")
    assert by_name.genes.duplicates == ("TBCE",) and by_name.id_kind == "symbols"


def test_symbols_lose_make_unique_suffixes_but_not_real_dashes(tmp_path: Path) -> None:
    genes = read_h5ad_genes(save(symbols_only(), tmp_path / "s.h5ad"))
    assert genes.genes.genes == ("TBCE", "NKX2-1", "MALAT1", "GAPDH")
    assert genes.stripped == (("TBCE-1", "TBCE"),)
    assert genes.symbol_map() == {}  # symbols are their own symbols
    assert "TBCE-1 -> TBCE" in genes.describe() and "gene symbols from var_names" in \
        genes.describe()


def test_highly_variable_written_as_text_and_all_vars(tmp_path: Path) -> None:
    obj = symbols_only()
    obj.var["highly_variable"] = ["True" if h else "False" for h in HVG]
    path = save(obj, tmp_path / "t.h5ad")
    assert read_h5ad_genes(path).n_hvg == 5
    assert len(read_h5ad_genes(path, hvg_column=None).genes.genes) == 5  # 6 vars, 1 repeat


@pytest.mark.parametrize(("var", "kwargs", "message"), [
    (pd.DataFrame(index=SYMBOLS), {}, r"no 'highly_variable' column; run scanpy\.pp"),
    (pd.DataFrame({"highly_variable": [False] * 6}, index=SYMBOLS), {}, "no gene is flagged"),
    (pd.DataFrame({"highly_variable": HVG}, index=SYMBOLS), {"id_column": "gene_symbol"},
     r"no column 'gene_symbol'; columns are \['highly_variable'\]"),
    (pd.DataFrame({"highly_variable": ["maybe"] * 6}, index=SYMBOLS), {}, "'maybe'"),
])
def test_reading_errors_name_the_fix(tmp_path: Path, var: pd.DataFrame,
                                     kwargs: dict[str, str], message: str) -> None:
    path = save(adata(var), tmp_path / "e.h5ad")
    with pytest.raises(InputError, match=message):
        read_h5ad_genes(path, **kwargs)  # type: ignore[arg-type]


def test_not_an_h5ad(tmp_path: Path) -> None:
    (tmp_path / "x.h5ad").write_text("hello")
    with pytest.raises(InputError, match=r"not a readable \.h5ad"):
        read_h5ad_genes(tmp_path / "x.h5ad")
    with pytest.raises(InputError, match=r"no such \.h5ad"):
        read_h5ad_genes(tmp_path / "y.h5ad")


def test_without_anndata_one_line_names_the_extra(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anndata", None)
    with pytest.raises(InputError, match=r"pip install 'esm2-batch\[anndata\]'"):
        read_h5ad_genes(tmp_path / "a.h5ad")


# -- writing -------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["canonical", "mean"])
def test_write_puts_each_vars_vector_back(tmp_path: Path, pooling: str) -> None:
    src = save(tenx(), tmp_path / "a.h5ad")
    genes = read_h5ad_genes(src)
    esm = esm_for(list(genes.genes.genes), no_protein=(IDS[4],))
    result = write_h5ad(src, tmp_path / "out.h5ad", esm, gene_pooling=pooling)
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    matrix = out.varm[ESM_KEY]
    assert matrix.dtype == np.float32 and matrix.shape == (6, DIM)
    expected = gene_vectors(esm, IDS, gene_pooling=pooling).matrix.numpy()
    for row in (0, 1, 2, 5):
        assert np.array_equal(matrix[row], expected[row])
    assert not matrix[3].any() and not matrix[4].any()  # not HVG; no protein
    # var 3 is not an HVG: never looked up, so unknown (<NA>), not "no protein"
    assert values(out.var["esm2_has_protein"]) == [True, True, True, None, False, True]
    assert out.var["esm2_protein_id"].tolist()[:4] == ["ENSP00000000000", "ENSP00000000002",
                                                       "ENSP00000000004", ""]
    assert values(out.var["esm2_n_isoforms"]) == [2, 2, 2, None, 0, 2]
    assert values(out.var["esm2_not_canonical"]) == [False, False, False, None, False, False]
    assert out.uns["esm2"]["isoform_pooling"] == pooling
    assert out.uns["esm2"]["ensembl_release"] == "unknown"
    assert out.uns["esm2"]["id_column"] == "gene_ids" and out.uns["esm2"]["layer"] == 6
    assert np.array_equal(out.X, tenx().X) and list(out.var["gene_ids"]) == IDS
    assert "esm2_has_protein" not in ad.read_h5ad(src).var  # the input is untouched
    assert (result.embedded, result.n_vars) == (4, 6) and "4 of 6 vars" in result.describe()


def test_a_run_from_symbols_fills_an_id_keyed_file_through_meta(tmp_path: Path) -> None:
    src = save(cellxgene(), tmp_path / "c.h5ad")
    esm = esm_for(["TBCE", "GAPDH"], gene_ids={"TBCE": IDS[0], "GAPDH": IDS[5]})
    write_h5ad(src, tmp_path / "out.h5ad", esm)
    has = values(ad.read_h5ad(tmp_path / "out.h5ad").var["esm2_has_protein"])
    assert has == [True, None, None, None, None, True]  # the others were not in the run


def test_the_id_column_recorded_by_the_run_is_reused(tmp_path: Path) -> None:
    src = save(cellxgene(), tmp_path / "c.h5ad")
    esm = esm_for(["TBCE", "NKX2-1"], id_column="feature_name")
    result = write_h5ad(src, tmp_path / "out.h5ad", esm)
    assert result.id_column == "feature_name" and result.embedded == 3  # TBCE twice


def test_a_recorded_column_this_file_lacks_falls_back_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = save(cellxgene(), tmp_path / "c.h5ad")
    with caplog.at_level(logging.WARNING, logger="esm2_batch"):
        result = write_h5ad(src, tmp_path / "out.h5ad", esm_for([IDS[2]], id_column="gene_ids"))
    assert result.id_column == "var_names" and result.embedded == 1
    assert "no 'gene_ids' column" in caplog.text


def test_write_refuses_its_input_and_a_wrong_query_count(tmp_path: Path) -> None:
    src = save(tenx(), tmp_path / "a.h5ad")
    esm = esm_for([IDS[0]])
    with pytest.raises(InputError, match="is the input file"):
        write_h5ad(src, src, esm)
    with pytest.raises(InputError, match="one query \\(or None\\) per var row"):
        write_h5ad(src, tmp_path / "o.h5ad", esm, queries_for_vars=[IDS[0]])
    with pytest.raises(StoreError, match="output directory does not exist"):
        write_h5ad(src, tmp_path / "no" / "o.h5ad", esm)
    assert not (tmp_path / "o.h5ad").exists()


def test_explicit_queries_and_an_existing_output_is_replaced(tmp_path: Path) -> None:
    src = save(symbols_only(), tmp_path / "s.h5ad")
    dst = save(symbols_only(), tmp_path / "out.h5ad")
    esm = esm_for(["GAPDH"])
    queries: list[str | None] = [None, None, None, None, None, "GAPDH"]
    result = write_h5ad(src, dst, esm, queries_for_vars=queries)
    assert result.embedded == 1
    assert ad.read_h5ad(dst).var["esm2_has_protein"].tolist()[-1]


def test_annotate_in_memory(tmp_path: Path) -> None:
    obj = tenx()
    notes = annotate_anndata(obj, esm_for([IDS[0], IDS[5]]), gene_pooling="mean")
    assert obj.varm[ESM_KEY].shape == (6, DIM) and obj.uns["esm2"]["isoform_pooling"] == "mean"
    assert notes.matched == 2 and obj.var["esm2_has_protein"].sum() == 2
    obj.write_h5ad(tmp_path / "m.h5ad")  # what annotate adds is writable


@pytest.mark.parametrize("pooling", ["canonical", "mean"])
def test_a_missing_canonical_isoform_is_flagged_as_export_and_nn_do(
        tmp_path: Path, pooling: str) -> None:
    """One rule for the three consumers (store.esm_file.gene_vectors): a gene whose
    canonical isoform Ensembl did not return gets its first returned isoform under
    canonical pooling, and the copy says so, in var and in the closing line."""
    src = save(tenx(), tmp_path / "a.h5ad")
    esm = esm_for([IDS[0], IDS[1], IDS[5]],
                  canonical_missing={IDS[1]: "ENSP99999999999"})
    result = write_h5ad(src, tmp_path / "out.h5ad", esm, gene_pooling=pooling)
    flags = values(ad.read_h5ad(tmp_path / "out.h5ad").var["esm2_not_canonical"])
    if pooling == "canonical":
        assert flags == [False, True, None, None, None, False]
        assert result.not_canonical == (IDS[1],)
        assert "first isoform used: 1 (ENSG00000000002)" in result.describe()
    else:  # the mean of every isoform claims no canonical row
        assert flags == [False, False, None, None, None, False]
        assert "first isoform used" not in result.describe()
