"""`esm2-batch inspect FILE`: what a file the project wrote holds, in a few lines or JSON.

A single-cell modeller about to train on esm_all.pt wants to know, before training, what
made it: which model and weights, which settings, how many of the genes made it and why
the others did not, how many proteins were cut. All of that is in the file's meta; this
module reads it without torch (store/peek.py: a torch.save zip unpickled with only the
globals a file of plain tensors uses, so a pickle that would run code is refused, never
run) and without loading any model, so it answers in a second for any file size.

Kinds recognised (by content, not by name): esm_all.pt (gene mode), <stem>_ESM.pt (FASTA
mode), a per_tok residue store (its directory or index.json), and the exports: SATURN
{symbol: vector} .pt, per-protein <label>.pt, .npz, .parquet, .h5 and an .h5ad copy
written with --write_h5ad. Anything else, a truncated file or a pickle with code is an
InputError (exit 2) in one line.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esm2_batch.errors import InputError
from esm2_batch.outputs.inspect_other import inspect_other
from esm2_batch.store.peek import (
    ForeignFile,
    PeekedFile,
    TensorInfo,
    as_mapping,
    peek_torch_file,
)

__all__ = ["inspect_file", "summary_lines"]

Report = dict[str, Any]


def inspect_file(path: str | Path, *, distinct: bool = True) -> Report:
    """A JSON-able description of `path` (see the module docstring). `distinct` hashes
    esm_all.pt's rows to count distinct sequences (identical sequences give bit-identical
    rows: they are embedded once); it reads the matrix's bytes, never decodes them."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; pass a file esm2-batch wrote "
                         "(esm_all.pt, *_ESM.pt, a residue store, an export)")
    other = inspect_other(path)
    if other is not None:
        return other
    try:
        peeked = peek_torch_file(path)
    except ForeignFile as exc:
        raise InputError(f"{path}: not a file esm2-batch wrote: {exc}") from None
    root = peeked.root
    if isinstance(root, dict) and {"emb", "genes", "gene_to_isoform_indices"} <= set(root):
        return _esm_all(peeked, distinct=distinct)
    if isinstance(root, dict) and {"proteins", "data"} <= set(root):
        return _fasta_file(path, root)
    if isinstance(root, TensorInfo | dict):
        found = _tensor_file(path, root)
        if found is not None:
            return found
    raise InputError(f"{path}: a torch file, but not one esm2-batch wrote (no emb / genes, "
                     "proteins / data, or vectors); pass esm_all.pt, *_ESM.pt or an export")


def _matrix(info: TensorInfo) -> dict[str, Any]:
    return {"shape": list(info.shape), "dtype": info.dtype}


def _esm_all(peeked: PeekedFile, *, distinct: bool) -> Report:
    root = peeked.root
    meta = root.get("meta") if isinstance(root.get("meta"), dict) else {}
    emb = root["emb"]
    if not isinstance(emb, TensorInfo):
        raise InputError(f"{peeked.path}: its 'emb' is not a tensor; the file is damaged")
    matrices = {k: _matrix(v) for k, v in root.items()
                if isinstance(v, TensorInfo) and (k == "emb" or k.startswith("emb_"))}
    index: Mapping[str, list[int]] = root["gene_to_isoform_indices"]
    report: Report = {"kind": "esm_all", "path": str(peeked.path),
                      "description": "gene-mode embeddings (esm_all.pt)",
                      "provenance": _provenance(meta), "genes": _gene_counts(root, meta),
                      "matrices": matrices}
    rows = emb.shape[0]
    isoforms: Report = {"rows": rows, "isoforms_per_gene": _isoform_spread(index)}
    if distinct:
        isoforms["distinct_sequences"] = _distinct_rows(peeked, emb)
    isoforms.update(_lengths(meta, root.get("protein_ids", [])))
    report["isoforms"] = isoforms
    return report


_PROVENANCE_KEYS = ("model", "weights", "backend", "engine", "compute_dtype", "dtype",
                    "layer", "pooling", "truncation", "long_seqs", "species", "biotypes",
                    "isoform_source", "ensembl_url", "ensembl_release", "created")


def _provenance(meta: Mapping[str, Any]) -> Report:
    found: Report = {k: meta[k] for k in _PROVENANCE_KEYS if meta.get(k) is not None}
    versions = meta.get("versions")
    if isinstance(versions, Mapping):
        found["versions"] = dict(versions)
    return found


def _gene_counts(root: Mapping[str, Any], meta: Mapping[str, Any]) -> Report:
    """Genes in, and where each went: the statuses the run recorded (gene mode)."""
    genes = list(root.get("genes", []))
    status = as_mapping(meta.get("status"))
    index = root["gene_to_isoform_indices"]
    counts = Counter(str(status.get(g, "ok" if index.get(g) else "no_protein"))
                     for g in genes)
    not_found = sorted(g for g in genes if status.get(g) == "not_found")
    return {
        "in": len(genes),
        "resolved": len(genes) - counts["not_found"],
        "with_rows": sum(1 for g in genes if index.get(g)),
        "incomplete": counts["incomplete"], "without_protein": counts["no_protein"],
        "not_found": counts["not_found"], "not_found_genes": not_found,
        "incomplete_genes": sorted(g for g in genes if status.get(g) == "incomplete"),
        "renamed": dict(meta.get("synonyms") or {}),
        "aliases": dict(meta.get("aliases") or {}),
        "canonical_missing": sorted(dict(meta.get("canonical_missing") or {})),
    }


def _isoform_spread(index: Mapping[str, list[int]]) -> dict[str, int]:
    """How many genes have 1, 2, ... isoforms (keys as strings, for JSON)."""
    spread = Counter(len(rows) for rows in index.values() if rows)
    return {str(n): spread[n] for n in sorted(spread)}


def _distinct_rows(peeked: PeekedFile, emb: TensorInfo) -> int | None:
    try:
        return len({hashlib.blake2b(row, digest_size=16).digest()
                    for row in peeked.read_rows(emb)})
    except ForeignFile:
        return None


def _lengths(meta: Mapping[str, Any], protein_ids: list[str]) -> Report:
    """Protein lengths and how many the truncation cut (or windows covered), when the run
    recorded lengths (meta['protein_lengths'], since 0.2)."""
    lengths = meta.get("protein_lengths")
    if not isinstance(lengths, Mapping) or not lengths:
        return {"lengths": None}
    cut = int(meta.get("truncation") or 0)
    values = [int(lengths[p]) for p in dict.fromkeys(protein_ids) if p in lengths]
    longer = sum(1 for n in values if cut and n > cut)
    verb = "windowed" if meta.get("long_seqs") == "window" else "truncated"
    return {"lengths": {"proteins": len(values), "min": min(values, default=0),
                        "median": sorted(values)[len(values) // 2] if values else 0,
                        "max": max(values, default=0), verb: longer}}


def _fasta_file(path: Path, root: Mapping[str, Any]) -> Report:
    data = root.get("data") or []
    first = data[0] if data and isinstance(data[0], TensorInfo) else None
    matrices = {k: {"rows": len(v), "dim": v[0].shape[-1] if v else None,
                    "dtype": v[0].dtype if v else None}
                for k, v in root.items() if k.startswith("data") and isinstance(v, list)}
    report: Report = {"kind": "fasta", "path": str(path),
                      "description": "FASTA-mode embeddings (*_ESM.pt)",
                      "proteins": len(root.get("proteins", [])), "matrices": matrices,
                      "dim": first.shape[-1] if first is not None else None}
    for key in ("settings", "meta"):
        if isinstance(root.get(key), Mapping):
            report["provenance"] = _provenance(root[key])
            break
    else:
        report["provenance"] = {"note": "no settings recorded (written before they were)"}
    return report


def _tensor_file(path: Path, root: Any) -> Report | None:
    """A per-protein <label>.pt (a tensor, or esm-extract's dict) or a SATURN export."""
    if isinstance(root, TensorInfo):
        return {"kind": "per_protein", "path": str(path), "description":
                "one protein's per-residue states (--per_file)", "matrices": {
                    "states": _matrix(root)}}
    if "representations" in root and "label" in root:
        layers = root["representations"]
        return {"kind": "per_protein", "path": str(path), "description":
                "one protein in esm-extract's layout (--per_file_format esm-extract)",
                "label": root["label"], "matrices": {
                    f"layer{k}": _matrix(v) for k, v in layers.items()
                    if isinstance(v, TensorInfo)}}
    vectors = [v for v in root.values() if isinstance(v, TensorInfo)]
    shapes = {v.shape for v in vectors}
    if vectors and len(vectors) == len(root) and len(shapes) == 1 and len(*shapes) == 1:
        return {"kind": "saturn", "path": str(path), "description":
                "one vector per gene symbol (export --format saturn)", "genes": len(vectors),
                "matrices": {"vectors": {"shape": [len(vectors), *vectors[0].shape],
                                         "dtype": vectors[0].dtype}}}
    return None


def summary_lines(report: Report) -> list[str]:
    """The terminal summary: a few lines, the same facts as the JSON."""
    lines = [f"{report['path']}: {report['description']}"]
    provenance = report.get("provenance") or {}
    if provenance:
        lines.append("  model      " + _model_line(provenance))
    if report["kind"] == "esm_all":
        lines += _esm_all_lines(report)
    for key in ("proteins", "genes"):
        if isinstance(report.get(key), int):
            lines.append(f"  {key:<10} {report[key]:,}")
    for key, value in report.items():
        if key.startswith("store_") or key in ("vars", "columns", "datasets"):
            lines.append(f"  {key.removeprefix('store_'):<10} {value}")
    matrices = report.get("matrices") or {}
    if matrices:
        shown = "; ".join(f"{k} {_shape(v)}" for k, v in matrices.items())
        lines.append(f"  matrices   {shown}")
    return lines


def _model_line(p: Mapping[str, Any]) -> str:
    if "note" in p:
        return str(p["note"])
    parts = [str(p.get("model", "unknown model"))]
    if p.get("weights"):
        parts.append(f"weights {str(p['weights'])[:12]}")
    if p.get("engine"):
        parts.append(f"{p['engine']} engine")
    if p.get("compute_dtype"):
        parts.append(f"computed in {p['compute_dtype']}")
    if p.get("layer") is not None:
        parts.append(f"layer {p['layer']} {p.get('pooling', '')}".rstrip())
    if p.get("truncation"):
        parts.append(f"truncation {p['truncation']} ({p.get('long_seqs', 'truncate')})")
    return ", ".join(parts)


def _esm_all_lines(report: Report) -> list[str]:
    p, g, iso = report["provenance"], report["genes"], report["isoforms"]
    source = p.get("isoform_source", "unknown source")
    if p.get("ensembl_release"):
        source += f", Ensembl release {p['ensembl_release']}"
    lines = [f"  isoforms   {p.get('species', '?')}, {', '.join(p.get('biotypes', []))}, "
             f"from {source}; made {p.get('created', '?')}"]
    lines.append(f"  genes      {g['in']:,} in: {g['resolved']:,} resolved ({g['with_rows']:,} "
                 f"with rows, {g['incomplete']:,} incomplete, {g['without_protein']:,} "
                 f"without protein), {g['not_found']:,} not found, {len(g['renamed']):,} "
                 f"renamed, {len(g['aliases']):,} aliases")
    distinct = iso.get("distinct_sequences")
    rows = f"  rows       {iso['rows']:,} isoforms"
    if distinct is not None:
        rows += f", {distinct:,} distinct sequences"
    lengths = iso.get("lengths")
    if lengths:
        cut = lengths.get("truncated", lengths.get("windowed", 0))
        verb = "truncated" if "truncated" in lengths else "windowed"
        rows += (f"; lengths {lengths['min']:,}-{lengths['max']:,} (median "
                 f"{lengths['median']:,}), {cut:,} {verb}")
    lines.append(rows)
    return lines


def _shape(matrix: Mapping[str, Any]) -> str:
    if "shape" in matrix:
        return f"[{', '.join(str(n) for n in matrix['shape'])}] {matrix.get('dtype', '')}"
    return f"{matrix.get('rows')} rows x {matrix.get('dim')} {matrix.get('dtype', '')}"


def as_json(report: Report) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
