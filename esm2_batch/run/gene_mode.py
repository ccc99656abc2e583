"""Gene list -> esm_all.pt: fetch and embed at the same time, resumable at every step.

    main thread (asyncio)                         embedding stage (run/stages.py)
    IsoformSource.stream ──► stage.submit ──► window of pending sequences
      │ each gene appended to                      │ length-sorted token-budget
      ▼ <out>.partial/isoforms.jsonl               ▼ batches (embedding.embed_rows)
                                             rows/NNNNNN.pt chunks (fp16)
    at the end: esm_all.pt assembled in input order, written to a temporary name and
    renamed; the side files (run/reports.py) beside it; the partial directory removed.

With per_tok (``--include per_tok``) every protein's residue states also go to the
residue store `<out stem>.residues/` (store/residues.py), keyed by protein id; it stays
after success and meta["residues"] names it. A sequence counts as done only when both its
row and its states are stored, so a rerun after kill -9 continues from the last finished
shard.

Resume: a rerun with the same settings skips genes already in isoforms.jsonl and
sequences already in a chunk; a rerun after success with a longer list reuses the rows
of the existing esm_all.pt when its recorded settings match, and fetches and embeds only
the new genes. Everything that can be checked before an hour of work (the gene list, the
output directory, the model, the batch budget, the settings of an earlier run) is
checked first.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from esm2_batch.embedding.budget import budget_meta, sized
from esm2_batch.embedding.options import Matrix, matrix_name
from esm2_batch.errors import EnsemblError, ModelError, StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.records import GeneIsoforms, settled_status
from esm2_batch.run.config import RunConfig
from esm2_batch.run.gene_inputs import Genes, check_budget, check_outputs, reusable_file
from esm2_batch.run.reports import RunSummary, synonym_note, write_side_files
from esm2_batch.run.stage_factory import make_stage
from esm2_batch.run.stages import EmbedStage
from esm2_batch.run.subsets import records_for, reusable_for
from esm2_batch.sources.base import IsoformSource
from esm2_batch.sources.factory import open_source
from esm2_batch.sources.gene_lists import merge_spellings
from esm2_batch.sources.isoforms_fasta import write_isoforms_fasta
from esm2_batch.store.cache import RowCache
from esm2_batch.store.esm_file import (
    MATRIX_PREFIX,
    EsmFile,
    assemble,
    write_esm_file,
)
from esm2_batch.store.keys import RowKeys, settings_scope
from esm2_batch.store.partial import GeneLog, PartialStore
from esm2_batch.store.residues import ResidueWriter
from esm2_batch.version import package_version

ROW_CACHE_ENGINE = "row-cache"
"""meta["engine"]'s name for rows taken from the shared row cache (store/cache.py)."""

__all__ = ["ROW_CACHE_ENGINE", "matrix_keys", "partial_dir", "residues_path", "run", "run_settings"]


def run(config: RunConfig, *, model: LoadedModel | None = None) -> RunSummary:
    """Do the whole job; raise an Esm2BatchError subclass on anything the user can fix.

    `model` reuses an already loaded encoder (its settings must be what config names).
    """
    gene_run = GeneRun(config, model)
    with gene_run.store:  # the partial store's lock is released on every way out
        return gene_run.execute()


def partial_dir(out: Path) -> Path:
    """Where an unfinished run keeps its work: <out>.partial/."""
    return out.with_name(out.name + ".partial")


def residues_path(out: Path) -> Path:
    """Where per_tok states go: <out stem>.residues/ (esm_all.pt -> esm_all.residues/)."""
    return out.with_name(out.stem + ".residues")


def run_settings(config: RunConfig, model: LoadedModel) -> dict[str, Any]:
    """What the rows and the fetched isoforms depend on; a resume or a reuse must match
    them exactly. `weights` is the fingerprint of the weights themselves (not their file
    name) and `compute_dtype` the precision the rows were computed in; the engines agree
    within float32 rounding, far below the float16 the rows are stored in, so the engine
    is recorded in meta but does not split the rows. `layer` and `pooling` are emb's;
    with several layers or poolers, `matrices` names every one in row order (absent
    otherwise, so a one-matrix run keeps the settings, and the rows, of earlier versions)."""
    matrices = config.embed.matrices(name=model.name, num_layers=model.num_layers)
    (pooling, layer) = matrices[0]
    settings: dict[str, Any] = {
        "model": model.name, "weights": model.fingerprint, "backend": model.backend,
        "compute_dtype": str(model.dtype).removeprefix("torch."),
        "embed_dim": model.embed_dim,
        "num_layers": model.num_layers, "layer": layer, "pooling": pooling,
        "truncation": config.embed.for_model(model.max_residues).cut,
        "long_seqs": config.embed.long_seqs,
        "species": config.source.species, "biotypes": sorted(config.source.biotypes)}
    if len(matrices) > 1:
        settings["matrices"] = [matrix_name(m) for m in matrices]
    return settings


def matrix_keys(config: RunConfig, model: LoadedModel) -> dict[str, Matrix]:
    """esm_all.pt's key of every matrix, in row order: "emb" for the first (the contract's
    matrix), "emb_<pooler>_layer<L>" for the others."""
    matrices = config.embed.matrices(name=model.name, num_layers=model.num_layers)
    return {("emb" if n == 0 else MATRIX_PREFIX + matrix_name(m)): m
            for n, m in enumerate(matrices)}


class GeneRun:
    """One run's state, so its steps share it instead of passing it along."""

    def __init__(self, config: RunConfig, model: LoadedModel | None) -> None:
        self.config = config
        self.started = time.perf_counter()
        config.embed.check_values()
        self.source = open_source(config.source)
        self.genes = Genes.read(config, self.source)
        check_outputs(config, self.genes)
        self.model = model or self._load_model()
        # an unset --truncation is the model's own context (1,022 ESM2, 2,046 FastESM2/ESM C)
        self.config = config = replace(
            config, embed=sized(config.embed, self.model))  # and an "auto" budget sized
        check_budget(config, self.model)
        self.settings = run_settings(config, self.model)
        self.matrices = matrix_keys(config, self.model)
        self.keys = RowKeys(settings_scope(self.settings))
        # --isoforms_set is not a setting: canonical rows are a subset of all's (subsets.py)
        subset = config.source.isoforms_set
        self.reused = reusable_for(reusable_file(config, self.settings), subset)
        self.store = PartialStore(partial_dir(config.out), self.settings,
                                  overwrite=config.output.overwrite)
        try:
            self.residues = self._residue_writer()
        except BaseException:
            self.store.close()
            raise
        self.records = records_for(self.store.cached_genes(), subset)
        self.resumable = self._resumable()  # before the stage: what it will not embed again
        self.summary = RunSummary(out=config.out, genes_in=len(self.genes.genes.genes),
                                  duplicates=list(self.genes.genes.duplicates),
                                  notes=self._notes())

    def _residue_writer(self) -> ResidueWriter | None:
        """The per_tok store (other settings: one StoreError line, before any work). An
        esm_all.pt whose rows are reused must have its proteins' states there already."""
        if not self.config.embed.per_tok:
            return None
        model, out = self.model, self.config.out
        writer = ResidueWriter(
            residues_path(out), self.settings, dim=model.embed_dim,
            layers=self.config.embed.layer_indices(name=model.name,
                                                   num_layers=model.num_layers),
            overwrite=self.config.output.overwrite)
        if self.reused is not None:
            reused = self.reused
            wanted = {reused.protein_ids[i] for q in self.genes.genes.genes
                      for i in reused.rows_of(q)}
            missing = wanted - writer.proteins
            if missing:
                raise StoreError(f"{out}: its rows would be reused, but {writer.directory} "
                                 f"lacks the residue states of {len(missing)} of its "
                                 "proteins (made without per_tok?); pass --overwrite to "
                                 "embed every gene again")
        return writer

    def _load_model(self) -> LoadedModel:
        """The model; when it cannot be loaded and the isoform source cannot be reached
        either, one error names both, so the user does not learn of the second only after
        fixing the first."""
        try:
            return self.config.model.load()
        except ModelError as exc:
            unreachable = self.source.unreachable()
            if unreachable is None:
                raise
            raise ModelError(f"{exc}; and Ensembl cannot be used either: {unreachable}. "
                             "Offline? --model_path FILE and --isoforms FILE (or "
                             "--ensembl_files DIR) need no network") from None

    def _notes(self) -> list[str]:
        notes = [self.genes.h5ad.describe()] if self.genes.h5ad is not None else []
        described = self.source.describe()
        return [*notes, described] if described else notes

    def execute(self) -> RunSummary:
        cache = self.config.stage.open_cache()
        try:
            return self._execute(cache)
        finally:
            if cache is not None:
                cache.close()

    def _execute(self, cache: RowCache | None) -> RunSummary:
        stage = make_stage(self.model, self.store, self.config.embed, self.config.stage,
                           keys=self.keys, model_source=self.config.model.model,
                           device=self.config.model.device, residues=self.residues,
                           cache=cache.view(self.model, self.config.embed) if cache else None)
        stage.start()
        try:
            for query in self.genes.genes.genes:
                if query in self.records:
                    stage.submit(_named(self.records[query]))
            fetch_start = time.perf_counter()
            self._fetch(stage)
            self.summary.fetch_s = time.perf_counter() - fetch_start
            stage.finish()
            if stage.embedded:
                self.store.record_provenance(engines=[self.model.engine])
            if stage.cached:  # rows an earlier run computed, same weights and settings
                self.store.record_provenance(engines=[ROW_CACHE_ENGINE])
        finally:
            stage.stop()
            if self.residues is not None:  # finished proteins' states survive an error
                self.residues.close()
        self._finish(stage)
        self.summary.wall_s = time.perf_counter() - self.started
        return self.summary

    def _resumable(self) -> set[str]:
        """Keys whose rows an unfinished earlier attempt stored (with per_tok, only those
        whose states are stored too): the stage embeds none of them again, and the summary
        counts them as resumed."""
        keys = self.store.embedded_keys()
        return keys & self.residues.stored_keys() if self.residues is not None else keys

    # -- fetching ----------------------------------------------------------------------------
    def _todo(self) -> list[str]:
        """Genes to fetch: those neither cached nor in a reusable esm_all.pt, and every
        incomplete one (a rerun retries what Ensembl did not return last time)."""
        reused = self.reused.gene_to_isoform_indices if self.reused is not None else {}
        old_status = self.reused.meta.get("status", {}) if self.reused is not None else {}

        def known(query: str) -> bool:
            if query in self.records:
                return self.records[query].status != "incomplete"
            key = self._reused_alias(query) or query  # braf, merged into BRAF last time
            return key in reused and old_status.get(key) != "incomplete"

        return [q for q in self.genes.genes.genes if not known(q)]

    def _fetch(self, stage: EmbedStage) -> None:
        """Stream the isoforms of the genes not yet known, caching and queueing each."""
        todo = self._todo()
        if not todo:
            return
        bar = tqdm(total=len(todo), desc="genes fetched", unit="gene",
                   disable=None if self.config.stage.progress else True)

        first = True
        # REST: each gene fsynced as it comes; local files: in batches (see GeneLog)
        gene_log = GeneLog(self.store, batch=256 if self.config.source.offline else 1)

        def accept(gene: GeneIsoforms) -> None:
            nonlocal first
            if first:  # the source knows its release by its first gene: keep it for a resume
                self.store.record_provenance(**self.source.provenance())
                first = False
            gene_log.add(gene)
            self.records[gene.query] = gene
            bar.update(1)
            stage.submit(_named(gene))

        try:
            asyncio.run(_stream(self.source, todo, stage, accept))
        finally:
            try:
                gene_log.flush()  # on an error too: every gene received is kept
            finally:
                bar.close()

    # -- finishing ---------------------------------------------------------------------------
    def _finish(self, stage: EmbedStage) -> None:
        """Assemble and write esm_all.pt and the side files, then drop the partial store."""
        config = self.config
        genes, aliases = merge_spellings(self.genes.genes.genes, self._gene_id)
        self.summary.aliases = aliases
        failed = set(stage.failed)
        resolved = {q: _without(self.records[q], failed, self.keys)
                    for q in self.genes.genes.genes if q in self.records}
        chosen = {q: resolved[q] for q in genes if q in resolved}
        if self.residues is not None:  # every protein id of a stored sequence
            self.residues.link({iso.protein_id: self.keys.of(iso.sequence)
                                for gene in resolved.values() for iso in gene.isoforms})
            self.residues.close()
        self.summary.count(genes, chosen, self.reused, stage, keys=self.keys,
                           resumable=self.resumable)
        self._refuse_if_nothing_found(genes)
        if note := synonym_note(chosen.values()):  # SEPT5 -> SEPTIN5, ...
            self.summary.notes.append(note)
        data = assemble(genes, chosen, self.store.row_chunks(), keys=self.keys,
                        dim=self.model.embed_dim,
                        meta=self._meta(genes, chosen, aliases, stage.budgets),
                        reused=self.reused, matrices=list(self.matrices))
        written = write_esm_file(config.out, data)
        self.summary.count_file(written, chosen)
        write_side_files(config.out, chosen, self.summary, stage.failed, written,
                         species=config.source.species)
        if config.output.save_isoforms is not None:  # every spelling, so --isoforms merges too
            write_isoforms_fasta(config.output.save_isoforms, resolved.values())
        self._write_h5ad(written)
        self.store.remove()
        if config.output.strict:  # only now: the rows that did come are on disk
            self.summary.raise_if_incomplete()

    def _refuse_if_nothing_found(self, genes: list[str]) -> None:
        """Not one gene found: the wrong input (a column of cluster labels, another
        species' symbols) rather than a result. Exit 3 with nothing written: an empty
        esm_all.pt would record the wrong --species in its settings and refuse the
        corrected rerun, and the partial store holds nothing worth resuming."""
        missing = self.summary.not_found
        if not genes or len(missing) < len(genes):
            return
        self.store.remove()
        raise EnsemblError(
            f"none of the {len(genes)} genes was found (species "
            f"{self.config.source.species}): almost surely the wrong input or species; "
            "give gene symbols or Ensembl gene IDs of --species (e.g. --species "
            "mus_musculus for mouse); nothing written", queries=missing)

    def _write_h5ad(self, written: EsmFile) -> None:
        target, h5ad = self.config.output.write_h5ad, self.genes.h5ad
        if target is None or h5ad is None:
            return
        from esm2_batch.outputs.h5ad import write_h5ad

        result = write_h5ad(h5ad.path, target, written, esm_path=self.config.out,
                            gene_pooling=self.config.output.gene_pooling,
                            id_column=h5ad.id_column, queries_for_vars=h5ad.var_queries)
        self.summary.notes.append(result.describe())

    def _gene_id(self, query: str) -> str | None:
        """The Ensembl gene a query resolved to (this run's record, else the reused file's)."""
        if query in self.records:
            return self.records[query].gene_id
        old = self.reused.meta.get("gene_ids", {}) if self.reused is not None else {}
        found = old.get(self._reused_alias(query) or query)
        return found if isinstance(found, str) else None

    def _reused_alias(self, query: str) -> str | None:
        """The reused file's gene that `query` was merged into (another spelling of it),
        when this list names that gene first: `query` is then that gene, neither fetched
        nor embedded again."""
        genes = self.genes.genes.genes
        key = self.reused.meta.get("aliases", {}).get(query) if self.reused else None
        if not isinstance(key, str) or key not in genes or query in self.records:
            return None
        return key if genes.index(key) < genes.index(query) else None

    def _engines(self) -> str:
        """The engines that computed the file's rows: this run's and earlier attempts'
        (provenance.json), and the reused file's when its rows are kept."""
        engines = list(self.store.provenance().get("engines", []))
        if self.reused is not None and self.summary.reused_rows:
            engines.append(str(self.reused.meta.get("engine", "unknown")))
        return "+".join(sorted(set(engines))) or self.model.engine

    def _meta(self, genes: list[str], chosen: dict[str, GeneIsoforms],
              aliases: dict[str, str], budgets: dict[str, int]) -> dict[str, Any]:
        old = self.reused.meta if self.reused is not None else {}

        def per_gene(key: str, value: Callable[[GeneIsoforms], Any], default: Any
                     ) -> dict[str, Any]:
            earlier = old.get(key, {})
            found = {q: (value(chosen[q]) if q in chosen else earlier.get(q, default))
                     for q in genes}
            return {q: v for q, v in found.items() if v is not None}

        symbols = per_gene("symbols", lambda g: g.symbol, None)
        if self.genes.h5ad is not None:
            symbols.update(self.genes.h5ad.symbol_map())
        model = self.model
        status = per_gene("status", lambda g: g.status, "ok")
        return {
            **self.settings, "settings": self.settings, "dtype": "float16",
            "isoforms_set": self.config.source.isoforms_set,
            "compute_dtype": str(model.dtype).removeprefix("torch."), "engine": self._engines(),
            "budget": budget_meta(model, self.config.embed, budgets),
            "aliases": aliases,
            "status": status,
            "incomplete": sum(s == "incomplete" for s in status.values()),
            "missing_protein_ids": per_gene(
                "missing_protein_ids", lambda g: list(g.missing_protein_ids) or None, None),
            "canonical_missing": per_gene(  # query -> the canonical ENSP that is missing
                "canonical_missing",
                lambda g: g.canonical_protein_id if g.canonical_missing else None, None),
            "gene_ids": per_gene("gene_ids", lambda g: g.gene_id, None),
            "synonyms": per_gene(  # query -> current symbol, for queries found by synonym
                "synonyms", lambda g: g.symbol if g.matched_by == "synonym" else None, None),
            "symbols": symbols, **self._source_meta(old), "versions": _versions(),
            "protein_lengths": {  # ENSP -> residues, for inspect and report (truncated?)
                **old.get("protein_lengths", {}),
                **{i.protein_id: len(i.sequence) for g in chosen.values() for i in g.isoforms}},
            "matrices": {key: {"pooler": pooler, "layer": layer}  # every matrix, emb first
                         for key, (pooler, layer) in self.matrices.items()},
            **self._residues_meta(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def _residues_meta(self) -> dict[str, Any]:
        """meta["residues"]: the per_tok store's directory (relative to the file's) and
        layers; absent without per_tok."""
        if self.residues is None:
            return {}
        return {"residues": {"path": self.residues.directory.name,
                             "layers": list(self.residues.layers)}}

    def _source_meta(self, old: dict[str, Any]) -> dict[str, Any]:
        """Where the isoforms came from (REST URL and release, FTP files or a FASTA)."""
        meta: dict[str, Any] = {"ensembl_release": old.get("ensembl_release")}
        recorded = self.store.provenance()
        meta.update({k: v for k, v in recorded.items() if k != "engines"})
        meta.update(self.source.provenance())
        if self.genes.h5ad is not None:
            meta["id_column"] = self.genes.h5ad.id_column
        return {k: v for k, v in meta.items() if v is not None}


async def _stream(source: IsoformSource, todo: list[str], stage: EmbedStage,
                  accept: Callable[[GeneIsoforms], None]) -> None:
    async for gene in source.stream(todo):
        if stage.full():  # backpressure without blocking the event loop
            await asyncio.to_thread(stage.wait_for_room)
        stage.raise_error()
        accept(gene)


def _named(gene: GeneIsoforms) -> list[tuple[str, str]]:
    return [(iso.protein_id, iso.sequence) for iso in gene.isoforms]


def _without(gene: GeneIsoforms, failed: set[str], keys: RowKeys) -> GeneIsoforms:
    """Drop isoforms whose sequence failed to embed (they are reported, not hidden): they
    join the missing ones, so the gene is "incomplete" rather than silently shorter."""
    kept = tuple(i for i in gene.isoforms if keys.of(i.sequence) not in failed)
    if len(kept) == len(gene.isoforms):
        return gene
    dropped = tuple(i.protein_id for i in gene.isoforms if i not in kept)
    missing = gene.missing_protein_ids + dropped
    return replace(gene, isoforms=kept, status=settled_status(kept, missing),
                   missing_protein_ids=missing)


def _versions() -> dict[str, str]:
    import esm

    return {"esm2_batch": package_version(), "torch": str(torch.__version__),
            "fair_esm": getattr(esm, "__version__", "unknown"),
            "python": platform.python_version()}
