"""Orchestration, nothing else: the stages are built elsewhere and only wired here.

    config.py      RunConfig: the run's options, grouped by the stage that uses them
    gene_mode.py   gene list -> IsoformSource -> EmbedStage -> partial store -> esm_all.pt
    fasta_mode.py  FASTA files -> <stem>_ESM.pt, through the same EmbedStage
    stages.py      the EmbedStage protocol and the in-process thread stage
    ray_stage.py   the same protocol on Ray actors, fed a bounded window while fetching
    ray_actors.py  the Ray actors and the pool that feeds them
    ray_cluster.py reaching a Ray cluster and checking it first (GPUs, shared directory)
    reports.py     the run summary and the side files (not_found, unresolved, failed)
"""
