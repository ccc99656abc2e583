"""Pick the embedding stage a run asks for: the thread stage (run/stages.py) or Ray actors
(run/ray_stage.py).

The choice lives here, not beside the protocol, so every import points one way: both
implementations import the protocol's module (stages.py), and only this module knows
them both. Ray is an optional extra, so its module is imported only when asked for.
"""

from __future__ import annotations

from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.models import LoadedModel
from esm2_batch.run.stages import (
    EmbedStage,
    PendingSequences,
    ResidueSink,
    RowSink,
    StageOptions,
    ThreadStage,
)
from esm2_batch.store.cache import CacheView
from esm2_batch.store.keys import RowKeys

__all__ = ["make_stage"]


def make_stage(model: LoadedModel, sink: RowSink, options: EmbedOptions,
               stage: StageOptions, *, keys: RowKeys, model_source: str,
               device: str | None, residues: ResidueSink | None = None,
               cache: CacheView | None = None) -> EmbedStage:
    """The stage `stage` asks for, reading and filling `cache` (the shared row cache;
    None: not used). A Ray actor loads `model_source` (a size, a name or a checkpoint
    path) on `device` as the user gave it (None: a GPU where the cluster has one), with
    the engine and backend `model` was loaded with. `residues` (per_tok) is written by
    this process in-process, and by the actors themselves on Ray: a ResidueWriter in a
    directory every node shares, which RayStage.start checks against the cluster itself
    (a probe file each node reads back) before any fetching or embedding."""
    built: EmbedStage
    if stage.ray is None:
        built = ThreadStage(model, sink, options, keys=keys, progress=stage.progress,
                            queue_items=stage.queue_items, residues=residues)
    else:
        from esm2_batch.run.ray_stage import RayStage  # Ray is an optional extra

        built = RayStage(model, sink, options, stage, keys=keys, model_source=model_source,
                         device=device, residues=residues)
    if isinstance(built, PendingSequences):
        built.use_cache(cache)
    return built
