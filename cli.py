"""The `kd` command line: options in, one frozen config per stage, one ``run(config)`` call.

No logic lives here. Each command maps its flags one-to-one onto the fields of
its stage's config dataclass (whose docstrings are the help texts), and errors
from kd's own hierarchy (``KdError``) are printed as one clear line, exit 2.

    kd generate ...        stage one: samples + teacher top-k -> cache shards
    kd train ...           stage two: cache -> divergence loss -> student checkpoints
    kd eval ...            held-out KL / top-1 / perplexity of a student against the teacher
    kd report RUN_DIR      plots and report.md of a training run
    kd cache info|verify|ls|copy|merge|export|import   inspect, check, move and exchange logit caches
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from kd.storage.errors import KdError

# The config dataclasses are light to import (no torch): `kd --help` stays fast.
from dataclasses import MISSING, fields  # noqa: E402
from functools import partial  # noqa: E402

from kd.stages.eval import EvalConfig  # noqa: E402
from kd.stages.fields import field_docs  # noqa: E402
from kd.stages.generate.run import GenerateConfig  # noqa: E402
from kd.stages.report import ReportConfig  # noqa: E402
from kd.stages.train.config import TrainConfig  # noqa: E402

app = typer.Typer(
    name="kd",
    help="Knowledge distillation around a cached, compressed teacher top-k logit store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect, check, copy, merge, export and import logit caches (local paths or fsspec URLs).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _option(config_cls, name: str, *flags: str, with_config: bool = False):
    """The typer option of config field ``name``: its default and help text come from the dataclass.

    A field without a default is required. In a command with ``--config`` (``with_config``)
    it may come from the file, so click must not demand it: ``kd.stages.recipes.resolve_config``
    reports it when neither gives it.
    """
    default = {f.name: f.default for f in fields(config_cls)}[name]
    help_text = field_docs(config_cls)[name]
    if default is MISSING and with_config:
        default, help_text = None, help_text + " [required: here or in --config]"
    return typer.Option(... if default is MISSING else default,
                        *(flags or (f"--{name.replace('_', '-')}",)), help=help_text)


_CONFIG_HELP = ("A YAML recipe of this command's options (see recipes/ and kd/stages/recipes.py); "
                "flags given on the command line override it.")


def _resolve(stage: str, ctx: typer.Context, config_file: Optional[str], values: dict):
    """The stage's config from --config and the flags; a flag counts only if typed (click's source)."""
    from kd.stages.recipes import resolve_config

    # by name: typer may vendor its own click, whose ParameterSource is another enum
    given = {name for name in values
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")}
    return resolve_config(stage, config_file, values, given)


_gen_opt = partial(_option, GenerateConfig, with_config=True)
_train_opt = partial(_option, TrainConfig, with_config=True)
_eval_opt = partial(_option, EvalConfig, with_config=True)


def _fail(err: KdError) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# ---------------------------------------------------------------- kd cache
@cache_app.command("info")
def cache_info(
    path: str = typer.Argument(..., help="Cache location: a local folder or an fsspec URL (s3://bucket/prefix)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Shards, sequences, tokens, bytes/token, k, codec and provenance of a cache."""
    from kd.storage.inspect import cache_summary, format_summary

    try:
        summary = cache_summary(path)
    except KdError as err:
        _fail(err)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@cache_app.command("verify")
def cache_verify(
    path: str = typer.Argument(..., help="Cache location: a local folder or an fsspec URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check schema, checksums, offsets, id ranges and log-prob rules of every committed shard.

    Exit code 0 when the cache is sound, 1 when any shard is bad (each is listed with its path).
    """
    from kd.storage.verify import verify_cache

    try:
        report = verify_cache(path)
    except KdError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(report.format())
    raise typer.Exit(0 if report.ok else 1)


@cache_app.command("ls")
def cache_ls(
    path: str = typer.Argument(..., help="Cache location: a local folder or an fsspec URL."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per shard (a list) instead of a table."),
) -> None:
    """One line per committed shard: round, source, sequences, tokens, bytes, student step, creation time."""
    from kd.storage.tools import format_listing, list_shards

    try:
        rows = list_shards(path)
    except KdError as err:
        _fail(err)
    typer.echo(json.dumps(rows, indent=2) if as_json else format_listing(path, rows))


def _print_summary(summary: dict) -> None:
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        typer.echo(f"{key:<{width}}  {value}")


_PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with bytes/s (on a terminal).")


@cache_app.command("copy")
def cache_copy(
    src: str = typer.Argument(..., help="Source cache: a local folder or an fsspec URL."),
    dst: str = typer.Argument(..., help="Destination: a new location, or a cache with the same fingerprint."),
    progress: bool = _PROGRESS,
) -> None:
    """Copy the committed shards of SRC to DST, verifying every object's sha256 on arrival.

    Resumable: rerun after an interruption; shards already committed at DST are skipped and
    half-copied ones redone. A shard failing its checksum is left uncommitted and reported.
    """
    from kd.storage.tools import copy_cache

    try:
        _print_summary(copy_cache(src, dst, progress=progress))
    except KdError as err:
        _fail(err)


@cache_app.command("merge")
def cache_merge(
    inputs: list[str] = typer.Argument(..., help="Caches to merge (local folders or fsspec URLs)."),
    out: str = typer.Option(..., "--out", help="The merged cache: a new location, or a cache with the same fingerprint."),
    on_conflict: str = typer.Option(
        "refuse", "--on-conflict",
        help="Two inputs holding different shards of one name: 'refuse' (default; nothing is written) or "
        "'rename' (the later input's shard becomes <name>.m<input number>). Identical shards are copied once."),
    progress: bool = _PROGRESS,
) -> None:
    """Merge caches with identical teacher, tokenizer, k and codec fingerprints into one (resumable)."""
    from kd.storage.tools import merge_caches

    try:
        _print_summary(merge_caches(inputs, out, on_conflict=on_conflict, progress=progress))
    except KdError as err:
        _fail(err)


@cache_app.command("export")
def cache_export(
    path: str = typer.Argument(..., help="Cache location: a local folder or an fsspec URL."),
    fmt: str = typer.Option(
        "parquet", "--format",
        help="'parquet': one .parquet file at --out; 'hf-dataset': a folder with data/*.parquet and a README "
        "that datasets.load_dataset(folder) reads."),
    out: str = typer.Option(..., "--out", help="Where to write (must not exist yet)."),
) -> None:
    """One row per sequence: input ids, loss mask, per-position top-k ids/log-probs (decoded), tail, target.

    The schema is in docs/FORMAT.md, section 9.
    """
    from kd.storage.exchange import export_cache

    try:
        _print_summary(export_cache(path, out, fmt))
    except KdError as err:
        _fail(err)


def _import_opt(name: str, *flags: str):
    from kd.storage.import_config import ImportConfig

    return _option(ImportConfig, name, *flags)


@cache_app.command("import")
def cache_import(
    files: list[str] = typer.Argument(..., help="Parquet files or folders of them, one row per sequence "
                                      "(docs/FORMAT.md, section 9)."),
    out: str = _import_opt("out"),
    teacher_name: str = _import_opt("teacher_name"),
    teacher_revision: str = _import_opt("teacher_revision"),
    teacher_weights: str = _import_opt("teacher_weights"),
    teacher_sha256: str = _import_opt("teacher_sha256"),
    tokenizer: str = _import_opt("tokenizer"),
    tokenizer_sha256: str = _import_opt("tokenizer_sha256"),
    vocab_size: int = _import_opt("vocab_size"),
    k: int = _import_opt("k", "--k", "-k"),
    codec: str = _import_opt("codec"),
    codec_levels: int = _import_opt("codec_levels"),
    zstd_level: int = _import_opt("zstd_level"),
    source: str = _import_opt("source"),
    shard_size: int = _import_opt("shard_size"),
) -> None:
    """Build a cache from Parquet rows of teacher top-k log-probs captured elsewhere, with your provenance.

    Every row is validated before anything is written; errors name the file, row and column.
    """
    options = dict(locals(), files=tuple(files))
    from kd.storage.exchange import ImportConfig, import_parquet

    try:
        _print_summary(import_parquet(ImportConfig(**options)))
    except KdError as err:
        _fail(err)


@cache_app.command("gc")
def cache_gc(
    path: str = typer.Argument(..., help="Cache location: a local folder or an fsspec URL."),
    older_than: float = typer.Option(3600.0, "--older-than", help="Grace period in seconds: leftovers "
                                     "younger than this may belong to a live writer and are kept."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Remove uncommitted shard groups and temp files left by dead writers (never a committed shard)."""
    from kd.storage.gc import collect_garbage

    try:
        report = collect_garbage(path, older_than=older_than, dry_run=dry_run)
    except KdError as err:
        _fail(err)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())


# ---------------------------------------------------------------- kd generate
# (the generate command lives in this block)


@app.command("generate")
def generate(
    ctx: typer.Context,
    config_file: Optional[str] = typer.Option(None, "--config", metavar="FILE", help=_CONFIG_HELP),
    data: str = _gen_opt("data"),
    out: str = _gen_opt("out"),
    student: str = _gen_opt("student"),
    teacher: str = _gen_opt("teacher"),
    source: str = _gen_opt("source"),
    split: str = _gen_opt("split"),
    prompt_field: str = _gen_opt("prompt_field"),
    completion_field: str = _gen_opt("completion_field"),
    row_start: int = _gen_opt("row_start"),
    row_end: Optional[int] = _gen_opt("row_end"),
    limit: Optional[int] = _gen_opt("limit"),
    chat_template: bool = _gen_opt("chat_template", "--chat-template/--no-chat-template"),
    max_prompt_tokens: int = _gen_opt("max_prompt_tokens"),
    long_prompts: str = _gen_opt("long_prompts"),
    k: int = _gen_opt("k", "--k", "-k"),
    codec: str = _gen_opt("codec"),
    codec_levels: int = _gen_opt("codec_levels"),
    zstd_level: int = _gen_opt("zstd_level"),
    temperature: float = _gen_opt("temperature"),
    top_p: float = _gen_opt("top_p"),
    max_new_tokens: int = _gen_opt("max_new_tokens"),
    num_samples: int = _gen_opt("num_samples"),
    seed: int = _gen_opt("seed"),
    round: int = _gen_opt("round"),
    student_step: Optional[int] = _gen_opt("student_step"),
    backend: str = _gen_opt("backend"),
    vllm_options: str = _gen_opt("vllm_options"),
    device: str = _gen_opt("device"),
    dtype: str = _gen_opt("dtype"),
    batch_size: int = _gen_opt("batch_size"),
    score_batch_tokens: int = _gen_opt("score_batch_tokens"),
    offload: str = _gen_opt("offload"),
    offload_group: int = _gen_opt("offload_group"),
    shard_size: int = _gen_opt("shard_size"),
    worker: Optional[int] = _gen_opt("worker"),
    num_workers: Optional[int] = _gen_opt("num_workers"),
    progress: bool = _gen_opt("progress", "--progress/--no-progress"),
    follow: str = _gen_opt("follow"),
) -> None:
    """Sample completions (student, teacher or dataset), score them with the teacher's top-k, write shards.

    Rerunning the same command resumes: committed shards are skipped. See
    kd/stages/generate/run.py for the algorithm and the --offload modes.
    """
    options = dict(locals())
    ctx, config_file = options.pop("ctx"), options.pop("config_file")
    from kd.stages.generate.run import run

    try:
        summary = run(_resolve("generate", ctx, config_file, options))
    except KdError as err:
        _fail(err)
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        typer.echo(f"{key:<{width}}  {value}")


# ---------------------------------------------------------------- kd train
# (the train command lives in this block)
import os  # noqa: E402


@app.command("train")
def train(
    ctx: typer.Context,
    config_file: Optional[str] = typer.Option(None, "--config", metavar="FILE", help=_CONFIG_HELP),
    cache: str = _train_opt("cache"),
    out: str = _train_opt("out"),
    student: str = _train_opt("student"),
    steps: int = _train_opt("steps"),
    lr: float = _train_opt("lr"),
    min_lr_ratio: float = _train_opt("min_lr_ratio"),
    warmup: int = _train_opt("warmup"),
    weight_decay: float = _train_opt("weight_decay"),
    batch_tokens: int = _train_opt("batch_tokens"),
    grad_accum: int = _train_opt("grad_accum"),
    clip: float = _train_opt("clip"),
    loss: str = _train_opt("loss"),
    topk_mode: str = _train_opt("topk_mode"),
    beta: float = _train_opt("beta"),
    alpha: float = _train_opt("alpha"),
    temperature: float = _train_opt("temperature"),
    divergence_weight: float = _train_opt("divergence_weight"),
    ce_weight: float = _train_opt("ce_weight"),
    token_reverse_kl_weight: float = _train_opt("token_reverse_kl_weight"),
    importance_clip: Optional[float] = _train_opt("importance_clip"),
    tail_logprob_floor: float = _train_opt("tail_logprob_floor"),
    chunk_size: int = _train_opt("chunk_size"),
    heldout_fraction: float = _train_opt("heldout_fraction"),
    eval_every: int = _train_opt("eval_every"),
    eval_batches: int = _train_opt("eval_batches"),
    save_every: int = _train_opt("save_every"),
    keep: int = _train_opt("keep"),
    resume: bool = _train_opt("resume", "--resume/--no-resume"),
    seed: int = _train_opt("seed"),
    device: str = _train_opt("device"),
    dtype: str = _train_opt("dtype"),
    compile: bool = _train_opt("compile", "--compile/--no-compile"),
    fsdp: bool = _train_opt("fsdp", "--fsdp/--no-fsdp"),
    loader_workers: int = _train_opt("loader_workers"),
    skip_bad_shards: bool = _train_opt("skip_bad_shards", "--skip-bad-shards/--no-skip-bad-shards"),
    tensorboard: bool = _train_opt("tensorboard", "--tensorboard/--no-tensorboard"),
    progress: bool = _train_opt("progress", "--progress/--no-progress"),
    refresh_every: int = _train_opt("refresh_every"),
    refresh_prompts: int = _train_opt("refresh_prompts"),
    prompts: str = _train_opt("prompts"),
    teacher: str = _train_opt("teacher"),
    sample_temperature: float = _train_opt("sample_temperature"),
    sample_top_p: float = _train_opt("sample_top_p"),
    max_new_tokens: int = _train_opt("max_new_tokens"),
    on_policy_fraction: float = _train_opt("on_policy_fraction"),
    max_staleness: Optional[int] = _train_opt("max_staleness"),
    refresh_mode: str = _train_opt("refresh_mode"),
    refresh_backend: str = _train_opt("refresh_backend"),
    refresh_vllm_options: str = _train_opt("refresh_vllm_options"),
    refresh_offload: str = _train_opt("refresh_offload"),
    refresh_batch_size: int = _train_opt("refresh_batch_size"),
    refresh_wait: float = _train_opt("refresh_wait"),
) -> None:
    """Train the student on a logit cache: chunked distillation loss, checkpoints, held-out eval.

    Multi-GPU / multi-node: run under torchrun (torchrun --nproc-per-node N -m kd.cli train ...).
    See kd/stages/train/run.py for the loop and kd/stages/train/checkpoint.py for the run folder.
    """
    options = dict(locals())
    ctx, config_file = options.pop("ctx"), options.pop("config_file")
    from kd.stages.train.run import run

    try:
        summary = run(_resolve("train", ctx, config_file, options))
    except KdError as err:
        _fail(err)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, print once
        typer.echo(json.dumps(summary, indent=2))



# ---------------------------------------------------------------- kd eval
# (the eval command lives in this block)


@app.command("eval")
def eval_(
    ctx: typer.Context,
    config_file: Optional[str] = typer.Option(None, "--config", metavar="FILE", help=_CONFIG_HELP),
    student: str = _eval_opt("student"),
    teacher: str = _eval_opt("teacher"),
    data: str = _eval_opt("data"),
    split: str = _eval_opt("split"),
    limit: Optional[int] = _eval_opt("limit"),
    samples: str = _eval_opt("samples"),
    prompt_field: str = _eval_opt("prompt_field"),
    chat_template: bool = _eval_opt("chat_template", "--chat-template/--no-chat-template"),
    max_prompt_tokens: int = _eval_opt("max_prompt_tokens"),
    temperature: float = _eval_opt("temperature"),
    top_p: float = _eval_opt("top_p"),
    max_new_tokens: int = _eval_opt("max_new_tokens"),
    seed: int = _eval_opt("seed"),
    show: int = _eval_opt("show"),
    out: Optional[str] = _eval_opt("out"),
    device: str = _eval_opt("device"),
    dtype: str = _eval_opt("dtype"),
    batch_size: int = _eval_opt("batch_size"),
    score_batch_tokens: int = _eval_opt("score_batch_tokens"),
    progress: bool = _eval_opt("progress", "--progress/--no-progress"),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
) -> None:
    """Held-out KL(teacher || student) on student and teacher samples, top-1 agreement, perplexities.

    Both models score fresh completions over the full vocabulary (exact, no top-k).
    See kd/stages/eval.py for the definitions.
    """
    options = dict(locals())
    options.pop("as_json")
    ctx, config_file = options.pop("ctx"), options.pop("config_file")
    from kd.stages.eval import format_results, run

    try:
        result = run(_resolve("eval", ctx, config_file, options))
    except KdError as err:
        _fail(err)
    typer.echo(json.dumps(result, indent=2) if as_json else format_results(result))


# ---------------------------------------------------------------- kd report
# (the report command lives in this block)
_REPORT_DEFAULTS = {f.name: f.default for f in fields(ReportConfig)}
_REPORT_HELP = field_docs(ReportConfig)


@app.command("report")
def report(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help=_REPORT_HELP["run_dir"]),
    out: Optional[str] = typer.Option(_REPORT_DEFAULTS["out"], "--out", help=_REPORT_HELP["out"]),
) -> None:
    """Plots (PNG) and report.md for a training run: loss parts, held-out KL, throughput, staleness."""
    config = ReportConfig(run_dir=run_dir, out=out)
    from kd.stages.report import run

    try:
        summary = run(config)
    except KdError as err:
        _fail(err)
    typer.echo(f"wrote {summary['report']}")
    for path in summary["plots"]:
        typer.echo(f"      {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
