"""Gene list -> esm_all.pt: fetch and embed at the same time, resumable at every step.

    main thread (asyncio)                       consumer thread
    EnsemblClient.iter_isoforms ──► bounded queue ──► window of pending sequences
      │ each gene appended to                          │ length-sorted token-budget
      ▼ <out>.partial/isoforms.jsonl                   ▼ batches (iter_embeddings)
                                                 rows/NNNNNN.pt chunks (fp16)
    at the end: esm_all.pt assembled in input order, written to a temporary name and
    renamed; the partial directory is removed.

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
import logging
import platform
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from esm2_batch import __version__
from esm2_batch.embedding.batching import MAX_RESIDUES, SPECIAL_TOKENS
from esm2_batch.embedding.embed import LongSeqs, clean_sequence, iter_embeddings
from esm2_batch.errors import InputError, StoreError
from esm2_batch.models import LoadedModel, load_model
from esm2_batch.outputs.h5ad import H5adGenes, check_h5ad_paths, read_h5ad_genes, write_h5ad
from esm2_batch.records import GeneIsoforms
from esm2_batch.run.ray_stage import RayOptions, RayStats, check_cluster, embed_on_ray
from esm2_batch.run.reports import unresolved_report_path, write_unresolved_report
from esm2_batch.sources.ensembl_files import (
    EnsemblFilesIndex,
    ensembl_cache_dir,
    find_ensembl_files,
)
from esm2_batch.sources.ensembl_rest import EnsemblClient, resolve_base_url
from esm2_batch.sources.gene_lists import GeneList, dedupe, read_gene_list
from esm2_batch.sources.isoforms_fasta import (
    atomic_write_text,
    read_fasta,
    read_isoforms_fasta,
    write_isoforms_fasta,
)
from esm2_batch.store.esm_file import (
    EsmFile,
    PartialStore,
    assemble,
    atomic_save,
    check_writable,
    describe_difference,
    read_esm_file,
    sequence_key,
    write_esm_file,
)

log = logging.getLogger("esm2_batch")


@dataclass(frozen=True)
class RunConfig:
    """Every option of a run; the CLI's flags map one to one onto these fields."""

    hvg_file: Path | None = None
    out: Path = Path("esm_all.pt")
    model: str = "650M"
    device: str | None = None
    engine: str = "fast"            # "fast" (engine.py) or "reference" (fair-esm's forward)
    backend: str = "auto"           # "fair-esm", "hf" or "esmc"; auto: from the model path
    batch_size: int | None = None
    toks_per_batch: int = 4096
    parallel_workers: int = 10
    rate_limit: float = 10.0
    species: str = "homo_sapiens"
    ensembl_url: str | None = None
    biotypes: tuple[str, ...] = ("protein_coding",)
    truncation: int = MAX_RESIDUES
    long_seqs: LongSeqs = "truncate"
    repr_layer: int = -1
    isoforms: Path | None = None
    save_isoforms: Path | None = None
    overwrite: bool = False
    progress: bool = True
    queue_genes: int = 256
    ray: str | None = None          # "local", "auto" or a cluster address
    ray_actors: int | None = None
    id_column: str | None = None    # .h5ad input: the var column holding the genes
    write_h5ad: Path | None = None  # .h5ad input: a copy with varm['X_esm2']
    gene_pooling: str = "canonical"
    ensembl_files: Path | None = None
    ensembl_release: int | None = None


@dataclass
class RunSummary:
    """What a run did, for the closing report and for callers."""

    out: Path
    genes_in: int = 0
    duplicates: list[str] = field(default_factory=list)
    resolved: int = 0
    no_protein: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    isoforms: int = 0
    distinct_sequences: int = 0
    embedded_now: int = 0
    reused_rows: int = 0
    tokens: int = 0
    failed: list[str] = field(default_factory=list)
    missing_sequences: list[str] = field(default_factory=list)
    fetch_s: float = 0.0
    embed_s: float = 0.0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.embed_s if self.embed_s > 0 else 0.0

    def lines(self) -> list[str]:
        return [
            *self.notes,
            f"genes in: {self.genes_in} ({len(self.duplicates)} duplicates dropped)",
            f"resolved: {self.resolved}, without protein: {len(self.no_protein)}, "
            f"not found: {len(self.not_found)}",
            f"isoforms: {self.isoforms}, distinct sequences: {self.distinct_sequences} "
            f"({self.embedded_now} embedded now, {self.reused_rows} rows reused)",
            f"tokens embedded: {self.tokens}, failed sequences: {len(self.failed)}",
            f"wall: fetch {self.fetch_s:.1f} s, embed {self.embed_s:.1f} s, "
            f"total {self.wall_s:.1f} s; {self.tokens_per_s:.0f} tokens/s",
            f"wrote {self.out}",
        ]


def _no_bar(progress: bool) -> bool | None:
    """tqdm's `disable`: None shows bars only on a terminal, so logs stay clean."""
    return None if progress else True


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


# -- the run ---------------------------------------------------------------------------------
def run(config: RunConfig, *, model: LoadedModel | None = None) -> RunSummary:
    """Do the whole job; raise an Esm2BatchError subclass on anything the user can fix."""
    start = time.perf_counter()
    sources = resolve_sources(config)
    genes = sources.genes
    _check_output(config.out)
    loaded = model or load_model(config.model, device=config.device,  # type: ignore[arg-type]
                                 engine=config.engine, backend=config.backend)
    _check_budget(config, loaded)
    settings = run_settings(config, loaded)
    reused = _reusable(config, settings)
    store = PartialStore(partial_dir(config.out), settings, overwrite=config.overwrite)
    summary = RunSummary(out=config.out, genes_in=len(genes.genes),
                         duplicates=list(genes.duplicates), notes=sources.notes())
    records = store.cached_genes()
    worker: Stage = (
        RayEmbedStage if config.ray else EmbedWorker)(loaded, store, config)
    worker.start()
    try:
        for query in genes.genes:
            if query in records:
                worker.submit(records[query])
        todo = [q for q in genes.genes if q not in records
                and (reused is None or q not in reused.gene_to_isoform_indices)]
        fetch_start = time.perf_counter()
        _fetch(config, todo, sources, store, worker, records)
        summary.fetch_s = time.perf_counter() - fetch_start
        worker.close()
        worker.join()
        worker.raise_error()
    finally:
        worker.stop()
    _finish(config, sources, records, store, loaded, reused, worker, summary)
    summary.wall_s = time.perf_counter() - start
    return summary


@dataclass
class Sources:
    """Where the genes and their isoforms come from, all resolved before any work."""

    genes: GeneList
    fasta: dict[str, GeneIsoforms] | None = None  # --isoforms
    files: EnsemblFilesIndex | None = None  # --ensembl_files / --ensembl_release
    h5ad: H5adGenes | None = None  # --hvg_file data.h5ad
    release: int | None = None  # the REST server's release, once it has been asked

    def notes(self) -> list[str]:
        notes = [self.h5ad.describe()] if self.h5ad is not None else []
        if self.files is not None:
            notes.append(f"isoforms from Ensembl files: {self.files.files.pep}")
        return notes


def resolve_sources(config: RunConfig) -> Sources:
    """The queries (--hvg_file list or .h5ad, else the --isoforms FASTA's genes) and the
    isoform source (FASTA, Ensembl's FTP files or REST), with their errors up front."""
    fasta = None
    if config.isoforms is not None:
        fasta = {g.query: g for g in read_isoforms_fasta(config.isoforms)}
    files = _offline_files(config)
    h5ad = None
    if config.hvg_file is not None and config.hvg_file.suffix == ".h5ad":
        h5ad = read_h5ad_genes(config.hvg_file, id_column=config.id_column)
        genes = h5ad.genes
    elif config.hvg_file is not None:
        genes = read_gene_list(config.hvg_file)
    elif fasta:
        genes = dedupe(fasta)
    else:
        raise InputError("no genes: pass --hvg_file FILE (one gene per line, or .h5ad) or "
                         "--isoforms FASTA")
    if config.write_h5ad is not None:
        if h5ad is None or config.hvg_file is None:
            raise InputError("--write_h5ad needs an .h5ad --hvg_file to copy")
        check_h5ad_paths(config.hvg_file, config.write_h5ad)
    return Sources(genes=genes, fasta=fasta, files=files, h5ad=h5ad)


def _offline_files(config: RunConfig) -> EnsemblFilesIndex | None:
    if config.ensembl_files is None and config.ensembl_release is None:
        return None
    assert config.ensembl_release is not None or config.ensembl_files is not None
    directory = config.ensembl_files or ensembl_cache_dir(config.ensembl_release or 0)
    found = find_ensembl_files(directory, config.species, config.ensembl_release)
    return EnsemblFilesIndex.load(found)


def _check_output(out: Path) -> None:
    """Fail now, not after the run, if the output cannot be written."""
    check_writable(out, flag="--out", example="esm_all.pt")


def _check_budget(config: RunConfig, model: LoadedModel) -> None:
    if config.truncation > model.max_residues:
        raise InputError(f"--truncation {config.truncation} exceeds {model.name}'s context "
                         f"of {model.max_residues} residues; lower it, or use --long_seqs "
                         "window to cover long proteins whole")
    need = min(config.truncation, model.max_residues) + SPECIAL_TOKENS
    if config.toks_per_batch < need:
        raise InputError(f"--toks_per_batch {config.toks_per_batch} cannot hold one "
                         f"sequence of {need - SPECIAL_TOKENS} residues; use at least {need} "
                         "or lower --truncation")


def run_settings(config: RunConfig, model: LoadedModel) -> dict[str, Any]:
    """What the rows and the fetched isoforms depend on; a resume must match them."""
    layer = config.repr_layer % (model.num_layers + 1)
    return {"model": model.name, "backend": model.backend, "embed_dim": model.embed_dim,
            "num_layers": model.num_layers,
            "layer": layer, "pooling": "mean", "truncation": config.truncation,
            "long_seqs": config.long_seqs, "species": config.species,
            "biotypes": sorted(config.biotypes)}


def _reusable(config: RunConfig, settings: dict[str, Any]) -> EsmFile | None:
    """An existing esm_all.pt whose rows can be reused, or None (or an error)."""
    if not config.out.exists() or config.overwrite:
        return None
    existing = read_esm_file(config.out)
    old = existing.meta.get("settings")
    if old != settings:
        diff = describe_difference(old or {}, settings) if isinstance(old, dict) else "none"
        raise StoreError(f"{config.out}: exists with other settings ({diff}); pass "
                         "--overwrite to replace it or choose another --out")
    return existing


# -- fetching --------------------------------------------------------------------------------
def _fetch(config: RunConfig, todo: list[str], sources: Sources, store: PartialStore,
           worker: Stage, records: dict[str, GeneIsoforms]) -> None:
    """Get isoforms of `todo` (FASTA, Ensembl files or REST), caching and queueing each."""
    bar = tqdm(total=len(todo), desc="genes fetched", unit="gene",
               disable=_no_bar(config.progress and bool(todo)))

    def accept(gene: GeneIsoforms) -> None:
        store.append_genes([gene])
        records[gene.query] = gene
        bar.update(1)
        worker.submit(gene)

    try:
        if sources.fasta is not None:
            for query in todo:
                accept(sources.fasta.get(query) or GeneIsoforms(query, None, None, (),
                                                                "not_found"))
        elif sources.files is not None:
            for gene in sources.files.isoforms(todo, biotypes=config.biotypes):
                accept(gene)
        elif todo:
            asyncio.run(_fetch_ensembl(config, todo, accept, worker, sources))
    finally:
        bar.close()


async def _fetch_ensembl(config: RunConfig, todo: list[str],
                         accept: Callable[[GeneIsoforms], None], worker: Stage,
                         sources: Sources) -> None:
    async with EnsemblClient(species=config.species, base_url=config.ensembl_url,
                             rate_limit=config.rate_limit,
                             parallel_workers=config.parallel_workers,
                             biotypes=config.biotypes) as client:
        sources.release = await client.release()
        async for gene in client.iter_isoforms(todo):
            if worker.full():  # backpressure without blocking the event loop
                await asyncio.to_thread(worker.wait_for_room)
            worker.raise_error()
            accept(gene)


# -- embedding -------------------------------------------------------------------------------
class PendingSequences:
    """What both embedding stages share: distinct sequences not yet embedded, the rows
    persisted through the store, and failures recorded by protein ID."""

    def __init__(self, model: LoadedModel, store: PartialStore, config: RunConfig) -> None:
        self.model, self.store, self.config = model, store, config
        self.done: set[str] = store.embedded_keys()
        self.failed: dict[str, tuple[str, str]] = {}  # key -> (protein id, error)
        self.embedded = self.tokens = 0
        self.busy_s = 0.0
        self._pending: dict[str, tuple[str, str]] = {}  # key -> (protein id, sequence)
        self._bar = tqdm(total=0, desc="residues embedded", unit="aa", unit_scale=True,
                         disable=_no_bar(config.progress))

    def _add(self, gene: GeneIsoforms) -> None:
        for iso in gene.isoforms:
            key = sequence_key(iso.sequence)
            if key in self.done or key in self._pending or key in self.failed:
                continue
            try:
                clean_sequence(iso.sequence, name=iso.protein_id)
            except InputError as exc:  # one odd sequence must not stop the run
                self.failed[key] = (iso.protein_id, str(exc))
                continue
            self._pending[key] = (iso.protein_id, iso.sequence)
            self._bar.total += self._kept(iso.sequence)
        self._bar.refresh()

    def _kept(self, sequence: str) -> int:
        full = self.config.long_seqs == "window"
        return len(sequence) if full else min(len(sequence), self.config.truncation)

    def _tokens_pending(self) -> int:
        return sum(self._kept(s) + SPECIAL_TOKENS for _, s in self._pending.values())

    def _persist(self, keys: list[str], rows: torch.Tensor) -> None:
        """Write rows as one chunk and count them (and their tokens) as done."""
        if not keys:
            return
        self.store.add_rows(list(keys), rows)
        self.done.update(keys)
        self.embedded += len(keys)

    def _embed_options(self) -> dict[str, Any]:
        return {"toks_per_batch": self.config.toks_per_batch,
                "batch_size": self.config.batch_size, "truncation": self.config.truncation,
                "long_seqs": self.config.long_seqs, "repr_layer": self.config.repr_layer}


class EmbedWorker(PendingSequences, threading.Thread):
    """The consumer: collect a window of distinct pending sequences, embed, persist.

    It embeds when the window holds `window_batches` batches' worth of tokens, or when
    the queue runs dry with at least one batch's worth waiting (the device would idle
    otherwise), or at the end. Within a window, iter_embeddings sorts by length and packs
    token-budget batches; rows are flushed to a chunk every `flush_rows` rows.
    """

    window_batches = 8
    flush_rows = 256
    _CLOSE = object()

    def __init__(self, model: LoadedModel, store: PartialStore, config: RunConfig) -> None:
        PendingSequences.__init__(self, model, store, config)
        threading.Thread.__init__(self, name="esm2-embed", daemon=True)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_genes)
        self.error: BaseException | None = None
        self._stopping = threading.Event()

    # producer side
    def submit(self, gene: GeneIsoforms) -> None:
        self.raise_error()
        while not self._stopping.is_set():
            try:
                self.queue.put(gene, timeout=0.2)
                return
            except queue.Full:
                self.raise_error()

    def full(self) -> bool:
        return self.queue.full()

    def wait_for_room(self) -> None:
        while self.queue.full() and self.is_alive() and not self._stopping.is_set():
            time.sleep(0.01)

    def close(self) -> None:
        self.submit(self._CLOSE)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Ask the thread to end and wait for it, so no torch work outlives the run."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        self._bar.close()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    # consumer side
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc

    def _loop(self) -> None:
        budget = self.config.toks_per_batch
        closed = False
        while not self._stopping.is_set():
            closed = self._drain(block=not closed and self._tokens_pending() < budget) or closed
            waiting = self._tokens_pending()
            if closed or waiting >= budget * self.window_batches or (
                    waiting >= budget and self.queue.empty()):
                self._embed_pending()
            if closed and not self._pending:
                return

    def _drain(self, *, block: bool) -> bool:
        """Move queued genes' new sequences into the window; True once closed."""
        try:
            item = self.queue.get(timeout=0.1) if block else self.queue.get_nowait()
        except queue.Empty:
            return False
        while True:
            if item is self._CLOSE:
                return True
            self._add(item)
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return False

    def _embed_pending(self) -> None:
        pending = list(self._pending.items())
        self._pending.clear()
        if not pending:
            return
        started = time.perf_counter()
        keys: list[str] = []
        rows: list[torch.Tensor] = []
        for result in iter_embeddings(self.model, [named for _, named in pending],
                                      **self._embed_options()):
            if self._stopping.is_set():
                break
            key, (protein_id, sequence) = pending[result.index]
            self._bar.update(self._kept(sequence))
            if result.row is None:
                self.failed[key] = (protein_id, str(result.error))
                continue
            keys.append(key)
            rows.append(result.row)
            self.tokens += self._kept(sequence) + SPECIAL_TOKENS
            if len(keys) >= self.flush_rows:
                self._flush(keys, rows)
        self._flush(keys, rows)
        self.busy_s += time.perf_counter() - started

    def _flush(self, keys: list[str], rows: list[torch.Tensor]) -> None:
        if keys:
            self._persist(keys, torch.stack(rows))
            keys.clear()
            rows.clear()


class RayEmbedStage(PendingSequences):
    """The embedding stage on Ray: genes are collected while the driver fetches, then
    the distinct pending sequences run on Ray actors and stream back into the store."""

    def __init__(self, model: LoadedModel, store: PartialStore, config: RunConfig) -> None:
        super().__init__(model, store, config)
        self.ray_stats: RayStats | None = None
        self.options = RayOptions(address=config.ray or "local", actors=config.ray_actors,
                                  device=config.device, engine=config.engine,
                                  backend=model.backend, embed_options=self._embed_options())

    def start(self) -> None:
        """Join the cluster and check its resources now, before any fetching."""
        check_cluster(self.options)

    def submit(self, gene: GeneIsoforms) -> None:
        self._add(gene)

    def full(self) -> bool:
        return False

    def wait_for_room(self) -> None:
        """Never full: sequences wait in memory until close()."""

    def raise_error(self) -> None:
        """Errors surface from close() directly."""

    def join(self) -> None:
        """close() runs synchronously."""

    def stop(self) -> None:
        self._bar.close()

    def close(self) -> None:
        items = [(key, pid, seq) for key, (pid, seq) in self._pending.items()]
        self._pending.clear()
        model = _portable_model(self.config.model)
        lengths = {key: self._kept(seq) for key, _, seq in items}

        def on_rows(keys: list[str], rows: torch.Tensor) -> None:
            self._persist(keys, rows)
            self.tokens += sum(lengths[k] + SPECIAL_TOKENS for k in keys)
            self._bar.update(sum(lengths[k] for k in keys))

        def on_failure(key: str, name: str, error: str) -> None:
            self.failed[key] = (name, error)

        self.ray_stats = embed_on_ray(items, model=model, options=self.options, on_rows=on_rows,
                                      on_failure=on_failure)
        self.busy_s = self.ray_stats.wall_s


Stage = EmbedWorker | RayEmbedStage


def _portable_model(model: str) -> str:
    """A checkpoint path made absolute, since Ray workers may run elsewhere."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


# -- finishing -------------------------------------------------------------------------------
def _finish(config: RunConfig, sources: Sources, records: dict[str, GeneIsoforms],
            store: PartialStore, model: LoadedModel, reused: EsmFile | None,
            worker: PendingSequences, summary: RunSummary) -> None:
    """Assemble and write esm_all.pt, the side files, then drop the partial directory."""
    genes = sources.genes.genes
    failed = set(worker.failed)
    chosen = {q: _without(records[q], failed) for q in genes if q in records}
    _count(summary, genes, chosen, reused, worker)
    meta = _meta(config, store.settings, model, genes, chosen, reused, sources)
    data = assemble(genes, chosen, store.load_rows(), dim=model.embed_dim, meta=meta,
                    reused=reused)
    written = write_esm_file(config.out, data)
    summary.isoforms = len(written.protein_ids)
    _side_files(config, chosen, summary, worker, written)
    if config.write_h5ad is not None and sources.h5ad is not None:
        assert config.hvg_file is not None
        result = write_h5ad(config.hvg_file, config.write_h5ad, written,
                            gene_pooling=config.gene_pooling,
                            queries_for_vars=sources.h5ad.var_queries)
        summary.notes.append(result.describe())
    store.remove()


def _without(gene: GeneIsoforms, failed: set[str]) -> GeneIsoforms:
    """Drop isoforms whose sequence failed to embed (they are reported, not hidden)."""
    kept = tuple(i for i in gene.isoforms if sequence_key(i.sequence) not in failed)
    if len(kept) == len(gene.isoforms):
        return gene
    dropped = tuple(i.protein_id for i in gene.isoforms if i not in kept)
    status = "ok" if kept else "no_protein"
    return GeneIsoforms(gene.query, gene.gene_id, gene.symbol, kept, status,
                        gene.missing_protein_ids + dropped)


def _count(summary: RunSummary, genes: Sequence[str], chosen: dict[str, GeneIsoforms],
           reused: EsmFile | None, worker: PendingSequences) -> None:
    old_status = reused.meta.get("status", {}) if reused is not None else {}
    for query in genes:
        gene = chosen.get(query)
        status = gene.status if gene is not None else old_status.get(query, "ok")
        if gene is None and reused is not None:
            summary.reused_rows += len(reused.rows_of(query))
        if status == "ok":
            summary.resolved += 1
        elif status == "no_protein":
            summary.no_protein.append(query)
        else:
            summary.not_found.append(query)
        if gene is not None:
            summary.missing_sequences += list(gene.missing_protein_ids)
    summary.distinct_sequences = len({sequence_key(i.sequence) for g in chosen.values()
                                      for i in g.isoforms})
    summary.embedded_now = worker.embedded
    summary.tokens = worker.tokens
    summary.embed_s = worker.busy_s
    summary.failed = sorted(pid for pid, _ in worker.failed.values())


def _meta(config: RunConfig, settings: dict[str, Any], model: LoadedModel,
          genes: Sequence[str], chosen: dict[str, GeneIsoforms], reused: EsmFile | None,
          sources: Sources) -> dict[str, Any]:
    old = reused.meta if reused is not None else {}

    def per_gene(key: str, value: Callable[[GeneIsoforms], Any], default: Any) -> dict:
        earlier = old.get(key, {})
        found = {q: (value(chosen[q]) if q in chosen else earlier.get(q, default))
                 for q in genes}
        return {q: v for q, v in found.items() if v is not None}

    symbols = per_gene("symbols", lambda g: g.symbol, None)
    if sources.h5ad is not None:
        symbols.update(sources.h5ad.symbol_map())
    import esm

    return {
        **settings, "settings": settings, "dtype": "float16",
        "compute_dtype": str(model.dtype).removeprefix("torch."), "engine": model.engine,
        "status": per_gene("status", lambda g: g.status, "ok"),
        "gene_ids": per_gene("gene_ids", lambda g: g.gene_id, None),
        "symbols": symbols, **_source_meta(config, sources, old),
        "versions": {"esm2_batch": __version__, "torch": str(torch.__version__),
                     "fair_esm": getattr(esm, "__version__", "unknown"),
                     "python": platform.python_version()},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _source_meta(config: RunConfig, sources: Sources, old: dict[str, Any]) -> dict[str, Any]:
    """Where the isoforms came from: REST URL, FTP files (with release) or a FASTA."""
    meta: dict[str, Any] = {"ensembl_release": old.get("ensembl_release"),
                            "ensembl_url": None}
    if sources.fasta is not None:
        meta["isoform_source"] = f"fasta:{config.isoforms}"
    elif sources.files is not None:
        meta["isoform_source"] = f"ensembl-files:{sources.files.files.pep.parent}"
        meta["ensembl_release"] = sources.files.files.release
    else:
        meta["isoform_source"] = "ensembl-rest"
        meta["ensembl_url"] = resolve_base_url(config.ensembl_url)
        meta["ensembl_release"] = sources.release or meta["ensembl_release"]
    if sources.h5ad is not None:
        meta["id_column"] = sources.h5ad.id_column
    return {k: v for k, v in meta.items() if v is not None}


def _side_files(config: RunConfig, chosen: dict[str, GeneIsoforms], summary: RunSummary,
                worker: PendingSequences, written: EsmFile) -> None:
    """not_found list and the unresolved report next to the output, failures if any,
    and --save_isoforms."""
    out = config.out
    _write_list(out.with_name(out.stem + ".not_found.txt"), summary.not_found)
    status = written.meta.get("status", {})
    unresolved = [chosen.get(q) or GeneIsoforms(q, written.meta["gene_ids"].get(q), None, (),
                                                status[q])
                  for q in written.genes if status.get(q, "ok") != "ok"]
    write_unresolved_report(unresolved_report_path(out), unresolved, species=config.species)
    _write_list(out.with_name(out.stem + ".failed.tsv"),
                sorted(f"{pid}\t{error}" for pid, error in worker.failed.values()))
    if config.save_isoforms is not None:
        write_isoforms_fasta(config.save_isoforms, chosen.values())


def _write_list(path: Path, lines: Iterable[str]) -> None:
    lines = list(lines)
    if lines:
        atomic_write_text(path, "\n".join(lines) + "\n")
    else:
        path.unlink(missing_ok=True)


# -- FASTA mode ------------------------------------------------------------------------------
FAILURE_LOG = "extraction_failures.log"


@dataclass
class FastaResult:
    """One input file of FASTA mode: where its rows went and what failed."""

    source: Path
    out: Path
    proteins: int = 0
    failed: int = 0
    skipped: bool = False


def fasta_output(source: Path, out_dir: Path | None) -> Path:
    """IN.fa -> <out_dir or IN's directory>/IN_ESM.pt (seed 002's naming)."""
    name = source.name.removesuffix(".gz")
    for suffix in (".fasta", ".fa", ".faa", ".fas", ".pep"):
        name = name.removesuffix(suffix)
    return (out_dir or source.parent) / f"{name}_ESM.pt"


def run_fasta(inputs: Sequence[Path], *, model: LoadedModel, out_dir: Path | None = None,
              toks_per_batch: int = 4096, batch_size: int | None = None,
              truncation: int = MAX_RESIDUES, long_seqs: LongSeqs = "truncate",
              repr_layer: int = -1, overwrite: bool = False,
              progress: bool = True, ray: RayOptions | None = None,
              model_source: str | None = None) -> list[FastaResult]:
    """Embed each FASTA file into {'proteins': [labels], 'data': [float32 1-D tensors]}.

    Labels are the first word of each header, in file order. Inputs whose output exists
    are skipped (rerun to resume a batch of files); sequences or files that fail are
    logged to extraction_failures.log (timestamp | file | id | error) and the rest go on.
    With `ray`, each file's sequences run on Ray actors loading `model_source`.
    """
    if out_dir is not None and not out_dir.is_dir():
        raise InputError(f"{out_dir}: no such output directory; create it first")
    options = {"toks_per_batch": toks_per_batch, "batch_size": batch_size,
               "truncation": truncation, "long_seqs": long_seqs, "repr_layer": repr_layer}
    if ray is not None:
        ray = replace(ray, embed_options=options)
        check_cluster(ray)
    embed = _fasta_embedder(model, options, ray, _portable_model(model_source or model.name))
    results = []
    for source in tqdm(inputs, desc="FASTA files", unit="file", disable=_no_bar(progress)):
        result = FastaResult(source, fasta_output(source, out_dir))
        if result.out.exists() and not overwrite:
            result.skipped = True
            log.info("%s: exists, skipping %s", result.out, source)
        else:
            _embed_fasta_file(result, embed)
        results.append(result)
    return results


FastaEmbed = Callable[[list[tuple[str, str]]], tuple[dict[int, torch.Tensor],
                                                      list[tuple[str, str]]]]


def _fasta_embedder(model: LoadedModel, options: dict[str, Any], ray: RayOptions | None,
                    source: str) -> FastaEmbed:
    """(label, sequence) pairs -> (rows by position, failures), in process or on Ray."""

    def local(named: list[tuple[str, str]]) -> tuple[dict[int, torch.Tensor], list]:
        rows: dict[int, torch.Tensor] = {}
        failures: list[tuple[str, str]] = []
        for item in iter_embeddings(model, named, **options):
            if item.row is None:
                failures.append((item.name, str(item.error)))
            else:
                rows[item.index] = item.row
        return rows, failures

    def on_ray(named: list[tuple[str, str]]) -> tuple[dict[int, torch.Tensor], list]:
        assert ray is not None
        rows: dict[int, torch.Tensor] = {}
        failures: list[tuple[str, str]] = []
        items = [(str(i), label, seq) for i, (label, seq) in enumerate(named)]
        embed_on_ray(items, model=source, options=ray,
                     on_rows=lambda keys, emb: rows.update(zip(map(int, keys), emb,
                                                               strict=True)),
                     on_failure=lambda key, name, error: failures.append((name, error)))
        return rows, failures

    return local if ray is None else on_ray


def _embed_fasta_file(result: FastaResult, embed: FastaEmbed) -> None:
    failures: list[tuple[str, str]] = []
    try:
        records = read_fasta(result.source)
    except InputError as exc:
        _log_failures(result, [("-", str(exc))])
        result.failed = 1
        return
    valid: list[tuple[str, str]] = []
    for position, (header, sequence) in enumerate(records):
        label = header.split()[0] if header.split() else f"record_{position + 1}"
        try:
            valid.append((label, clean_sequence(sequence, name=label)))
        except InputError as exc:
            failures.append((label, str(exc)))
    rows, failed = embed(valid)
    failures += failed
    ordered = [i for i in range(len(valid)) if i in rows]
    data = {"proteins": [valid[i][0] for i in ordered],
            "data": [rows[i].to(torch.float32).clone() for i in ordered]}
    atomic_save(data, result.out)
    result.proteins, result.failed = len(ordered), len(failures)
    _log_failures(result, failures)


def _log_failures(result: FastaResult, failures: list[tuple[str, str]]) -> None:
    if not failures:
        return
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    with open(result.out.parent / FAILURE_LOG, "a", encoding="utf-8") as handle:
        for label, error in failures:
            handle.write(f"{stamp} | {result.source} | {label} | {error}\n")
