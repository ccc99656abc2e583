"""Build and change a RunConfig by the CLI's flat flag names, so a test reads like the
command line it stands for (`config(out=..., truncation=500)`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.run.config import ModelOptions, OutputOptions, RunConfig
from esm2_batch.run.stages import StageOptions
from esm2_batch.sources.base import SourceOptions

GROUPS: dict[str, type] = {"source": SourceOptions, "model": ModelOptions,
                           "embed": EmbedOptions, "stage": StageOptions,
                           "output": OutputOptions}
TOP = ("hvg_file", "id_column", "all_genes")


def make_config(**flat: Any) -> RunConfig:
    """A RunConfig from flag names (model=..., truncation=..., ray=..., out=...)."""
    return with_flags(RunConfig(), **flat)


def with_flags(config: RunConfig, **flat: Any) -> RunConfig:
    """`config` with the named flags changed, each in the group that owns it."""
    changes: dict[str, Any] = {k: flat.pop(k) for k in TOP if k in flat}
    for group, kind in GROUPS.items():
        names = {f.name for f in dataclasses.fields(kind)}
        mine = {k: flat.pop(k) for k in list(flat) if k in names}
        if mine:
            changes[group] = dataclasses.replace(getattr(config, group), **mine)
    if flat:
        raise TypeError(f"no such flags: {sorted(flat)}")
    return dataclasses.replace(config, **changes)
