"""Flag help texts say what README says (they contradicted it: the engines' agreement,
per_tok on Ray)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from esm2_batch.cli_flags import EngineOpt, Include

README = Path(__file__).resolve().parent.parent / "README.md"


def help_of(flag: Any) -> str:
    return str(flag.__metadata__[0].help)


def test_engine_help_gives_readmes_figure_for_the_rows() -> None:
    row = next(line for line in README.read_text().splitlines()
               if line.startswith("| `--engine` |"))
    readme = re.search(r"rows agree within ([0-9.e-]+)", row)
    flag = re.search(r"rows agree within ([0-9.e-]+)", help_of(EngineOpt))
    assert readme and flag and flag.group(1) == readme.group(1), (row, help_of(EngineOpt))


def test_include_help_allows_per_tok_on_ray() -> None:
    text = help_of(Include)
    assert "per_tok" in text and "not with --ray" not in text
