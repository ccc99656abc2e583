"""FASTA files -> one <stem>_ESM.pt each: {'proteins': [labels], 'data': [float32 rows]}.

With several layers or poolers (--repr_layers, --include), 'data' holds the first
(pooler, layer) and each further one gets its own list, 'data_<pooler>_layer<L>'
(e.g. 'data_max_layer20'), in the same protein order; 'matrices' then maps every one of
these keys to {'pooler', 'layer'}.

With per_tok (``EmbedOptions.per_tok``, ``--include per_tok``) every protein's residue
states also go to `<stem>_residues/` beside `<stem>_ESM.pt` (store/residues.py), keyed by
label; the shards keep each pooled row too, so a rerun after a crash embeds only the
sequences no finished shard holds, and the pooled file is written as usual.
`per_file=DIR` (implies per_tok) then also writes one `<label>.pt` per protein of each
input's store into DIR (outputs/per_file.py), skipping files that exist.

Labels are the first word of each header, in file order. Each file's distinct sequences
go through the same embedding stage as gene mode (run/stages.py: in this process or on
Ray), into an in-memory float32 sink, so the rows are the same whichever stage ran them.
Sequences or files that fail are logged to extraction_failures.log
(timestamp | file | id | error) and the rest go on. Every output is written atomically.

Each file records what its rows depend on, 'meta' = {**settings, 'settings', 'scope' (the
digest rows are keyed by, store/keys.py), 'dtype', 'esm2_batch'}, settings being
fasta_settings (model, weights fingerprint, layers and poolers, truncation, ...).
An input whose output exists (with per_tok: and its residue store) is skipped only when
that record matches, so a rerun resumes a batch of files; an output of other settings or
weights, or one recording none (an earlier version's, another tool's), is one StoreError
line unless `overwrite`: a rerun never answers with another model's rows.

What can fail is checked before the work, not after it: check_fasta_outputs (missing
inputs, two inputs writing one file, every output directory's writability; the CLI calls
it before the model loads), then every input's existing output against the settings
(which need the loaded model's fingerprint) before any file is embedded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from esm2_batch.embedding.budget import sized
from esm2_batch.embedding.options import EmbedOptions, matrix_name
from esm2_batch.embedding.sequences import clean_sequence
from esm2_batch.errors import InputError, StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.outputs.per_file import check_per_file_dir, write_per_file
from esm2_batch.run.stage_factory import make_stage
from esm2_batch.run.stages import MemorySink, StageOptions
from esm2_batch.sources.fasta import read_fasta
from esm2_batch.store.atomic import atomic_save, check_writable
from esm2_batch.store.cache import CacheView
from esm2_batch.store.keys import RowKeys, settings_scope
from esm2_batch.store.partial import describe_difference
from esm2_batch.store.residues import (
    INDEX_FILE,
    ResidueWriter,
    check_residue_settings,
    open_residues,
)
from esm2_batch.version import package_version

__all__ = ["FAILURE_LOG", "FastaResult", "check_fasta_outputs", "clean_records",
           "fasta_output", "fasta_settings", "residues_dir", "run_fasta"]

log = logging.getLogger("esm2_batch")

FAILURE_LOG = "extraction_failures.log"


@dataclass
class FastaResult:
    """One input file of FASTA mode: where its rows went and what failed."""

    source: Path
    out: Path
    proteins: int = 0
    failed: int = 0
    skipped: bool = False
    per_file_written: int = 0
    cached: int = 0  # rows taken from the shared row cache, not embedded
    per_file_skipped: int = 0


def fasta_output(source: Path, out_dir: Path | None) -> Path:
    """IN.fa -> <out_dir or IN's directory>/IN_ESM.pt."""
    name = source.name.removesuffix(".gz")
    for suffix in (".fasta", ".fa", ".faa", ".fas", ".pep"):
        name = name.removesuffix(suffix)
    return (out_dir or source.parent) / f"{name}_ESM.pt"


def residues_dir(out: Path) -> Path:
    """<stem>_ESM.pt -> <stem>_residues/: the per_tok store beside the pooled file."""
    return out.with_name(out.name.removesuffix("_ESM.pt") + "_residues")


def fasta_settings(model: LoadedModel, options: EmbedOptions) -> dict[str, Any]:
    """What a FASTA-mode row and residue state depend on (a residue store made with
    other settings is refused; see store/keys.py for why the weights' fingerprint)."""
    return {"model": model.name, "weights": model.fingerprint, "backend": model.backend,
            "compute_dtype": str(model.dtype).removeprefix("torch."),
            "embed_dim": model.embed_dim, "num_layers": model.num_layers,
            "matrices": [matrix_name(m) for m in options.matrices(
                name=model.name, num_layers=model.num_layers)],
            "truncation": options.cut, "long_seqs": options.long_seqs}


def check_fasta_outputs(inputs: Sequence[Path], *, out_dir: Path | None = None,
                        per_file: Path | None = None, per_file_format: str = "tensor",
                        per_tok: bool = False, overwrite: bool = False) -> list[Path]:
    """Each input's <stem>_ESM.pt, after refusing what would fail only after the work:
    a missing input or two inputs writing one output (InputError), a missing --out_dir,
    a bad --per_file, or a directory an output, its residue store or the failure log
    would be written in that is not writable (StoreError, from the one check_writable).

    Needs no model, so the CLI calls it before the model loads; run_fasta calls it too.
    Outputs that exist and will be skipped (not `overwrite`) are not written, so a
    read-only directory of finished outputs still reruns."""
    if out_dir is not None and not out_dir.is_dir():
        raise StoreError(f"{out_dir}: no such output directory; create it first")
    for source in inputs:
        if not source.is_file():
            what = "a directory, not a FASTA file" if source.is_dir() else "no such FASTA file"
            raise InputError(f"{source}: {what}")
    outputs = [fasta_output(source, out_dir) for source in inputs]
    _check_distinct(inputs, outputs)
    if per_file is not None:
        check_per_file_dir(per_file, per_file_format)
    for out in outputs:
        if not overwrite and _done(out, per_tok):
            continue
        written = [out, out.parent / FAILURE_LOG]
        if per_tok and residues_dir(out).is_dir():
            written.append(residues_dir(out) / INDEX_FILE)
        for path in written:
            if path.is_dir():
                raise StoreError(f"{path}: a directory is in the way of an output file; "
                                 "move it or choose another --out_dir")
            check_writable(path, flag="--out_dir", example=out.name)
    return outputs


def _check_distinct(inputs: Sequence[Path], outputs: list[Path]) -> None:
    """Two inputs named for one output (a.fa and a.fasta) would leave the second with the
    first one's rows; the same file given twice is harmless (embedded once)."""
    first: dict[Path, Path] = {}
    for source, out in zip(inputs, outputs, strict=True):
        earlier = first.setdefault(out.resolve(), source)
        if earlier.resolve() != source.resolve():
            raise InputError(f"{earlier} and {source} would both write {out}; rename one, "
                             "or embed them in separate runs with their own --out_dir")


def run_fasta(inputs: Sequence[Path], *, model: LoadedModel, out_dir: Path | None = None,
              overwrite: bool = False, embed: EmbedOptions | None = None,
              stage: StageOptions | None = None, model_source: str | None = None,
              device: str | None = None, per_file: Path | None = None,
              per_file_format: str = "tensor") -> list[FastaResult]:
    """Embed each FASTA file (see the module docstring); Ray actors load `model_source`
    (default: the model's name) on `device` (default: a GPU where the cluster has one).
    `per_file` (a directory; implies per_tok) also gets one `<label>.pt` per protein, in
    `per_file_format` "tensor" or "esm-extract" (outputs/per_file.py)."""
    options = sized(embed or EmbedOptions(), model)  # truncation and an "auto" budget
    if per_file is not None:
        options = dataclasses.replace(options, per_tok=True)
    outputs = check_fasta_outputs(inputs, out_dir=out_dir, per_file=per_file,
                                  per_file_format=per_file_format, per_tok=options.per_tok,
                                  overwrite=overwrite)
    options.check(name=model.name, num_layers=model.num_layers,
                  max_residues=model.max_residues)
    stage = stage or StageOptions()
    settings = fasta_settings(model, options)
    if not overwrite:  # other settings anywhere: refused before any file is embedded
        for out in outputs:
            if out.exists():
                _check_recorded(out, settings)
            if options.per_tok and not _done(out, options.per_tok):
                check_residue_settings(residues_dir(out), settings)
    cache = stage.open_cache()
    job = _FastaJob(model, options, stage, model_source or model.name, device, settings,
                    RowKeys(settings_scope(settings)), overwrite,
                    cache.view(model, options) if cache is not None else None)
    try:
        return _run_files(job, inputs, outputs, per_file, per_file_format)
    finally:
        if cache is not None:
            cache.close()


def _check_recorded(out: Path, settings: dict[str, Any]) -> None:
    """Refuse an existing output that does not record these settings (one line)."""
    old = _recorded_settings(out)
    if old is None:
        raise StoreError(f"{out}: exists with unknown settings (it records no model or "
                         "settings: an earlier esm2-batch, another tool, or unreadable); "
                         "pass --overwrite to replace it or choose another --out_dir")
    if settings_scope(old) != settings_scope(settings):
        raise StoreError(f"{out}: exists with other settings "
                         f"({describe_difference(old, settings)}); pass --overwrite to "
                         "replace it or choose another --out_dir")


def _recorded_settings(out: Path) -> dict[str, Any] | None:
    """meta['settings'] of an existing output, or None where it has none or cannot be
    read (memory-mapped where the file allows: the rows themselves are not read)."""
    for mmap in (True, False):
        try:
            data = torch.load(out, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            continue
    else:
        return None
    meta = data.get("meta") if isinstance(data, dict) else None
    settings = meta.get("settings") if isinstance(meta, dict) else None
    return settings if isinstance(settings, dict) else None


def _run_files(job: _FastaJob, inputs: Sequence[Path], outputs: list[Path],
               per_file: Path | None, per_file_format: str) -> list[FastaResult]:
    """Each input in turn: skipped when done, else embedded; then its per-file outputs."""
    options, overwrite = job.options, job.overwrite
    results = []
    for source, out in tqdm(list(zip(inputs, outputs, strict=True)), desc="FASTA files",
                            unit="file", disable=None if job.stage.progress else True):
        result = FastaResult(source, out)
        if _done(result.out, options.per_tok) and not overwrite:
            result.skipped = True
            log.info("%s: exists, skipping %s", result.out, source)
        else:
            job.embed_file(result)
        store = residues_dir(result.out)
        if per_file is not None and (store / INDEX_FILE).is_file():
            written = write_per_file(open_residues(store), per_file, per_file_format,
                                     overwrite=overwrite)
            result.per_file_written, result.per_file_skipped = (written.written,
                                                                written.skipped)
        results.append(result)
    return results


def _done(out: Path, per_tok: bool) -> bool:
    """Whether an input's outputs exist: its _ESM.pt, and with per_tok its residue store
    (a file embedded earlier without per_tok is embedded again, to fill the store)."""
    if not out.exists():
        return False
    return not per_tok or (residues_dir(out) / INDEX_FILE).is_file()


@dataclass(frozen=True)
class _FastaJob:
    """What every file of one FASTA-mode call shares."""

    model: LoadedModel
    options: EmbedOptions
    stage: StageOptions
    model_source: str
    device: str | None
    settings: dict[str, Any]
    keys: RowKeys
    overwrite: bool
    cache: CacheView | None = None  # the shared row cache (store/cache.py)

    def embed_file(self, result: FastaResult) -> None:
        try:
            records = read_fasta(result.source)
        except InputError as exc:
            _log_failures(result, [("-", str(exc))])
            result.failed = 1
            return
        valid, failures = clean_records(records)
        rows, failed, result.cached = self._embed(valid, residues_dir(result.out))
        failures += failed
        keys = self.keys
        kept = [(label, rows[keys.of(seq)]) for label, seq in valid if keys.of(seq) in rows]
        atomic_save(self._output([label for label, _ in kept], [row for _, row in kept]),
                    result.out)
        result.proteins, result.failed = len(kept), len(failures)
        _log_failures(result, failures)

    def _output(self, labels: list[str], packed: list[torch.Tensor]) -> dict[str, Any]:
        """The file's dict: 'data' the first matrix, 'data_<pooler>_layer<L>' the others
        (rows arrive side by side, run/stages.py), 'matrices' naming each when several,
        'meta' what the rows depend on (a rerun reuses the file only when it matches)."""
        model = self.model
        matrices = self.options.matrices(name=model.name, num_layers=model.num_layers)
        keys = ["data", *(f"data_{matrix_name(m)}" for m in matrices[1:])]
        data: dict[str, Any] = {"proteins": labels}
        for n, key in enumerate(keys):
            part = slice(n * model.embed_dim, (n + 1) * model.embed_dim)
            data[key] = [row[part].to(torch.float32).clone() for row in packed]
        if len(matrices) > 1:
            data["matrices"] = {key: {"pooler": pooler, "layer": layer}
                                for key, (pooler, layer) in zip(keys, matrices, strict=True)}
        data["meta"] = {**self.settings, "settings": self.settings, "scope": self.keys.scope,
                        "dtype": "float32", "esm2_batch": package_version()}
        return data

    def _embed(self, valid: list[tuple[str, str]], residues: Path
               ) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]], int]:
        """Rows by sequence key (float32), (label, error) of what failed and how many
        rows the row cache gave; with per_tok the residue store at `residues` is filled
        (and its kept rows reused) as well."""
        writer = self._residue_writer(residues)
        sink = MemorySink(writer.stored_rows() if writer is not None else {})
        stage = make_stage(self.model, sink, self.options, self.stage, keys=self.keys,
                           model_source=self.model_source, device=self.device,
                           residues=writer, cache=self.cache)
        try:
            stage.start()
            try:
                stage.submit(valid)
                stage.finish()
            finally:
                stage.stop()
            if writer is not None:
                writer.link({label: self.keys.of(seq) for label, seq in valid})
        finally:
            if writer is not None:  # on errors too: finished shards stay for a rerun
                writer.close()
        return (sink.rows, [(name, error) for name, error in stage.failed.values()],
                stage.cached)

    def _residue_writer(self, directory: Path) -> ResidueWriter | None:
        if not self.options.per_tok:
            return None
        layers = self.options.layer_indices(name=self.model.name,
                                            num_layers=self.model.num_layers)
        return ResidueWriter(directory, self.settings, layers=layers,
                             dim=self.model.embed_dim, overwrite=self.overwrite,
                             keep_rows=True)


def clean_records(records: list[tuple[str, str]]) -> tuple[list[tuple[str, str]],
                                                     list[tuple[str, str]]]:
    """(label, cleaned sequence) pairs, and (label, error) of the records that fail."""
    valid: list[tuple[str, str]] = []
    failures: list[tuple[str, str]] = []
    for position, (header, sequence) in enumerate(records):
        label = header.split()[0] if header.split() else f"record_{position + 1}"
        try:
            valid.append((label, clean_sequence(sequence, name=label)))
        except InputError as exc:
            failures.append((label, str(exc)))
    return valid, failures


def _log_failures(result: FastaResult, failures: list[tuple[str, str]]) -> None:
    """Append to the output directory's failure log (an append-only log, not a result)."""
    if not failures:
        return
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    with open(result.out.parent / FAILURE_LOG, "a", encoding="utf-8") as handle:
        for label, error in failures:
            handle.write(f"{stamp} | {result.source} | {label} | {error}\n")
