"""What a gene-mode run reads and checks before any work: the genes (a list, an .h5ad,
--all_genes or an isoforms FASTA's own), the outputs, the batch budget against the model,
and an earlier esm_all.pt whose rows could be reused.

Apart from gene_mode.py, which orchestrates: these are the checks that must all pass
before a model loads or a request goes out, so a run that would fail after an hour fails
in a second instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esm2_batch.embedding.batching import SPECIAL_TOKENS
from esm2_batch.errors import InputError, StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.run.config import RunConfig
from esm2_batch.sources.base import IsoformSource
from esm2_batch.sources.gene_lists import GeneList, dedupe, read_gene_list
from esm2_batch.sources.h5ad_genes import H5adGenes, read_h5ad_genes
from esm2_batch.store.atomic import check_writable
from esm2_batch.store.esm_file import EsmFile, read_esm_file
from esm2_batch.store.partial import describe_difference

__all__ = ["Genes", "check_budget", "check_outputs", "reusable_file"]


@dataclass
class Genes:
    """The queries of a run and, for an .h5ad list, the file they came from."""

    genes: GeneList
    h5ad: H5adGenes | None

    @classmethod
    def read(cls, config: RunConfig, source: IsoformSource) -> Genes:
        """--all_genes (every gene the source lists), --hvg_file (a list or an .h5ad),
        else the genes an isoforms FASTA lists."""
        hvg = config.hvg_file
        if config.all_genes:
            return cls(_all_genes(hvg, source), None)
        if hvg is not None and hvg.suffix == ".h5ad":
            h5ad = read_h5ad_genes(hvg, id_column=config.id_column)
            return cls(h5ad.genes, h5ad)
        if hvg is not None:
            return cls(read_gene_list(hvg, column=config.id_column), None)
        known = source.known_queries()
        if known:
            return cls(dedupe(known), None)
        raise InputError("no genes: pass --hvg_file FILE (one gene per line, or .h5ad) or "
                         "--isoforms FASTA")


def _all_genes(hvg: Path | None, source: IsoformSource) -> GeneList:
    """The source's whole proteome as the gene list; one InputError line when the flags
    contradict each other or the source cannot list its genes (REST), before any work."""
    if hvg is not None:
        raise InputError(f"--all_genes and --hvg_file {hvg}: give one of them (--all_genes "
                         "embeds every gene of the species that has a protein)")
    listed = source.all_genes()
    if listed is None:
        raise InputError("--all_genes needs the offline Ensembl files: pass --ensembl_files "
                         "DIR or --ensembl_release N ('esm2-batch download' fetches them); "
                         "Ensembl REST cannot list every gene")
    if not listed:
        raise InputError("--all_genes: the source lists no gene with a protein of the wanted "
                         "--biotypes")
    return dedupe(listed)



def check_outputs(config: RunConfig, genes: Genes) -> None:
    """Fail now, not after the run, if an output cannot be written."""
    check_writable(config.out, flag="--out", example="esm_all.pt")
    if config.output.write_h5ad is not None:
        if genes.h5ad is None:
            raise InputError("--write_h5ad needs an .h5ad --hvg_file to copy")
        from esm2_batch.outputs.h5ad import check_h5ad_paths

        check_h5ad_paths(genes.h5ad.path, config.output.write_h5ad)


def check_budget(config: RunConfig, model: LoadedModel) -> None:
    config.embed.layer_indices(name=model.name, num_layers=model.num_layers)  # too deep
    if "per_residue" in config.embed.poolers:
        raise InputError("gene mode stores pooled rows: pooling 'per_residue' is for "
                         "embed_sequences / iter_embeddings")
    truncation = config.embed.for_model(model.max_residues).cut
    budget = config.embed.toks_per_batch
    if truncation > model.max_residues:
        raise InputError(f"--truncation {truncation} exceeds {model.name}'s context "
                         f"of {model.max_residues} residues; lower it, or use --long_seqs "
                         "window to cover long proteins whole")
    need = min(truncation, model.max_residues) + SPECIAL_TOKENS
    if budget < need:
        raise InputError(f"--toks_per_batch {budget} cannot hold one sequence of "
                         f"{need - SPECIAL_TOKENS} residues; use at least {need} or lower "
                         "--truncation")


def reusable_file(config: RunConfig, settings: dict[str, Any]) -> EsmFile | None:
    """An existing esm_all.pt whose rows can be reused, or None (or an error)."""
    if not config.out.exists() or config.output.overwrite:
        return None
    existing = read_esm_file(config.out)
    old = existing.meta.get("settings")
    if old != settings:
        diff = describe_difference(old or {}, settings) if isinstance(old, dict) else "none"
        raise StoreError(f"{config.out}: exists with other settings ({diff}); pass "
                         "--overwrite to replace it or choose another --out")
    return existing
