"""The `kd` command line: options in, one frozen config per stage, one ``run(config)`` call.

No logic lives here. Each command maps its flags one-to-one onto the fields of
its stage's config dataclass (whose docstrings are the help texts), and errors
from kd's own hierarchy (``KdError``) are printed as one clear line, exit 2.

    kd generate ...        stage one: samples + teacher top-k -> cache shards
    kd train ...           stage two: cache -> divergence loss -> student checkpoints
    kd cache info|verify   inspect and check a logit cache
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from kd.storage.errors import KdError

app = typer.Typer(
    name="kd",
    help="Knowledge distillation around a cached, compressed teacher top-k logit store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect and check a logit cache (local path or fsspec URL).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


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


# ---------------------------------------------------------------- kd generate
# (the generate command lives in this block)


# ---------------------------------------------------------------- kd train
# (the train command lives in this block)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
