"""`esm2-batch report FILE --out report.html`: one self-contained page about an esm_all.pt
(or an .h5ad written with --write_h5ad), to look at before training on it.

Sections: the run (provenance and counts, the genes that did not make it with the run's
own reason), protein lengths against the model's context, isoforms (how many per gene,
how close each is to its canonical one), nearest neighbours of known genes, and a 2-D map
of every gene vector. Plots are inline SVG (report_plots.py); the page loads nothing from
anywhere (no CDN, no fonts, no scripts but a few lines that filter the gene lists), so it
opens from a laptop's disk years later. Written atomically.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from esm2_batch.errors import InputError
from esm2_batch.outputs.inspect import inspect_file
from esm2_batch.outputs.report_data import ReportData, build_report_data
from esm2_batch.outputs.report_plots import bars, gene_map_svg, histogram
from esm2_batch.sources.gene_lists import read_gene_list
from esm2_batch.store.atomic import atomic_text, check_writable
from esm2_batch.store.esm_file import EsmFile, read_esm_file, validate
from esm2_batch.store.peek import as_mapping
from esm2_batch.version import package_version

__all__ = ["ReportResult", "write_report"]

SECTIONS = ("run", "lengths", "isoforms", "neighbours", "map")


@dataclass(frozen=True)
class ReportResult:
    out: Path
    bytes: int
    genes: int
    map_points: int

    def describe(self) -> str:
        return (f"wrote {self.out} ({self.bytes / 1e6:.1f} MB): {self.genes:,} genes, "
                f"{self.map_points:,} on the map")


def write_report(path: str | Path, out: str | Path, *, genes: Sequence[str] | None = None,
                 hvg_file: str | Path | None = None) -> ReportResult:
    """Write the page for `path` to `out` (see the module docstring)."""
    path, out = Path(path), Path(out)
    check_writable(out, flag="--out", example="report.html")
    facts = inspect_file(path, distinct=path.suffix != ".h5ad")
    if facts["kind"] not in ("esm_all", "h5ad"):
        raise InputError(f"{path}: a {facts['description']}; report reads esm_all.pt or an "
                         ".h5ad written with --write_h5ad")
    esm = read_esm_file(path) if facts["kind"] == "esm_all" else _from_h5ad(path)
    data = build_report_data(esm, genes=genes)
    sections = [_run_section(facts, esm, path, hvg_file), _lengths_section(data),
                _isoforms_section(data, facts["kind"]), _neighbours_section(data, genes),
                _map_section(data)]
    page = _page(path, sections)
    atomic_text(out, page)
    return ReportResult(out, len(page.encode()), len(esm.genes), len(data.map_xy))


def _from_h5ad(path: Path) -> EsmFile:
    """The .h5ad copy's pooled vectors as a one-row-per-gene EsmFile (vars with a vector)."""
    from esm2_batch.sources.h5ad_genes import import_anndata

    anndata = import_anndata()
    adata = anndata.read_h5ad(path, backed="r")
    import numpy as np
    import torch

    has = adata.var["esm2_has_protein"]
    keep = np.asarray(has.fillna(False), dtype=bool)  # <NA>: a var outside the run
    names = [str(n) for n in adata.var_names[keep]]
    matrix = torch.from_numpy(np.asarray(adata.varm["X_esm2"])[keep]).half()
    ids = [str(p) for p in adata.var["esm2_protein_id"][keep]]
    uns = {k: (v.item() if hasattr(v, "item") else v) for k, v in
           dict(adata.uns.get("esm2", {})).items()}
    status = {n: "ok" for n in names}
    return validate({"emb": matrix, "genes": names, "protein_ids": ids,
                     "gene_to_isoform_indices": {n: [i] for i, n in enumerate(names)},
                     "meta": {**uns, "status": status}}, source=str(path))


# -- sections -------------------------------------------------------------------------------
def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{escape(title)}</h2>{body}</section>'


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header) if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>"


def _run_section(facts: Mapping[str, Any], esm: EsmFile, path: Path,
                 hvg_file: str | Path | None) -> str:
    provenance = [(k, _plain(v)) for k, v in (facts.get("provenance") or {}).items()]
    body = _table(provenance, ("setting", "value"))
    genes = facts.get("genes")
    if isinstance(genes, Mapping):
        counts = [("genes in", genes["in"]), ("resolved", genes["resolved"]),
                  ("with rows", genes["with_rows"]), ("incomplete", genes["incomplete"]),
                  ("without protein", genes["without_protein"]),
                  ("not found", genes["not_found"]), ("renamed", len(genes["renamed"])),
                  ("isoforms (rows)", facts["isoforms"]["rows"])]
        body += "<h3>Counts</h3>" + _table(counts, ("", "genes"))
        body += _unresolved_lists(esm, path, genes)
    if hvg_file is not None:
        body += _hvg_coverage(esm, Path(hvg_file))
    return _section("run", "The run", body)


def _plain(value: Any) -> str:
    """A meta value as a person reads it: lists joined, dicts as 'key value' pairs."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _reasons(path: Path) -> dict[str, tuple[str, str]]:
    """query -> (status, likely reason), from the run's own <stem>.unresolved.tsv."""
    side = path.with_name(path.stem + ".unresolved.tsv")
    if not side.is_file():
        return {}
    with side.open(encoding="utf-8", newline="") as handle:
        return {row["query"]: (row["status"], row["likely_reason"])
                for row in csv.DictReader(handle, delimiter="\t")}


def _unresolved_lists(esm: EsmFile, path: Path, genes: Mapping[str, Any]) -> str:
    reasons = _reasons(path)
    status = as_mapping(esm.meta.get("status"))
    rows = [(q, status.get(q, "?"), reasons.get(q, ("", ""))[1]) for q in esm.genes
            if status.get(q, "ok") != "ok"]
    rows += [(q, f"renamed -> {new}", "found under its current name")
             for q, new in genes["renamed"].items()]
    if not rows:
        return "<p>Every gene resolved with all its proteins.</p>"
    return ("<h3>Genes that need a look</h3><input type='search' class='filter' "
            "placeholder='filter genes' aria-label='filter genes'>"
            + "<div class='scroll'>" + _table(rows, ("gene", "status", "likely reason")
                                               ).replace("<table>", "<table class='filterable'>",
                                                         1) + "</div>")


def _hvg_coverage(esm: EsmFile, hvg_file: Path) -> str:
    wanted = read_gene_list(hvg_file).genes
    found = esm.match_rows(list(wanted))
    missing = [g for g, rows in zip(wanted, found, strict=True) if not rows]
    return (f"<h3>Your gene list ({escape(hvg_file.name)})</h3><p>{len(wanted) - len(missing):,}"
            f" of {len(wanted):,} genes have a vector in this file.</p>"
            + (f"<details><summary>the {len(missing):,} without</summary><p class='small'>"
               f"{escape(', '.join(missing))}</p></details>" if missing else ""))


def _lengths_section(data: ReportData) -> str:
    if data.lengths is None:
        return _section("lengths", "Protein lengths", "<p>" + escape(" ".join(data.notes))
                        + "</p>")
    plot = histogram(data.lengths, xlabel="residues per protein", bins=60,
                     marker=data.context, marker_label=f"context {data.context}")
    text = (f"<p>{len(data.lengths):,} distinct proteins; {data.cut:,} longer than the "
            f"{data.context} residues kept (cut at the model's context).</p>")
    return _section("lengths", "Protein lengths", text + _figure(plot))


def _isoforms_section(data: ReportData, kind: str) -> str:
    if kind == "h5ad":
        return _section("isoforms", "Isoforms", "<p>The .h5ad holds one pooled vector per "
                        "gene; run report on its esm_all.pt for isoforms.</p>")
    body = _figure(bars(data.isoform_counts, xlabel="isoforms per gene", ylabel="genes"))
    if data.isoform_cosines:
        body += ("<p>Cosine of each non-canonical isoform to its gene's canonical one: near 1,"
                 " canonical and mean pooling give nearly the same vector.</p>")
        body += _figure(histogram(data.isoform_cosines, xlabel="cosine to the canonical "
                                  "isoform", ylabel="isoforms", bins=40))
        body += "<h3>Genes whose isoforms differ most</h3>" + _table(
            [(g, n, f"{c:.3f}") for g, n, c in data.most_different],
            ("gene", "isoforms", "lowest cosine"))
    return _section("isoforms", "Isoforms", body)


def _neighbours_section(data: ReportData, genes: Sequence[str] | None) -> str:
    if not data.neighbours:
        asked = ", ".join(genes or [])
        return _section("neighbours", "Nearest genes", f"<p>None of {escape(asked)} is in "
                        "the file.</p>")
    rows = [(gene, ", ".join(f"{n} ({c:.2f})" for n, c in near))
            for gene, near in data.neighbours.items()]
    return _section("neighbours", "Nearest genes (cosine of canonical vectors)",
                    _table(rows, ("gene", "nearest genes")))


def _map_section(data: ReportData) -> str:
    text = (f"<p>{len(data.map_xy):,} genes ({escape(data.map_method)}); labelled points are "
            "the genes above. Hover a point for its gene.</p>")
    return _section("map", "Map of gene vectors", text + _figure(
        gene_map_svg(data.map_xy, data.map_labels, data.map_marked, method=data.map_method)))


def _figure(svg: str) -> str:
    return f'<figure class="plot">{svg}</figure>'


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;
text-align:left;font-size:13px}section{margin:2em 0}.small{font-size:12px;color:#555}
figure.plot{margin:0}figure.plot svg{max-width:100%;height:auto}
.scroll{max-height:22em;overflow:auto;display:inline-block}"""

_SCRIPT = """document.querySelectorAll('input.filter').forEach(function(box){
box.addEventListener('input',function(){var q=box.value.toLowerCase();
box.nextElementSibling.querySelectorAll('tr').forEach(function(r,i){if(i>0){
r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';}});});});"""


def _page(path: Path, sections: list[str]) -> str:
    made = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    nav = " | ".join(f'<a href="#{key}">{key}</a>' for key in SECTIONS)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>esm2-batch report: {escape(path.name)}</title><style>{_STYLE}</style>"
            f"</head><body><h1>esm2-batch report: {escape(path.name)}</h1>"
            f"<p class='small'>{escape(str(path))}; made {made} by esm2-batch "
            f"{package_version()}</p><nav>{nav}</nav>{''.join(sections)}"
            f"<script>{_SCRIPT}</script></body></html>\n")
