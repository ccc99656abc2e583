"""The report's pictures as inline SVG text: histograms and bars with matplotlib (axes,
ticks and labels done properly by a well-kept library), and the 2-D gene map written by
hand, because a person hovers over its points to read gene names, which needs one
<circle><title>gene</title></circle> per point that matplotlib's SVG does not write.

Everything is SVG inside the page: no image files, no network, text stays text
(svg.fonttype none), and a fixed hash salt keeps the output byte-stable for a given input.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from html import escape
from typing import Any

from esm2_batch.errors import InputError

__all__ = ["bars", "gene_map_svg", "histogram"]

_COLOR = "#3b6ea8"
_ACCENT = "#c0392b"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise InputError("esm2-batch report needs matplotlib: pip install "
                         "'esm2-batch[report]'") from None
    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "esm2-batch",
                                "font.size": 10, "axes.spines.top": False,
                                "axes.spines.right": False})
    import matplotlib.pyplot as plt

    return plt


def _svg(figure: Any) -> str:
    """The figure as an inline <svg> element (no XML prologue), then closed."""
    plt = _pyplot()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def histogram(values: Sequence[float], *, xlabel: str, ylabel: str = "proteins",
              bins: int = 50, marker: float | None = None, marker_label: str = "",
              log: bool = False) -> str:
    """A histogram; `marker` draws a vertical line (the model's context)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 3.0))
    axes.hist(list(values), bins=bins, color=_COLOR, log=log)
    if marker is not None:
        axes.axvline(marker, color=_ACCENT, linestyle="--", linewidth=1.2)
        axes.annotate(marker_label, xy=(marker, 1), xycoords=("data", "axes fraction"),
                      xytext=(4, -12), textcoords="offset points", color=_ACCENT)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    return _svg(figure)


def bars(counts: dict[int, int], *, xlabel: str, ylabel: str) -> str:
    """Bars of count per integer value (genes per number of isoforms)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 3.0))
    axes.bar([str(k) for k in counts], list(counts.values()), color=_COLOR)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    return _svg(figure)


def gene_map_svg(xy: Sequence[tuple[float, float]], labels: Sequence[str],
                 marked: Sequence[bool], *, method: str, width: int = 720,
                 height: int = 540) -> str:
    """Every point a circle whose <title> is its gene (hover shows it); marked genes
    drawn larger, in the accent colour, with their name written beside them."""
    if not xy:
        return "<p>Too few genes with a vector for a map.</p>"
    pad = 24
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)

    def at(x: float, y: float) -> tuple[float, float]:
        sx = pad + (x - x0) / ((x1 - x0) or 1.0) * (width - 2 * pad)
        sy = height - pad - (y - y0) / ((y1 - y0) or 1.0) * (height - 2 * pad)
        return round(sx, 1), round(sy, 1)

    plain, accent = [], []
    for (x, y), label, is_marked in zip(xy, labels, marked, strict=True):
        sx, sy = at(x, y)
        name = escape(label)
        if is_marked:
            right = sx > width * 0.75  # a label near the right edge reads leftwards
            tx, anchor = (sx - 6, "end") if right else (sx + 6, "start")
            accent.append(f'<circle cx="{sx}" cy="{sy}" r="4.5" fill="{_ACCENT}"><title>'
                          f'{name}</title></circle><text x="{tx}" y="{sy - 6}" '
                          f'text-anchor="{anchor}" font-size="11">{name}</text>')
        else:
            plain.append(f'<circle cx="{sx}" cy="{sy}" r="2.2"><title>{name}</title>'
                         "</circle>")
    return (f'<svg class="map" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="2-D map of gene vectors ({escape(method)})">'
            f'<rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>'
            f'<g fill="{_COLOR}" fill-opacity="0.55">{"".join(plain)}</g>'
            f'<g>{"".join(accent)}</g>'
            f'<text x="{pad}" y="{height - 6}" font-size="11" fill="#555">'
            f'{escape(method)}: axis 1 ->, axis 2 ^ (hover a point for its gene)</text>'
            "</svg>")
