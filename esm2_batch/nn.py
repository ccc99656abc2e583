"""The consumer side of esm_all.pt: a gene embedding that also knows each gene's protein.

`AugmentedGeneEmbedding` replaces `nn.Embedding(num_genes, d_model)` in a model whose
tokens are genes (a diffusion model, a cell foundation model). Every gene keeps its own
trainable ID vector; genes that code for a protein also get their frozen ESM2 vector,
projected, normalised and gated, so that genes with similar proteins share features
from the first step instead of the model having to learn that from expression alone.
For ids of any shape::

    id_vec = id_embedding(ids)                              # [..., id_dim]   trainable
    esm    = esm_matrix[ids]                                # [..., E]        frozen buffer
    feats  = LayerNorm(esm_proj(esm)) * has_protein[ids]    # [..., P]        0 if no protein
    out    = mix(cat([id_vec, sigmoid(gate) * feats]))      # [..., d_model]

    E = 1280 (ESM2-650M) or 2560 (3B), P = esm_proj_dim (256), id_dim 128 by default.

`load_esm_matrix` turns the file into a matrix whose rows follow the caller's gene
vocabulary. The file is read only through `store.read_esm_file` (weights_only=True, the
contract checked); nothing else of the pipeline is imported except the gene-ID key
function of `genes`, so IDs match here exactly as the gene-list reader dedupes them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esm2_batch.errors import InputError, StoreError, name_some
from esm2_batch.store.esm_file import check_finite, gene_vectors, read_esm_file

__all__ = [
    "ISOFORM_MODES",
    "AugmentedGeneEmbedding",
    "EsmFileWarning",
    "GeneEmbeddingConfig",
    "load_esm_matrix",
]

ISOFORM_MODES = ("canonical", "mean")
_EXTRA_STATE_KEY = "_extra_state"  # torch.nn.Module's key for get_extra_state()


class EsmFileWarning(UserWarning):
    """The ESM file is missing or does not cover the vocabulary: training goes on, with less.

    A category of its own so that a training script can turn it into an error
    (`warnings.simplefilter("error", EsmFileWarning)`) or silence it on purpose.
    """


# ---------------------------------------------------------------------------- the matrix


def load_esm_matrix(
    path: str | os.PathLike[str],
    genes: Sequence[str],
    *,
    isoform: str = "canonical",
    key: str = "emb",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read esm_all.pt into rows aligned with `genes`, the model's own vocabulary.

    `key` picks the matrix: "emb" (the contract's), or a further one such as
    "emb_max_layer20" written by --repr_layers / --include (meta["matrices"] lists them).

    Returns `(matrix [len(genes), dim] float32, has_protein [len(genes)] bool)`. Row i
    belongs to genes[i] whatever order the file has; a gene the file lacks, or one it
    lists with no protein, gets a zero row and False. `isoform="canonical"` takes the
    gene's first row (the file puts the canonical isoform first); `"mean"` averages all
    of the gene's isoforms in float32.

    Keys match exactly first; failing that, Ensembl IDs match without version suffix and
    case (ENSG00000141510.17 == ENSG00000141510, either side), the identity the gene-list
    reader dedupes on. Symbols match exactly: TP53 is not Tp53 (human vs mouse).

    Warns (EsmFileWarning) once, naming a few, when vocabulary genes are absent from the
    file: a file written for another gene list otherwise trains silently on zeros.
    Raises InputError for an unknown isoform mode, StoreError for a missing or broken
    file or for non-finite values in the rows used.
    """
    _check_isoform(isoform)
    vocabulary = _as_gene_list(genes)
    esm = read_esm_file(path).select(key)
    rows = esm.match_rows(vocabulary)  # one list[int] per gene, None when not in the file
    absent = [gene for gene, found in zip(vocabulary, rows, strict=True) if found is None]
    if absent:
        warnings.warn(f"{path}: {len(absent)} of {len(vocabulary)} vocabulary genes are not "
                      f"in the file ({name_some(absent)}); they get zero ESM rows", EsmFileWarning,
                      stacklevel=2)
    vectors = gene_vectors(esm, vocabulary, gene_pooling=isoform, source=str(path))
    if vectors.not_canonical:
        warnings.warn(f"{path}: {len(vectors.not_canonical)} genes' canonical isoform was not "
                      f"returned by Ensembl ({name_some(vectors.not_canonical)}); their first "
                      "isoform's row stands in (rerun esm2-batch to retry them)",
                      EsmFileWarning, stacklevel=2)
    return vectors.matrix, vectors.has_protein  # [G, E] float32, [G] bool


# ---------------------------------------------------------------------------- the module


@dataclass
class GeneEmbeddingConfig:
    """The gene-embedding fields of a model config (the seed's ConditionalModelConfig).

    esm_matrix_path: the esm_all.pt the CLI wrote; None builds an ID-only embedding on
        purpose (no warning). A path that does not exist falls back to ID-only with an
        EsmFileWarning, unless esm_required.
    esm_proj_dim: width of the projected ESM features (E -> esm_proj_dim).
    id_dim: width of the trainable per-gene ID vector.
    isoform: "canonical" (the file's first row per gene) or "mean" (all isoforms).
    esm_required: raise StoreError instead of falling back when the file is missing, for
        runs where training without ESM would waste the GPU time.
    """

    esm_matrix_path: str | None = "esm_all.pt"
    esm_proj_dim: int = 256
    id_dim: int = 128
    isoform: str = "canonical"
    esm_required: bool = False

    def __post_init__(self) -> None:
        _check_isoform(self.isoform)
        _check_positive(esm_proj_dim=self.esm_proj_dim, id_dim=self.id_dim)


class AugmentedGeneEmbedding(nn.Module):
    """A drop-in `nn.Embedding(num_genes, d_model)` with frozen ESM2 protein features.

    `forward(ids)` takes integer gene indices of any shape (a scalar, [B], [B, G], ...)
    and returns [..., d_model]. `esm_matrix` is a tensor [num_genes, E] (rows already in
    vocabulary order), a path to esm_all.pt (then `genes` names the vocabulary, in index
    order, and is required) or None (ID-only). A missing file warns (EsmFileWarning, one
    per construction) and falls back to ID-only: id_embedding then mix, the same path
    without the ESM half, same output shape; `uses_esm` tells which one was built.

    Frozen matrix: a buffer, never a parameter, so no optimizer sees it and it takes no
    gradient; `.to(dtype/device)` moves it with the rest.

    Gate: one scalar, sigmoid(gate_logit), initialised at logit 0 -> 0.5. Sigmoid keeps it
    in (0, 1), so it reads as the share of ESM let in and can be logged (`esm_gate`) as a
    single number; per-channel scales would add nothing that esm_proj cannot already do.
    It starts half open rather than closed: a gate at 0 (Flamingo's tanh gates) exists to
    keep a pretrained network's output unchanged and leaves the projection without
    gradient until the gate moves; here the projection should learn from step one. Half,
    because after the LayerNorm the ESM features have unit scale like the ID embedding
    (N(0, 1) init) and half keeps a still-random projection from outweighing it.

    LayerNorm (no affine; mix provides the scale) on the projected features: the scale of
    ESM2 rows depends on the model size and layer that wrote the file, so without it the
    gate's starting value would mean something different for every file.

    Genes without protein: their ESM features are set to exactly zero after projection
    and norm (a `has_protein` mask buffer). Without the mask the zero row would become
    LayerNorm(esm_proj.bias), one learned vector shared by every non-coding gene and by
    every gene the file missed, and the gate would trade real protein signal against
    that flag. The ID embedding alone carries those genes; its per-gene vectors can learn
    any "no protein" signal the data supports.

    Checkpoints: `esm_matrix` and `has_protein` are persistent buffers, so state_dict
    carries the exact rows the weights were trained against (10 MB for 2,000 genes at
    1280 dims in float32), and inference can build the module from the checkpoint alone
    (esm_matrix=state_dict["<prefix>esm_matrix"]). Loading restores them; if they differ
    from the rows this module was built from (a regenerated esm_all.pt), an
    EsmFileWarning says the checkpoint's rows are used. The gene list is saved as extra
    state and compared before any tensor is copied: a different vocabulary, or the same
    genes in another order, raises InputError naming the genes that differ, since every
    row would otherwise pair with the wrong gene. The check runs when both sides know
    their gene list (a module built from a bare tensor without `genes` cannot be
    checked). A checkpoint with an ESM branch loaded into an ID-only module (or the
    reverse) raises InputError too.

    Not a drop-in for weight tying: there is no `weight` parameter; `table()` computes the
    fused [num_genes, d_model] table.
    """

    esm_matrix: torch.Tensor | None
    has_protein: torch.Tensor | None
    esm_proj: nn.Linear | None
    esm_norm: nn.LayerNorm | None
    gate_logit: nn.Parameter | None

    def __init__(
        self,
        num_genes: int,
        d_model: int,
        *,
        esm_matrix: torch.Tensor | str | os.PathLike[str] | None = None,
        genes: Sequence[str] | None = None,
        has_protein: torch.Tensor | None = None,
        id_dim: int = 128,
        esm_proj_dim: int = 256,
        isoform: str = "canonical",
        esm_required: bool = False,
    ) -> None:
        super().__init__()
        _check_positive(num_genes=num_genes, d_model=d_model, id_dim=id_dim,
                        esm_proj_dim=esm_proj_dim)
        _check_isoform(isoform)
        self.num_embeddings = num_genes  # nn.Embedding's names, for code that reads them
        self.embedding_dim = d_model
        self.genes: tuple[str, ...] | None = _vocabulary(genes, num_genes)
        matrix, mask = _resolve_esm(esm_matrix, genes=self.genes, has_protein=has_protein,
                                    num_genes=num_genes, isoform=isoform,
                                    esm_required=esm_required)
        self.id_embedding = nn.Embedding(num_genes, id_dim)  # [G, id_dim], trainable
        self.register_buffer("esm_matrix", matrix)  # [G, E] frozen, or None
        self.register_buffer("has_protein", mask)  # [G] bool, or None
        if matrix is None:
            self.esm_proj = self.esm_norm = None
            self.register_parameter("gate_logit", None)
            self.mix = nn.Linear(id_dim, d_model)
            return
        self.esm_proj = nn.Linear(matrix.shape[1], esm_proj_dim)  # E -> P
        self.esm_norm = nn.LayerNorm(esm_proj_dim, elementwise_affine=False)
        self.gate_logit = nn.Parameter(torch.zeros(()))  # sigmoid(0) = 0.5, see docstring
        self.mix = nn.Linear(id_dim + esm_proj_dim, d_model)  # [id | esm] -> d_model

    @classmethod
    def from_config(
        cls,
        config: GeneEmbeddingConfig,
        *,
        num_genes: int,
        d_model: int,
        genes: Sequence[str] | None = None,
    ) -> AugmentedGeneEmbedding:
        """Build from a model config; `genes` is required when esm_matrix_path is set."""
        return cls(num_genes, d_model, esm_matrix=config.esm_matrix_path, genes=genes,
                   id_dim=config.id_dim, esm_proj_dim=config.esm_proj_dim,
                   isoform=config.isoform, esm_required=config.esm_required)

    @property
    def uses_esm(self) -> bool:
        """False for an ID-only module (no file given, or the file was missing)."""
        return self.esm_matrix is not None

    @property
    def esm_gate(self) -> float | None:
        """The gate's current value in (0, 1), to log during training; None if ID-only."""
        if self.gate_logit is None:
            return None
        return float(torch.sigmoid(self.gate_logit.detach()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] integer gene indices -> [..., d_model], like nn.Embedding."""
        if ids.numel() > self.num_embeddings:
            # More lookups than genes (every gene of every cell): fuse each gene once,
            # [G, d_model], then gather, instead of projecting [..., E] per token.
            return F.embedding(ids, self.table())
        return self._fuse(ids)

    def table(self) -> torch.Tensor:
        """The fused embedding of every gene, [num_genes, d_model]."""
        device = self.id_embedding.weight.device
        return self._fuse(torch.arange(self.num_embeddings, device=device))

    def _fuse(self, ids: torch.Tensor) -> torch.Tensor:
        id_vec = self.id_embedding(ids)  # [..., id_dim]
        fused = id_vec if not self.uses_esm else torch.cat(
            [id_vec, self._esm_features(ids)], dim=-1)  # [..., id_dim (+ P)]
        out: torch.Tensor = self.mix(fused)  # [..., d_model]
        return out

    def _esm_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Projected, normalised, masked and gated ESM features, [..., esm_proj_dim]."""
        assert self.esm_matrix is not None and self.has_protein is not None
        assert self.esm_proj is not None and self.esm_norm is not None
        assert self.gate_logit is not None
        esm = self.esm_matrix[ids]  # [..., E], a buffer: no gradient reaches it
        feats: torch.Tensor = self.esm_norm(self.esm_proj(esm))  # [..., P]
        no_protein = ~self.has_protein[ids].unsqueeze(-1)  # [..., 1]
        feats = feats.masked_fill(no_protein, 0.0)  # no bias leaks in, see class docstring
        return torch.sigmoid(self.gate_logit) * feats

    def extra_repr(self) -> str:
        esm_dim = None if self.esm_matrix is None else self.esm_matrix.shape[1]
        return (f"num_genes={self.num_embeddings}, d_model={self.embedding_dim}, "
                f"esm_dim={esm_dim}, uses_esm={self.uses_esm}")

    # ---------------------------------------------------------------- checkpoints

    def get_extra_state(self) -> dict[str, Any]:
        """The gene vocabulary, so a checkpoint cannot be paired with another one."""
        return {"genes": None if self.genes is None else list(self.genes)}

    def set_extra_state(self, state: Any) -> None:
        """Nothing to restore: the vocabulary is fixed at construction and was already
        compared in _load_from_state_dict, before any tensor was copied."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._check_checkpoint(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def _check_checkpoint(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Refuse a checkpoint of another vocabulary or architecture; flag new rows."""
        if not any(key.startswith(prefix) for key in state_dict):
            return  # a partial state_dict that does not cover this module
        where = prefix.rstrip(".") or type(self).__name__
        saved_matrix = state_dict.get(prefix + "esm_matrix")
        if (saved_matrix is not None) != self.uses_esm:
            raise InputError(_branch_mismatch(where, saved_has_esm=saved_matrix is not None,
                                              key=prefix + "esm_matrix"))
        extra = state_dict.get(prefix + _EXTRA_STATE_KEY)
        saved_genes = extra.get("genes") if isinstance(extra, dict) else None
        if saved_genes is not None and self.genes is not None \
                and list(saved_genes) != list(self.genes):
            raise InputError(f"{where}: the checkpoint was trained on a different gene "
                             f"vocabulary ({_vocabulary_difference(saved_genes, self.genes)});"
                             " loading it would pair rows with the wrong genes. Build the "
                             "module with the checkpoint's gene list, "
                             f"state_dict[{prefix + _EXTRA_STATE_KEY!r}]['genes']")
        if saved_matrix is not None:
            self._warn_if_rows_differ(saved_matrix, where)

    def _warn_if_rows_differ(self, saved: torch.Tensor, where: str) -> None:
        current = self.esm_matrix
        assert current is not None
        if saved.shape == current.shape and not torch.equal(saved.to(current), current):
            warnings.warn(f"{where}: the checkpoint's ESM rows differ from the esm_all.pt "
                          "this module was built from; using the checkpoint's (the weights "
                          "were trained against them)", EsmFileWarning, stacklevel=2)


# ---------------------------------------------------------------------------- helpers


def _resolve_esm(
    esm_matrix: torch.Tensor | str | os.PathLike[str] | None,
    *,
    genes: Sequence[str] | None,
    has_protein: torch.Tensor | None,
    num_genes: int,
    isoform: str,
    esm_required: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(matrix [G, E], has_protein [G]) from a tensor or a file, or (None, None): ID-only."""
    if esm_matrix is None:
        return None, None
    if isinstance(esm_matrix, torch.Tensor):
        return _from_tensor(esm_matrix, has_protein, num_genes)
    if has_protein is not None:
        raise InputError("has_protein goes with a tensor esm_matrix; a file brings its own")
    if genes is None:
        raise InputError(f"esm_matrix={str(esm_matrix)!r} is a file: pass genes=, the model's "
                         "gene vocabulary in index order, so its rows can be matched by name")
    path = Path(esm_matrix)
    if not path.exists():
        if esm_required:
            raise StoreError(f"{path}: no such embedding file; run esm2-batch to create it")
        warnings.warn(f"{path}: no such embedding file; AugmentedGeneEmbedding falls back to "
                      "ID-only gene embeddings (run esm2-batch to create it)", EsmFileWarning,
                      stacklevel=3)
        return None, None
    return load_esm_matrix(path, genes, isoform=isoform)


def _from_tensor(
    matrix: torch.Tensor, has_protein: torch.Tensor | None, num_genes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Own a checked copy of a caller's [G, E] matrix, in the parameters' default dtype."""
    if matrix.dim() != 2 or matrix.shape[0] != num_genes or not matrix.is_floating_point():
        raise InputError(f"esm_matrix must be a float tensor [num_genes={num_genes}, dim]; "
                         f"got {matrix.dtype} {list(matrix.shape)}")
    matrix = matrix.detach().to(dtype=torch.get_default_dtype(), copy=True)  # [G, E]
    check_finite(matrix, [str(i) for i in range(num_genes)], source="esm_matrix")
    if has_protein is None:
        return matrix, matrix.ne(0).any(dim=1)  # [G]: a zero row means no protein
    if has_protein.shape != (num_genes,):
        raise InputError(f"has_protein must have shape [{num_genes}]; got "
                         f"{list(has_protein.shape)}")
    return matrix, has_protein.detach().to(device=matrix.device, dtype=torch.bool, copy=True)


def _vocabulary(genes: Sequence[str] | None, num_genes: int) -> tuple[str, ...] | None:
    if genes is None:
        return None
    vocabulary = tuple(_as_gene_list(genes))
    if len(vocabulary) != num_genes:
        raise InputError(f"genes has {len(vocabulary)} names but num_genes={num_genes}; "
                         "pass the vocabulary the model indexes, one name per index")
    return vocabulary


def _as_gene_list(genes: Sequence[str]) -> list[str]:
    """A str is a Sequence[str] too; taking 'TP53' as four genes helps nobody."""
    if isinstance(genes, str):
        raise InputError(f"genes must be a list of gene names, not the string {genes!r}")
    return [str(gene) for gene in genes]


def _check_isoform(isoform: str) -> None:
    if isoform not in ISOFORM_MODES:
        raise InputError(f"isoform must be one of {', '.join(map(repr, ISOFORM_MODES))}; "
                         f"got {isoform!r}")


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer; got {value!r}")


def _branch_mismatch(where: str, *, saved_has_esm: bool, key: str) -> str:
    if saved_has_esm:
        return (f"{where}: the checkpoint has an ESM branch but this module is ID-only "
                "(was esm_all.pt missing?); build it from that file, or from the "
                f"checkpoint's own rows: esm_matrix=state_dict[{key!r}]")
    return (f"{where}: the checkpoint is ID-only but this module has an ESM branch; build it "
            "with esm_matrix=None to load it")


def _vocabulary_difference(saved: Sequence[str], current: Sequence[str]) -> str:
    """Say how two gene lists differ, in a line: counts, names, or the first moved index."""
    saved_set, current_set = set(saved), set(current)
    parts = []
    if len(saved) != len(current):
        parts.append(f"checkpoint {len(saved)} genes, this module {len(current)}")
    only_saved = [g for g in saved if g not in current_set]
    only_current = [g for g in current if g not in saved_set]
    if only_saved:
        parts.append(f"only in the checkpoint: {len(only_saved)} ({name_some(only_saved)})")
    if only_current:
        parts.append(f"only in this module: {len(only_current)} ({name_some(only_current)})")
    if not parts:
        moved = [i for i, (a, b) in enumerate(zip(saved, current, strict=True)) if a != b]
        first = moved[0]
        parts.append(f"same genes in another order: {len(moved)} positions differ, first "
                     f"index {first}: checkpoint {saved[first]!r}, this module "
                     f"{current[first]!r}")
    return "; ".join(parts)

