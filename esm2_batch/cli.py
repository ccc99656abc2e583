"""The esm2-batch command: parse flags, build a RunConfig, call the pipeline, map errors.

Thin on purpose: every behaviour lives in the library, so what the CLI does, Python
callers can do too. Flags use the seed's underscore spellings; dash spellings work too.
Exit codes: 0 done, 2 bad input or flag, 3 Ensembl, 4 model, 5 embedding, 6 output or
resume state, 130 interrupted, 143 terminated. The flags themselves are in cli_flags.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from esm2_batch.cli_flags import (
    BackendOpt,
    BatchSize,
    CacheDir,
    Device,
    DryRun,
    DtypeOpt,
    EngineOpt,
    GenePooling,
    Include,
    IsoformsSetOpt,
    JsonOut,
    LongSeqsOpt,
    ModelPath,
    ModelSize,
    NoCache,
    Overwrite,
    Quiet,
    RayActors,
    RayAddress,
    ReprLayers,
    Toks,
    Truncation,
    Verbose,
    join_list_flags,
    option,
    parse_biotypes,
    parse_dtype,
    parse_engine,
    parse_gene_pooling,
    parse_isoforms_set,
    parse_layers,
    parse_long_seqs,
    parse_per_tok,
    parse_poolers,
    parse_size,
)
from esm2_batch.cli_guard import guarded, guarded_command, say, setup_logging
from esm2_batch.cli_look import inspect_command, report_command
from esm2_batch.embedding.options import AUTO_TOKENS  # no torch: the CLI starts fast
from esm2_batch.errors import (
    InputError,
)

if TYPE_CHECKING:
    from esm2_batch.run.dry_run import DryRunPlan


class _Group(typer.core.TyperGroup):
    """The app's group: list flags joined (join_list_flags) before click parses."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer vendors click
        parsed: list[str] = super().parse_args(ctx, join_list_flags(args))
        return parsed


app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]}, cls=_Group,
                  help="Gene list -> Ensembl isoforms -> ESM2 vectors -> esm_all.pt.")

def _print_version(value: bool) -> None:
    if value:
        from esm2_batch.version import package_version

        typer.echo(f"esm2-batch {package_version()}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False,
    hvg_file: Annotated[Path | None, option(
        "--hvg_file", help="Gene list: one symbol or Ensembl gene ID per line ('#' comments "
        "ok), or a CSV/TSV with a gene column.")] = None,
    all_genes: Annotated[bool, option(
        "--all_genes", help="Instead of --hvg_file: every gene of the species with a protein "
        "of --biotypes (offline files only: --ensembl_files or --ensembl_release).")] = False,
    out: Annotated[Path, option("--out", help="Output file.")] = Path("esm_all.pt"),
    model_size: ModelSize = "650M",
    model_path: ModelPath = None,
    device: Device = None,
    engine: EngineOpt = "fast",
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchSize = None,
    toks_per_batch: Toks = AUTO_TOKENS,
    parallel_workers: Annotated[int, option("--parallel_workers",
                                          help="Ensembl requests in flight.")] = 10,
    rate_limit: Annotated[float, option("--rate_limit", help="Ensembl requests per second "
                                      "(Ensembl allows 15 per IP).")] = 10.0,
    species: Annotated[str, option("--species", help="Ensembl species name.")] = "homo_sapiens",
    ensembl_url: Annotated[str | None, option(
        "--ensembl_url", help="Ensembl REST base URL (default $ENSEMBL_REST_URL, else "
        "https://rest.ensembl.org).")] = None,
    biotypes: Annotated[str, option("--biotypes", help="Comma-separated transcript biotypes "
                                  "whose proteins count.")] = "protein_coding",
    isoforms_set: IsoformsSetOpt = "all",
    truncation: Truncation = None,
    long_seqs: LongSeqsOpt = "truncate",
    repr_layers: ReprLayers = None,
    include: Include = None,
    isoforms: Annotated[Path | None, option(
        "--isoforms", help="Skip Ensembl: a FASTA as written by --save_isoforms.")] = None,
    save_isoforms: Annotated[Path | None, option(
        "--save_isoforms", help="Also write the fetched isoforms as FASTA.")] = None,
    overwrite: Overwrite = False,
    ray: RayAddress = None,
    ray_actors: RayActors = None,
    gene_column: Annotated[str | None, option(
        "--gene_column", "--id_column", help="The column with the genes. CSV/TSV: default "
        "the column whose values are gene symbols or Ensembl IDs (said on stderr); "
        "rownames for R's row names. .h5ad: the var column (default: gene_ids, an "
        "Ensembl-ID index, else var_names). --id_column is the same flag.")] = None,
    write_h5ad: Annotated[Path | None, option(
        "--write_h5ad", help=".h5ad input: write a copy with varm['X_esm2'] and "
        "var['esm2_*'] columns.")] = None,
    gene_pooling: GenePooling = "canonical",
    strict: Annotated[bool, option(
        "--strict", help="Exit 3 (after writing --out) if Ensembl left any gene incomplete "
        "(some protein sequences not returned).")] = False,
    ensembl_files: Annotated[Path | None, option(
        "--ensembl_files", help="Offline: a directory with Ensembl's pep.all.fa.gz and "
        "canonical.tsv.gz (see 'esm2-batch download').")] = None,
    ensembl_release: Annotated[int | None, option(
        "--ensembl_release", help="Offline: the release of the files, found under "
        "--ensembl_files or the download cache.")] = None,
    no_synonyms: Annotated[bool, option(
        "--no_synonyms", help="Strict matching: do not look symbols Ensembl does not know "
        "up as previous names or aliases (SEPT5 -> SEPTIN5).")] = False,
    synonyms: Annotated[Path | None, option(
        "--synonyms", help="Offline: HGNC's hgnc_complete_set.txt (or a TSV with symbol, "
        "prev_symbol, alias_symbol, ensembl_gene_id) for outdated symbols.")] = None,
    cache_dir: CacheDir = None,
    no_cache: NoCache = False,
    dry_run: DryRun = False,
    json_out: JsonOut = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Embed every protein isoform of every gene in --hvg_file (or, with --all_genes, of
    the species) into --out."""
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(verbose, quiet)

    def work() -> None:
        from esm2_batch.embedding.options import EmbedOptions
        from esm2_batch.run.config import ModelOptions, OutputOptions, RunConfig
        from esm2_batch.run.gene_mode import run
        from esm2_batch.run.stages import StageOptions
        from esm2_batch.sources.base import SourceOptions

        config = RunConfig(
            hvg_file=hvg_file, id_column=gene_column, all_genes=all_genes,
            source=SourceOptions(
                species=species, biotypes=parse_biotypes(biotypes), ensembl_url=ensembl_url,
                rate_limit=rate_limit, parallel_workers=parallel_workers, isoforms=isoforms,
                ensembl_files=ensembl_files, ensembl_release=ensembl_release,
                synonyms=not no_synonyms, synonyms_file=synonyms,
                isoforms_set=parse_isoforms_set(isoforms_set)),
            model=ModelOptions(model=_model_name(model_path, model_size), device=device,
                               engine=parse_engine(engine), backend=backend,
                               dtype=parse_dtype(dtype)),
            embed=EmbedOptions(toks_per_batch=toks_per_batch, batch_size=batch_size,
                               truncation=truncation, long_seqs=parse_long_seqs(long_seqs),
                               repr_layers=parse_layers(repr_layers),
                               include=parse_poolers(include), per_tok=parse_per_tok(include)),
            stage=StageOptions(ray=ray, ray_actors=ray_actors, progress=not quiet,
                               cache=not no_cache, cache_dir=cache_dir),
            output=OutputOptions(out=out, overwrite=overwrite, save_isoforms=save_isoforms,
                                 write_h5ad=write_h5ad,
                                 gene_pooling=parse_gene_pooling(gene_pooling), strict=strict))
        if dry_run:
            from esm2_batch.run.dry_run import dry_run_genes

            return _print_plan(dry_run_genes(config), json_out, quiet)
        summary = run(config)
        from esm2_batch.run.dry_run import estimate_line

        summary.estimate = estimate_line(summary, config.model, config.embed)
        for line in summary.lines():
            say(line, quiet)
        if summary.not_found:
            more = " ..." if len(summary.not_found) > 10 else ""
            say(f"not found: {', '.join(summary.not_found[:10])}{more} (full list in "
                 f"{summary.not_found_path})", quiet)

    guarded(work)


@app.command("fasta")
def fasta(
    inputs: Annotated[list[Path], typer.Argument(help="FASTA files to embed.")],
    out_dir: Annotated[Path | None, option("--out_dir", help="Where <stem>_ESM.pt files go "
                                         "(default: next to each input).")] = None,
    model_size: ModelSize = "650M",
    model_path: ModelPath = None,
    device: Device = None,
    engine: EngineOpt = "fast",
    backend: BackendOpt = "auto",
    dtype: Annotated[str, option(
        "--dtype", help="Compute precision: auto (fp16 on CUDA, fp32 on CPU), fp16, bf16 or "
        "fp32. FASTA rows are stored as float32.")] = "auto",
    batch_size: BatchSize = None,
    toks_per_batch: Toks = AUTO_TOKENS,
    truncation: Truncation = None,
    long_seqs: LongSeqsOpt = "truncate",
    repr_layers: ReprLayers = None,
    include: Include = None,
    per_file: Annotated[Path | None, option(
        "--per_file", help="Also write one <label>.pt per protein into this directory "
        "(implies --include per_tok; existing files are skipped).")] = None,
    per_file_format: Annotated[str, option(
        "--per_file_format", help="tensor (the [L, dim] float32 states of the first layer) "
        "or esm-extract ({label, representations, mean_representations}).")] = "tensor",
    overwrite: Overwrite = False,
    ray: RayAddress = None,
    ray_actors: RayActors = None,
    cache_dir: CacheDir = None,
    no_cache: NoCache = False,
    dry_run: DryRun = False,
    json_out: JsonOut = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Embed FASTA files into <stem>_ESM.pt = {'proteins': [...], 'data': [...]}."""
    setup_logging(verbose, quiet)

    def work() -> None:
        from esm2_batch.embedding.options import EmbedOptions
        from esm2_batch.run.config import ModelOptions
        from esm2_batch.run.fasta_mode import check_fasta_outputs, run_fasta
        from esm2_batch.run.stages import StageOptions

        source = _model_name(model_path, model_size)
        embed = EmbedOptions(toks_per_batch=toks_per_batch, batch_size=batch_size,
                             truncation=truncation, long_seqs=parse_long_seqs(long_seqs),
                             repr_layers=parse_layers(repr_layers),
                             include=parse_poolers(include), per_tok=parse_per_tok(include))
        loader = ModelOptions(model=source, device=device, engine=parse_engine(engine),
                              backend=backend, dtype=parse_dtype(dtype))
        if dry_run:
            from esm2_batch.run.dry_run import dry_run_fasta

            return _print_plan(dry_run_fasta(inputs, model=loader, embed=embed,
                                             out_dir=out_dir, cache=not no_cache),
                               json_out, quiet)
        # flag values, then every output: one line before the model loads
        check_fasta_outputs(inputs, out_dir=out_dir, per_file=per_file,
                            per_file_format=per_file_format, overwrite=overwrite,
                            per_tok=embed.per_tok or per_file is not None)
        model = loader.load()
        results = run_fasta(
            inputs, model=model, out_dir=out_dir, overwrite=overwrite, model_source=source,
            device=device, per_file=per_file, per_file_format=per_file_format, embed=embed,
            stage=StageOptions(ray=ray, ray_actors=ray_actors, progress=not quiet,
                               cache=not no_cache, cache_dir=cache_dir))
        for r in results:
            state = "skipped (exists)" if r.skipped else f"{r.proteins} proteins"
            state += f" ({r.cached} rows from the row cache)" if r.cached else ""
            failed = f", {r.failed} failed (see extraction_failures.log)" if r.failed else ""
            say(f"{r.source} -> {r.out}: {state}{failed}", quiet)
            if per_file is not None:
                say(f"  {per_file}: {r.per_file_written} <label>.pt written, "
                     f"{r.per_file_skipped} existed", quiet)

    guarded(work)


@app.command("export")
def export(
    esm_file: Annotated[Path, typer.Argument(help="An esm_all.pt written by esm2-batch, or "
                                             "(--format h5) a residue store directory.")],
    out: Annotated[Path, option("--out", help="Output file (.pt, .npz, .parquet or .h5).")],
    fmt: Annotated[str | None, option(
        "--format", help="saturn ({SYMBOL: tensor}, as SATURN and UCE read), npz, parquet "
        "or h5 (one dataset per protein id; default: from --out's suffix).")] = None,
    h5_dtype: Annotated[str | None, option(
        "--h5_dtype", help="h5: float16 or float32 (default: float16 for a residue store, "
        "float32 for esm_all.pt).")] = None,
    layer: Annotated[int | None, option(
        "--layer", help="h5 from a residue store: the stored layer (default: the first)."
    )] = None,
    gene_pooling: GenePooling = "canonical",
    include_missing: Annotated[bool, option(
        "--include_missing", help="npz/parquet: keep genes without protein as zero rows "
        "(refused with saturn and h5).")] = False,
    key: Annotated[str, option("--key", help="The matrix to export: emb (default) or one of "
                             "meta['matrices'], e.g. emb_max_layer20.")] = "emb",
    quiet: Quiet = False,
) -> None:
    """Write one vector per gene of an esm_all.pt for SATURN/UCE or non-torch users,
    or (--format h5) a residue store or esm_all.pt as one HDF5 dataset per protein id."""

    def work() -> None:
        from esm2_batch.outputs.export import export_format, export_genes
        from esm2_batch.outputs.h5 import export_h5

        chosen = export_format(fmt, out)
        refuse_other_formats_flags(chosen, h5_only={"--h5_dtype": h5_dtype, "--layer": layer},
                                   genes_only={"--gene_pooling": gene_pooling != "canonical"})
        if chosen == "h5":
            if include_missing:
                raise InputError("--include_missing keeps genes without protein as zero rows "
                                 "in npz and parquet; h5 holds one dataset per protein id, "
                                 "and such genes have none")
            for line in export_h5(esm_file, out, dtype=h5_dtype, layer=layer,
                                  key=key).lines():
                say(line, quiet)
            return
        if esm_file.is_dir():
            raise InputError(f"{esm_file}: a directory (a residue store?) exports only as "
                             "--format h5")
        result = export_genes(esm_file, fmt=fmt, gene_pooling=parse_gene_pooling(gene_pooling),
                              out=out, include_missing=include_missing, key=key)
        for line in result.lines():
            say(line, quiet)

    guarded(work)


def refuse_other_formats_flags(chosen: str, *, h5_only: dict[str, object],
                               genes_only: dict[str, object]) -> None:
    """A flag that does nothing for the chosen format is refused in one line, not dropped:
    `--layer 20` on an npz export would otherwise write the default and say nothing."""
    wrong = h5_only if chosen != "h5" else genes_only
    given = [flag for flag, value in wrong.items() if value not in (None, False)]
    if given:
        where = "--format h5" if chosen != "h5" else "gene exports (saturn, npz, parquet)"
        verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
        raise InputError(f"{', '.join(given)} {verb} only to {where}; this export writes "
                         f"{chosen}: drop {them} or change --format")


@app.command("download")
def download(
    ensembl_release: Annotated[int, option("--ensembl_release", help="Ensembl release.")],
    species: Annotated[str, option("--species", help="Ensembl species.")] = "homo_sapiens",
    assembly: Annotated[str | None, option("--assembly", help="Assembly (known for human "
                                         "and mouse).")] = None,
    directory: Annotated[Path | None, option("--dir", help="Where to put the files (default: "
                                           "the download cache).")] = None,
    print_only: Annotated[bool, option("--print_only", help="Only print curl commands for "
                                     "a machine with the network.")] = False,
) -> None:
    """Fetch (or print the URLs of) Ensembl's FTP files for offline runs."""

    def work() -> None:
        from esm2_batch.sources.ensembl_ftp import (
            SYNONYM_FILE_NAME,
            download_commands,
            download_ensembl_files,
            download_synonym_table,
            ensembl_cache_dir,
        )
        from esm2_batch.sources.synonyms import synonym_file_url

        target = directory or ensembl_cache_dir(ensembl_release)
        synonym_url = synonym_file_url(species)
        for line in download_commands(species, ensembl_release, target, assembly):
            typer.echo(line)
        if synonym_url is not None:  # HGNC's previous names and aliases, for --synonyms
            typer.echo(f"curl -fL -o {target / SYNONYM_FILE_NAME} {synonym_url}")
        if not print_only:
            files = download_ensembl_files(species, ensembl_release, target,
                                           assembly=assembly)
            download_synonym_table(species, target)
            typer.echo(f"ready: {files.pep.parent} (use --ensembl_files {files.pep.parent} "
                       f"--ensembl_release {ensembl_release})")

    guarded(work)


cache_app = typer.Typer(add_completion=False, rich_markup_mode=None,
                        help="The row cache shared across runs: what it holds, and pruning.")
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(cache_dir: CacheDir = None) -> None:
    """Rows and size per model, layer, pooler, truncation and dtype."""

    def work() -> None:
        from esm2_batch.store.cache import RowCache, default_cache_dir

        with RowCache(cache_dir or default_cache_dir()) as cache:
            for line in cache.info().describe():
                typer.echo(line)

    guarded(work)


@cache_app.command("prune")
def cache_prune(
    cache_dir: CacheDir = None,
    older_than: Annotated[float | None, option(
        "--older_than", help="Delete rows not used for this many days.")] = None,
    max_size: Annotated[str | None, option(
        "--max_size", help="Then delete the least recently used rows until the rest take "
        "at most this much (e.g. 20G).")] = None,
    weights: Annotated[str | None, option(
        "--weights", help="Delete the rows of these weights (a fingerprint prefix, as "
        "'cache info' shows it).")] = None,
    everything: Annotated[bool, option("--all", help="Delete every row.")] = False,
) -> None:
    """Delete rows of the row cache (at least one of the options)."""
    limit = parse_size(max_size)

    def work() -> None:
        from esm2_batch.store.cache import RowCache, default_cache_dir

        if older_than is None and limit is None and weights is None and not everything:
            raise InputError("cache prune: say what to delete: --older_than DAYS, "
                             "--max_size SIZE, --weights PREFIX or --all")
        with RowCache(cache_dir or default_cache_dir()) as cache:
            deleted = cache.prune(older_than_days=older_than, max_bytes=limit,
                                  weights=weights, everything=everything)
            info = cache.info()
        typer.echo(f"deleted {deleted:,} rows; {info.rows:,} left, "
                   f"{info.file_bytes / 1e6:,.1f} MB on disk ({info.path})")

    guarded(work)


app.command("inspect")(guarded_command(inspect_command))
app.command("report")(guarded_command(report_command))


def _print_plan(plan: DryRunPlan, json_out: bool, quiet: bool) -> None:
    """A --dry_run's plan (run/dry_run.py's DryRunPlan): one JSON object, or its lines."""
    if json_out:
        import json

        typer.echo(json.dumps(plan.as_dict()))
        return
    for line in plan.lines():
        say(line, quiet)


def _model_name(model_path: Path | None, model_size: str) -> str:
    return str(model_path) if model_path else model_size
