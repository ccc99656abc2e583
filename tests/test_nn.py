"""AugmentedGeneEmbedding and load_esm_matrix against small esm_all.pt files.

Each file follows the DESIGN contract: float16 `emb`, one row per isoform, canonical
first; a gene with no protein maps to []; one key carries an Ensembl version suffix.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from esm2_batch.errors import InputError, StoreError
from esm2_batch.nn import (
    AugmentedGeneEmbedding,
    EsmFileWarning,
    GeneEmbeddingConfig,
    load_esm_matrix,
)

DIM = 8
BRAF = "ENSG00000157764"
# gene key in the file -> its rows (canonical first)
INDEX: dict[str, list[int]] = {
    "TP53": [0],
    "BRCA1": [1, 2, 3],
    "LINC00001": [],
    f"{BRAF}.13": [4, 5],
    "EGFR": [6],
}
FILE_GENES = list(INDEX)
N_ROWS = 7


def _emb() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(N_ROWS, DIM, generator=generator).half()  # [7, 8] float16


@pytest.fixture
def esm_file(tmp_path: Path) -> Path:
    path = tmp_path / "esm_all.pt"
    torch.save({
        "emb": _emb(),
        "genes": FILE_GENES,
        "protein_ids": [f"ENSP{i:011d}" for i in range(N_ROWS)],
        "gene_to_isoform_indices": INDEX,
        "meta": {"model": "esm2_t6_8M_UR50D", "layer": 6, "pooling": "mean",
                 "ensembl_release": 114, "truncation": 1022},
    }, path)
    return path


def _model(path: Path, genes: list[str], d_model: int = 16, **kwargs: Any
           ) -> AugmentedGeneEmbedding:
    torch.manual_seed(0)
    return AugmentedGeneEmbedding(len(genes), d_model, esm_matrix=path, genes=genes,
                                  id_dim=4, esm_proj_dim=6, **kwargs)


# ---------------------------------------------------------------- load_esm_matrix


def test_file_is_read_through_store_with_weights_only(esm_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_esm_matrix(esm_file, FILE_GENES)
    assert [c.get("weights_only") for c in calls] == [True]


def test_rows_follow_a_shuffled_partly_foreign_vocabulary(esm_file: Path) -> None:
    emb = _emb().float()
    vocab = ["EGFR", "NOT_IN_FILE", "TP53", "LINC00001", "BRCA1"]
    with pytest.warns(EsmFileWarning, match="1 of 5 vocabulary genes.*NOT_IN_FILE"):
        matrix, has_protein = load_esm_matrix(esm_file, vocab)
    assert matrix.dtype == torch.float32 and matrix.shape == (5, DIM)
    assert torch.equal(matrix[0], emb[6])
    assert torch.equal(matrix[2], emb[0])
    assert torch.equal(matrix[4], emb[1])  # canonical = first row of BRCA1's list
    assert torch.equal(matrix[1], torch.zeros(DIM))  # not in the file
    assert torch.equal(matrix[3], torch.zeros(DIM))  # in the file, no protein
    assert has_protein.tolist() == [True, False, True, False, True]


def test_isoform_mean_averages_every_isoform(esm_file: Path) -> None:
    emb = _emb().float()
    matrix, has_protein = load_esm_matrix(esm_file, ["BRCA1", "TP53", "LINC00001"],
                                          isoform="mean")
    torch.testing.assert_close(matrix[0], emb[1:4].mean(0))
    assert torch.equal(matrix[1], emb[0])  # one isoform: its row, exactly
    assert torch.equal(matrix[2], torch.zeros(DIM))
    assert has_protein.tolist() == [True, True, False]


def test_unknown_isoform_mode_is_refused(esm_file: Path) -> None:
    with pytest.raises(InputError, match="isoform must be one of 'canonical', 'mean'; got 'max'"):
        load_esm_matrix(esm_file, FILE_GENES, isoform="max")


def test_ensembl_ids_match_across_version_suffixes(esm_file: Path) -> None:
    emb = _emb().float()
    matrix, has_protein = load_esm_matrix(esm_file, [BRAF, f"{BRAF}.15", f"{BRAF}.13"])
    for row in matrix:
        assert torch.equal(row, emb[4])
    assert has_protein.all()


def test_non_finite_rows_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "esm_all.pt"
    emb = torch.zeros(2, DIM, dtype=torch.float16)
    emb[1, 3] = float("nan")
    torch.save({"emb": emb, "genes": ["A", "B"], "protein_ids": ["P1", "P2"],
                "gene_to_isoform_indices": {"A": [0], "B": [1]}, "meta": {}}, path)
    with pytest.raises(StoreError, match=r"non-finite ESM values for 1 genes \(B\)"):
        load_esm_matrix(path, ["A", "B"])


# ---------------------------------------------------------------- the module


@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 2, 3), (4, 5)])
def test_forward_shape_matches_nn_embedding(esm_file: Path, shape: tuple[int, ...]) -> None:
    model = _model(esm_file, FILE_GENES)
    ids = torch.randint(0, len(FILE_GENES), shape)
    out = model(ids)
    assert out.shape == nn.Embedding(len(FILE_GENES), 16)(ids).shape == (*shape, 16)


def test_table_path_equals_per_index_path(esm_file: Path) -> None:
    """Above num_genes lookups forward gathers from the fused table; same numbers."""
    model = _model(esm_file, FILE_GENES)
    ids = torch.tensor([[4, 0, 1, 2, 3, 1]])  # 6 > 5 genes: table path
    assert ids.numel() > model.num_embeddings
    torch.testing.assert_close(model(ids), model._fuse(ids))
    torch.testing.assert_close(model.table(), model._fuse(torch.arange(5)))


def test_optimizer_step_trains_everything_but_the_esm_matrix(esm_file: Path) -> None:
    model = _model(esm_file, FILE_GENES)
    frozen = model.esm_matrix.clone()
    assert all(p is not model.esm_matrix for p in model.parameters())
    assert {name for name, _ in model.named_parameters()} == {
        "id_embedding.weight", "esm_proj.weight", "esm_proj.bias", "gate_logit",
        "mix.weight", "mix.bias"}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    loss = (model(torch.arange(5).repeat(2, 1)) - target).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert model.esm_matrix.grad is None and not model.esm_matrix.requires_grad
    assert torch.equal(model.esm_matrix, frozen)
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"


def test_genes_without_protein_get_no_esm_contribution(esm_file: Path) -> None:
    """No projection bias leaks in: those genes' outputs do not depend on the ESM branch."""
    genes = ["LINC00001", "NOT_IN_FILE", "TP53"]
    with pytest.warns(EsmFileWarning):
        model = _model(esm_file, genes)
    assert model.has_protein.tolist() == [False, False, True]
    model(torch.tensor([0, 1])).sum().backward()
    assert model.esm_proj.weight.grad.abs().sum() == 0
    assert model.esm_proj.bias.grad.abs().sum() == 0
    assert model.gate_logit.grad == 0


def test_missing_file_warns_once_and_falls_back_to_id_only(tmp_path: Path) -> None:
    genes = ["TP53", "BRCA1", "EGFR"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AugmentedGeneEmbedding(3, 16, esm_matrix=tmp_path / "esm_all.pt", genes=genes)
    assert [w.category for w in caught] == [EsmFileWarning]
    assert "falls back to ID-only" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line
    assert not model.uses_esm and model.esm_matrix is None and model.esm_gate is None
    assert model(torch.tensor([[0, 2], [1, 1]])).shape == (2, 2, 16)


def test_missing_file_raises_when_esm_is_required(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such embedding file"):
        AugmentedGeneEmbedding(1, 4, esm_matrix=tmp_path / "esm_all.pt", genes=["A"],
                               esm_required=True)


def test_a_broken_file_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    path = tmp_path / "esm_all.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(StoreError, match=r"not a readable esm_all\.pt"):
        AugmentedGeneEmbedding(1, 4, esm_matrix=path, genes=["A"])


def test_a_path_needs_a_matching_gene_vocabulary(esm_file: Path) -> None:
    with pytest.raises(InputError, match="pass genes="):
        AugmentedGeneEmbedding(5, 16, esm_matrix=esm_file)
    with pytest.raises(InputError, match="genes has 2 names but num_genes=5"):
        AugmentedGeneEmbedding(5, 16, esm_matrix=esm_file, genes=["TP53", "EGFR"])
    with pytest.raises(InputError, match="not the string"):
        AugmentedGeneEmbedding(4, 16, esm_matrix=esm_file, genes="TP53")


def test_a_tensor_matrix_is_copied_and_zero_rows_mean_no_protein() -> None:
    matrix = torch.randn(3, DIM, dtype=torch.float16)
    matrix[1] = 0
    model = AugmentedGeneEmbedding(3, 16, esm_matrix=matrix)
    assert model.esm_matrix.dtype == torch.float32
    assert model.has_protein.tolist() == [True, False, True]
    matrix[0] = 0
    assert model.has_protein[0] and model.esm_matrix[0].abs().sum() > 0
    with pytest.raises(InputError, match=r"num_genes=4"):
        AugmentedGeneEmbedding(4, 16, esm_matrix=matrix)


def test_to_float64_moves_the_frozen_matrix(esm_file: Path) -> None:
    model = _model(esm_file, FILE_GENES).to(torch.float64)
    assert model.esm_matrix.dtype == torch.float64
    assert model.has_protein.dtype == torch.bool
    assert model(torch.tensor([0, 1])).dtype == torch.float64


def test_config_defaults_and_constructor(esm_file: Path) -> None:
    config = GeneEmbeddingConfig()
    assert (config.esm_matrix_path, config.esm_proj_dim, config.id_dim, config.isoform) == (
        "esm_all.pt", 256, 128, "canonical")
    config = GeneEmbeddingConfig(esm_matrix_path=str(esm_file), esm_proj_dim=6, id_dim=4,
                                 isoform="mean")
    model = AugmentedGeneEmbedding.from_config(config, num_genes=5, d_model=16,
                                               genes=FILE_GENES)
    assert model.uses_esm and model.esm_proj.out_features == 6
    assert model.id_embedding.embedding_dim == 4 and model.esm_gate == 0.5
    torch.testing.assert_close(model.esm_matrix[1], _emb().float()[1:4].mean(0))
    with pytest.raises(InputError, match="isoform"):
        GeneEmbeddingConfig(isoform="longest")


# ---------------------------------------------------------------- checkpoints


class _Net(nn.Module):
    """A model holding the embedding under a prefix, as real models do."""

    def __init__(self, emb: AugmentedGeneEmbedding) -> None:
        super().__init__()
        self.gene_emb = emb
        self.head = nn.Linear(16, 1)


def _round_trip(net: nn.Module) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_checkpoint_carries_the_matrix_and_reloads_identically(esm_file: Path) -> None:
    trained = _Net(_model(esm_file, FILE_GENES))
    with torch.no_grad():
        trained.gene_emb.gate_logit.fill_(1.5)
    state = _round_trip(trained)
    assert state["gene_emb._extra_state"] == {"genes": FILE_GENES}
    assert torch.equal(state["gene_emb.esm_matrix"], trained.gene_emb.esm_matrix)
    torch.manual_seed(123)  # different initial weights
    fresh = _Net(AugmentedGeneEmbedding(5, 16, esm_matrix=esm_file, genes=FILE_GENES,
                                        id_dim=4, esm_proj_dim=6))
    fresh.load_state_dict(state)
    ids = torch.tensor([[0, 1, 2], [3, 4, 0]])
    assert torch.equal(fresh.gene_emb(ids), trained.gene_emb(ids))
    # inference without esm_all.pt: the checkpoint's own rows build the module
    alone = _Net(AugmentedGeneEmbedding(
        5, 16, esm_matrix=state["gene_emb.esm_matrix"], genes=FILE_GENES,
        has_protein=state["gene_emb.has_protein"], id_dim=4, esm_proj_dim=6))
    alone.load_state_dict(state)
    assert torch.equal(alone.gene_emb(ids), trained.gene_emb(ids))


@pytest.mark.parametrize(("vocab", "message"), [
    (["BRCA1", "TP53", "LINC00001", f"{BRAF}.13", "EGFR"],
     "same genes in another order: 2 positions differ, first index 0: checkpoint 'TP53', "
     "this module 'BRCA1'"),
    (["TP53", "BRCA1", "LINC00001", f"{BRAF}.13", "KRAS"],
     r"only in the checkpoint: 1 \(EGFR\); only in this module: 1 \(KRAS\)"),
])
@pytest.mark.filterwarnings("ignore::esm2_batch.nn.EsmFileWarning")  # KRAS is not in the file
def test_checkpoint_of_another_vocabulary_is_refused(esm_file: Path, vocab: list[str],
                                                     message: str) -> None:
    state = _round_trip(_Net(_model(esm_file, FILE_GENES)))
    other = _Net(_model(esm_file, vocab))
    before = other.gene_emb.mix.weight.clone()
    with pytest.raises(InputError, match=f"gene_emb: the checkpoint was trained on a different "
                                         f"gene vocabulary \\({message}"):
        other.load_state_dict(state)
    assert torch.equal(other.gene_emb.mix.weight, before)  # refused before copying


def test_checkpoint_with_esm_into_id_only_module_is_refused(esm_file: Path,
                                                            tmp_path: Path) -> None:
    state = _round_trip(_Net(_model(esm_file, FILE_GENES)))
    with pytest.warns(EsmFileWarning):
        id_only = _Net(_model(tmp_path / "missing.pt", FILE_GENES))
    with pytest.raises(InputError, match="checkpoint has an ESM branch but this module is "
                                         "ID-only"):
        id_only.load_state_dict(state)


def test_checkpoint_rows_that_differ_from_the_file_win_with_a_warning(esm_file: Path) -> None:
    trained = _model(esm_file, FILE_GENES)
    state = _round_trip(trained)
    state["esm_matrix"] = state["esm_matrix"] + 1.0
    fresh = _model(esm_file, FILE_GENES)
    with pytest.warns(EsmFileWarning, match="checkpoint's ESM rows differ"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.esm_matrix, state["esm_matrix"])
