"""--dry_run: the plan of a run (what would be fetched, embedded and how long it would
take) without paying for it.

The isoforms are fetched (or read) exactly as the real run would, through the same
source (run/gene_inputs.py's Genes and sources.factory's open_source), because what a
gene list resolves to, and how many residues that is, is the whole question; everything
after that is skipped: no weights are loaded, nothing is embedded, nothing is written but
--save_isoforms when asked. The time comes from run/estimate.py.

What earlier work would spare is told as far as it can be known without the weights:
the row cache and the stores are keyed by the weights' fingerprint (a digest of every
tensor, models/weights.py), which only loading them gives, so the plan says how many
genes an existing esm_all.pt or an unfinished run holds, reused only when their
settings, weights included, match; and that the row cache is unknown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.records import GeneIsoforms
from esm2_batch.run.config import ModelOptions, RunConfig
from esm2_batch.run.estimate import (
    Architecture,
    Estimate,
    architecture_of,
    estimate,
    format_duration,
)
from esm2_batch.run.reports import RunSummary
from esm2_batch.sources.base import IsoformSource

__all__ = ["DryRunPlan", "dry_run_fasta", "dry_run_genes", "estimate_line"]

ROW_CACHE_UNKNOWN = ("unknown without loading the weights (rows are keyed by the weights' "
                     "fingerprint)")


@dataclass
class DryRunPlan:
    """What a run would do; `lines()` for people, `as_dict()` for --json."""

    model: str
    device: str
    genes_in: int = 0
    resolved: int = 0
    not_found: list[str] = field(default_factory=list)
    no_protein: int = 0
    incomplete: int = 0
    isoforms: int = 0
    distinct_sequences: int = 0
    truncated: int = 0
    tokens: int = 0
    row_cache: str = ROW_CACHE_UNKNOWN
    existing: list[str] = field(default_factory=list)
    estimate: Estimate | None = None
    estimate_note: str = ""
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        found = "" if not self.not_found else f" (e.g. {', '.join(self.not_found[:5])})"
        when = (self.estimate.describe() if self.estimate is not None
                else f"unknown ({self.estimate_note})")
        return [
            "dry run: nothing embedded, no weights loaded, nothing written",
            *self.notes,
            f"genes: {self.genes_in} in, {self.resolved} resolved ({self.no_protein} without "
            f"protein, {self.incomplete} incomplete), {len(self.not_found)} not found{found}",
            f"isoforms: {self.isoforms}, distinct sequences: {self.distinct_sequences} "
            f"({self.truncated} longer than the context)",
            f"tokens to embed: {self.tokens:,} (after truncation or windows)",
            f"row cache: {self.row_cache}",
            *(f"already done: {line}" for line in self.existing),
            f"estimated embedding time with {self.model} on {self.device}: {when}",
        ]

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": True, "model": self.model, "device": self.device,
                "genes_in": self.genes_in, "resolved": self.resolved,
                "not_found": self.not_found, "no_protein": self.no_protein,
                "incomplete": self.incomplete, "isoforms": self.isoforms,
                "distinct_sequences": self.distinct_sequences, "truncated": self.truncated,
                "tokens": self.tokens, "row_cache": self.row_cache, "existing": self.existing,
                "estimate": self.estimate.as_dict() if self.estimate is not None else None,
                "estimate_note": self.estimate_note, "notes": self.notes}


def dry_run_genes(config: RunConfig) -> DryRunPlan:
    """Gene mode's plan: the same up-front checks and fetch as gene_mode.run."""
    from esm2_batch.run.gene_inputs import Genes, check_outputs
    from esm2_batch.sources.factory import open_source
    from esm2_batch.sources.isoforms_fasta import write_isoforms_fasta

    config.embed.check_values()
    source = open_source(config.source)
    genes = Genes.read(config, source)
    check_outputs(config, genes)
    queries = list(genes.genes.genes)
    records = asyncio.run(_fetch_all(source, queries))
    arch = architecture_of(config.model)
    options = config.embed.for_model(arch.max_residues if arch else 1022)
    sequences = {i.sequence for g in records for i in g.isoforms}
    plan = _plan(config.model, options, arch, sequences, cache=config.stage.cache)
    plan.genes_in = len(queries)
    plan.not_found = [g.query for g in records if g.status == "not_found"]
    plan.resolved = len(records) - len(plan.not_found)
    plan.no_protein = sum(g.status == "no_protein" for g in records)
    plan.incomplete = sum(g.status == "incomplete" for g in records)
    plan.isoforms = sum(len(g.isoforms) for g in records)
    plan.existing = _existing_gene_work(config, set(queries))
    if described := source.describe():
        plan.notes.append(described)
    if config.output.save_isoforms is not None:
        written = write_isoforms_fasta(config.output.save_isoforms,
                                       [g for g in records if g.status != "not_found"])
        plan.notes.append(f"wrote {written} isoforms to {config.output.save_isoforms}")
    return plan


def dry_run_fasta(inputs: Sequence[Path], *, model: ModelOptions, embed: EmbedOptions,
                  out_dir: Path | None, cache: bool) -> DryRunPlan:
    """FASTA mode's plan: every record read and cleaned as run_fasta would."""
    from esm2_batch.run.fasta_mode import clean_records, fasta_output
    from esm2_batch.sources.fasta import read_fasta

    embed.check_values()
    arch = architecture_of(model)
    options = embed.for_model(arch.max_residues if arch else 1022)
    sequences: set[str] = set()
    records = failed = 0
    existing = []
    for path in inputs:
        valid, failures = clean_records(read_fasta(path))
        records, failed = records + len(valid), failed + len(failures)
        sequences.update(seq for _, seq in valid)
        if (out := fasta_output(path, out_dir)).exists():
            existing.append(f"{out} exists (skipped unless --overwrite or other settings)")
    plan = _plan(model, options, arch, sequences, cache=cache)
    plan.isoforms, plan.existing = records, existing
    plan.notes.append(f"{len(inputs)} FASTA files: {records} records, {failed} invalid")
    return plan


async def _fetch_all(source: IsoformSource, queries: list[str]) -> list[GeneIsoforms]:
    return [gene async for gene in source.stream(queries)]


def _plan(model: ModelOptions, options: EmbedOptions, arch: Architecture | None,
          sequences: set[str], *, cache: bool) -> DryRunPlan:
    """The counts and the estimate every mode shares (every distinct sequence counted:
    what the row cache or a store would spare is not known without the weights)."""
    import torch

    device = model.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokens = [options.tokens(len(s)) for s in sequences]
    plan = DryRunPlan(model=model.model, device=device,
                      distinct_sequences=len(sequences),
                      truncated=sum(len(s) > options.cut for s in sequences),
                      tokens=sum(tokens), row_cache=ROW_CACHE_UNKNOWN if cache else "off")
    if arch is None:
        plan.estimate_note = ("no cost model for this model without loading it (published "
                              "ESM2 sizes and fair-esm checkpoints only)")
    else:
        plan.estimate = estimate(arch, tokens, span=options.cut + 2, device=device,
                                 dtype=model.dtype, engine=model.engine)
    return plan


def _existing_gene_work(config: RunConfig, queries: set[str]) -> list[str]:
    """What an existing esm_all.pt and an unfinished run hold of these genes, read without
    the weights (whether they are reused depends on them: the module docstring)."""
    from esm2_batch.run.gene_mode import partial_dir
    from esm2_batch.store.esm_file import read_esm_file
    from esm2_batch.store.partial import ISOFORMS_FILE

    found: list[str] = []
    if config.output.overwrite:
        return found
    out = config.out
    if out.exists():
        held = read_esm_file(out).gene_to_isoform_indices  # unreadable: the run's error
        found.append(f"{out} holds {len(queries & set(held))} of these genes (reused "
                     "when its settings, weights included, match)")
    log = partial_dir(out) / ISOFORMS_FILE
    if log.is_file():
        with log.open("rb") as lines:
            logged = sum(1 for line in lines if line.strip())
        found.append(f"{partial_dir(out)} (an unfinished run) has fetched {logged} genes "
                     "(resumed when its settings, weights included, match)")
    return found


def estimate_line(summary: RunSummary, model: ModelOptions, embed: EmbedOptions
                  ) -> str | None:
    """The real run's "embedding: estimated X, measured Y" line, so users learn how far to
    trust a dry run. The estimate is the dry run's model on this run's own work: its
    tokens, as sequences of their mean length (the per-sequence lengths are not kept);
    on the CPU the throughput measurement adds about a second. None when nothing was
    embedded or the model has no cost model."""
    arch = architecture_of(model)
    if arch is None or summary.embedded_now == 0 or summary.tokens == 0:
        return None
    options = embed.for_model(arch.max_residues)
    mean = max(1, round(summary.tokens / summary.embedded_now))
    guess = estimate(arch, [mean] * summary.embedded_now, span=options.cut + 2,
                     device=model.device, dtype=model.dtype, engine=model.engine)
    return (f"embedding time: estimated {format_duration(guess.seconds)}, measured "
            f"{format_duration(summary.embed_s)} ({guess.source})")
