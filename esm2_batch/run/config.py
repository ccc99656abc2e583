"""RunConfig: everything a gene-mode run needs, grouped by the stage that uses it.

    RunConfig
    ├── hvg_file, id_column    the gene list (txt/csv/tsv or .h5ad) and its gene column
    ├── all_genes              or every gene of the source (offline Ensembl files)
    ├── source: SourceOptions  where isoforms come from (sources/base.py)
    ├── model: ModelOptions    which encoder, on which device
    ├── embed: EmbedOptions    how sequences become rows (embedding/options.py)
    ├── stage: StageOptions    in this process or on Ray (run/stages.py)
    └── output: OutputOptions  esm_all.pt and the files written beside it

Each group is a frozen dataclass whose fields are CLI flags of the same names, so the CLI
builds one per group and a Python caller changes one field with dataclasses.replace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.models import Engine, LoadedModel, load_model
from esm2_batch.run.stages import StageOptions
from esm2_batch.sources.base import SourceOptions
from esm2_batch.store.esm_file import GenePooling

__all__ = ["ModelOptions", "OutputOptions", "RunConfig"]


@dataclass(frozen=True)
class ModelOptions:
    """model: a size (650M), a fair-esm name, a checkpoint path, an HF folder or hub id;
    device: cuda/cpu (default cuda when available); engine: fast or reference; backend:
    auto (from what `model` names), fair-esm, hf or esmc; dtype: the compute precision,
    auto (None: float16 on cuda, float32 elsewhere), fp16, bf16 or fp32."""

    model: str = "650M"
    device: str | None = None
    engine: Engine = "fast"
    backend: str = "auto"
    dtype: str | None = None

    def load(self) -> LoadedModel:
        return load_model(self.model, device=self.device, dtype=self.dtype,
                          engine=self.engine, backend=self.backend)


@dataclass(frozen=True)
class OutputOptions:
    """out: esm_all.pt's path (its side files and <out>.partial/ go beside it);
    overwrite: replace an output or unfinished run made with other settings;
    save_isoforms: also write the isoforms as FASTA; write_h5ad: an .h5ad copy with the
    vectors (needs an .h5ad gene list), pooled per gene by gene_pooling; strict: after
    writing, raise EnsemblError if any gene is "incomplete" (sequences Ensembl did not
    return), for pipelines that must not go on with a partial file."""

    out: Path = Path("esm_all.pt")
    overwrite: bool = False
    save_isoforms: Path | None = None
    write_h5ad: Path | None = None
    gene_pooling: GenePooling = "canonical"
    strict: bool = False


@dataclass(frozen=True)
class RunConfig:
    """One gene-mode run (see the module docstring for the groups)."""

    hvg_file: Path | None = None
    id_column: str | None = None  # --gene_column: a CSV/TSV column or an .h5ad var column
    all_genes: bool = False  # every gene the source lists with a protein, instead of hvg_file
    source: SourceOptions = field(default_factory=SourceOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    stage: StageOptions = field(default_factory=StageOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    @property
    def out(self) -> Path:
        return self.output.out
