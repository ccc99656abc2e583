"""`esm2-batch report`: the page's numbers, and the page as a person sees it, rendered in
headless Chromium: it loads with no console error and no request beyond itself, and every
section is there with its plot. The screenshot is kept (test-artifacts/report.png)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.errors import InputError
from esm2_batch.outputs.report import SECTIONS, write_report
from esm2_batch.outputs.report_data import build_report_data, gene_table
from esm2_batch.store.esm_file import read_esm_file

ARTIFACTS = Path(os.environ.get("ESM2_BATCH_TEST_ARTIFACTS", "test-artifacts"))
PLOTTED = ("lengths", "isoforms", "map")  # the others are tables
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def test_the_numbers_behind_the_page(made: Path) -> None:
    esm = read_esm_file(made)
    data = build_report_data(esm, genes=["GENE0001", "braf"])
    table = gene_table(esm)
    assert set(data.neighbours) == {"GENE0001", "BRAF"}  # by key or symbol, any case
    for gene, near in data.neighbours.items():
        assert gene not in [n for n, _ in near]  # never its own neighbour
        cosines = [c for _, c in near]
        assert cosines == sorted(cosines, reverse=True)
        assert all(-1.0 - 1e-5 <= c <= 1.0 + 1e-5 for c in cosines)
    braf_rows = esm.rows_of("BRAF")
    unit = torch.nn.functional.normalize(esm.emb[braf_rows].float(), dim=1)
    expected = min((unit[1:] @ unit[0]).tolist())
    assert ("BRAF", len(braf_rows), pytest.approx(expected, abs=1e-6)) in data.most_different
    assert sum(data.isoform_counts.values()) == len(table.genes)
    assert len(data.map_xy) == len(table.genes) and sum(data.map_marked) == 2
    assert data.lengths is not None and data.cut >= 1 and data.context == 500


def test_report_refuses_a_file_it_cannot_show(made: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"report reads esm_all\.pt"):
        write_report(made.with_name("esm_all.residues"), tmp_path / "r.html")
    done = CliRunner().invoke(app, ["report", str(tmp_path / "none.pt"), "--out",
                                    str(tmp_path / "r.html")])
    assert done.exit_code == 2 and len(done.output.strip().splitlines()) == 1


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_in_a_real_browser(made: Path, tmp_path: Path) -> None:
    hvg = tmp_path / "mine.txt"
    hvg.write_text("BRAF\nGENE0001\nNOTAGENE\n")
    page = tmp_path / "report.html"
    done = CliRunner().invoke(app, ["report", str(made), "--out", str(page), "--genes",
                                    "BRAF,GENE0001", "--hvg_file", str(hvg)])
    assert done.exit_code == 0, done.output
    html = page.read_text()
    # nothing to fetch: no src/href/url() pointing off the page (namespaces are fine)
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)|url\(\s*['\"]?https?:", html)
    assert "NOTAGENE" in html  # in the list, not in the file: named
    browser = _browser()
    playwright = pytest.importorskip("playwright.sync_api",
                                     reason="playwright is a test extra")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=browser, args=BROWSER_FLAGS)
        try:
            view = chromium.new_page(viewport={"width": 1100, "height": 900})
            errors: list[str] = []
            requests: list[str] = []
            view.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            view.on("pageerror", lambda e: errors.append(str(e)))
            view.on("request", lambda r: requests.append(r.url))
            view.goto(page.as_uri())
            view.wait_for_load_state("load")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            view.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
            for key in SECTIONS:  # each section there, each plot drawn at a visible size
                section = view.locator(f"section#{key}")
                assert section.count() == 1, key
                shown = section.locator("svg" if key in PLOTTED else "table").first
                box = shown.bounding_box()
                assert box is not None and box["width"] > 200 and box["height"] > 40, key
            assert view.locator("section#neighbours table tr").count() == 3
            assert view.locator("svg.map circle").count() >= 3
            assert view.locator("svg.map text", has_text="GENE0001").count() == 1
            view.fill("input.filter", "RP11")  # the search box filters the gene list
            visible = view.locator("table.filterable tr:visible").count()
            assert visible == 2  # the header and the clone name
        finally:
            chromium.close()
    assert errors == [] and requests == [page.as_uri()]


def test_an_h5ad_copy_gets_the_same_page_from_its_varm(made: Path, tmp_path: Path) -> None:
    ad = pytest.importorskip("anndata")
    import numpy as np
    import pandas as pd

    from esm2_batch.outputs.h5ad import write_h5ad
    from esm2_batch.outputs.inspect import inspect_file
    from tests.outputs.conftest import QUERIES

    names = [*QUERIES, "NOT_IN_RUN"]
    var = pd.DataFrame({"highly_variable": [True] * len(QUERIES) + [False]}, index=names)
    source = tmp_path / "cells.h5ad"
    ad.AnnData(X=np.ones((2, len(names)), dtype=np.float32), var=var).write_h5ad(source)
    copy = tmp_path / "cells.esm2.h5ad"
    write_h5ad(source, copy, made)
    facts = inspect_file(copy)
    assert facts["kind"] == "h5ad" and facts["matrices"]["varm['X_esm2']"]["shape"][0] == 8
    result = write_report(copy, tmp_path / "r.html", genes=["BRAF"])
    esm = read_esm_file(made)
    assert result.genes == sum(1 for g in esm.genes if esm.rows_of(g))  # vars with a vector
    html = (tmp_path / "r.html").read_text()
    assert all(f'id="{key}"' in html for key in SECTIONS) and "one pooled vector" in html
