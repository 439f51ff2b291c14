"""Recipes: a YAML file of stage options, read by ``kd train|generate|eval --config FILE``.

A recipe is one YAML mapping. Its top-level keys are ``TrainConfig`` field names
(the ``kd train`` flags with ``_`` for ``-``); two optional blocks hold the other
stages' options, so one file can describe a whole pipeline:

    steps: 30                 # kd train --config FILE reads the top level
    refresh_every: 10
    generate:                 # kd generate --config FILE reads this block
      max_new_tokens: 48
    eval:                     # kd eval --config FILE reads this block
      split: heldout

Precedence, per field: a flag given on the command line, else the recipe, else
the dataclass default. "Given" means typed by the user (click's parameter
source), so ``--steps 1000`` overrides a recipe even when 1000 is the default.
Relative paths in a recipe are relative to the working directory, as flags are.

Checks, all reported at once with the file named: a key that is no field of its
stage (with the closest field name suggested), a value of the wrong type (YAML
``null`` only where the field allows None). YAML 1.1 reads ``3e-4`` as a string;
float fields accept such numeric strings. The values themselves are validated by
the stage's config (``TrainConfig.validate`` etc.) when the stage runs, which does
not touch model paths or files, so a recipe for another machine loads here.

The resolved config (not the recipe) is what the run keeps: ``kd train`` writes
it to ``RUN_DIR/config.json`` and into every checkpoint, and ``--resume`` refuses
a changed value of any field in ``kd.stages.train.config.RESUME_MUST_MATCH``.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from kd.storage.errors import ConfigError

BLOCKS = ("generate", "eval")
"""Top-level keys that hold another stage's options instead of a train field."""


def load_recipe(path: str | Path) -> dict:
    """The recipe at ``path`` as a dict (raises ConfigError naming the file if it cannot be read)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must be a mapping of option names to values, "
                          f"got a {type(data).__name__}")
    return data


def recipe_section(recipe: dict, stage: str) -> dict:
    """The options of ``stage`` ('train', 'generate' or 'eval') in a loaded recipe (unchecked)."""
    if stage == "train":
        return {key: value for key, value in recipe.items() if key not in BLOCKS}
    block = recipe.get(stage, {})
    return block if block is not None else {}


def resolve_config(stage: str, path: str | Path | None, cli_values: dict, given: set[str]):
    """Build the config of ``stage`` ('train', 'generate', 'eval') from the recipe at ``path`` and the CLI.

    ``cli_values`` holds every option's value as the CLI parsed it (defaults included),
    ``given`` the names typed on the command line. Raises ConfigError listing every
    problem in the recipe, or naming a required field that neither source gave.
    """
    cls = stage_classes()[stage]
    names = [f.name for f in fields(cls)]
    recipe = {}
    if path is not None:
        recipe = check_recipe(load_recipe(path), path)[stage]
    values = {}
    for f in fields(cls):
        if f.name in given or f.name not in recipe:
            values[f.name] = cli_values.get(f.name, None if f.default is MISSING else f.default)
        else:
            values[f.name] = recipe[f.name]
    missing = [f.name for f in fields(cls)
               if f.default is MISSING and f.default_factory is MISSING and values.get(f.name) is None]
    if missing:
        where = f" or in {_where(stage, path)}" if path is not None else " (or in a --config file)"
        raise ConfigError("; ".join(f"--{n.replace('_', '-')} is required: give it on the command line{where}"
                                    for n in missing))
    return cls(**{n: values[n] for n in names})


def _where(stage: str, path) -> str:
    return f"{path}" if stage == "train" else f"the '{stage}:' block of {path}"


# ---------------------------------------------------------------- checking a recipe
def stage_classes() -> dict:
    """Stage name -> its config dataclass (imported here: the config modules import no torch)."""
    from kd.stages.eval import EvalConfig
    from kd.stages.generate.run import GenerateConfig
    from kd.stages.train.config import TrainConfig

    return {"train": TrainConfig, "generate": GenerateConfig, "eval": EvalConfig}


def check_recipe(raw: dict, path) -> dict[str, dict]:
    """Every stage's options in a loaded recipe, type-checked: {'train': {...}, 'generate': ..., 'eval': ...}.

    The whole file is checked whichever command reads it, so a typo in the train options
    surfaces at ``kd generate --config`` already. Raises ConfigError listing every problem.
    """
    problems, out = [], {}
    for stage, cls in stage_classes().items():
        section = recipe_section(raw, stage)
        if not isinstance(section, dict):
            problems.append(f"'{stage}:' must be a mapping of {stage} options, got {section!r}")
            out[stage] = {}
            continue
        out[stage] = _check_section(cls, stage, section, problems)
    if problems:
        s = "s" if len(problems) > 1 else ""
        raise ConfigError(f"--config {path}: {len(problems)} problem{s} (top-level keys are kd train options, "
                          "the 'generate:' and 'eval:' blocks those of kd generate and kd eval; "
                          "see `kd COMMAND --help`):\n  - " + "\n  - ".join(problems))
    return out


def _check_section(cls, stage: str, section: dict, problems: list[str]) -> dict:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    prefix = "" if stage == "train" else f"{stage}."
    out = {}
    for key, value in section.items():
        if key not in known:
            candidates = known + (list(BLOCKS) if stage == "train" else [])
            close = difflib.get_close_matches(str(key).replace("-", "_"), candidates, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(f"unknown key '{prefix}{key}'{hint}")
            continue
        ok, coerced, want = _coerce(value, hints[key])
        if ok:
            out[key] = coerced
        else:
            problems.append(f"'{prefix}{key}': expected {want}, got {value!r}")
    return out


def _coerce(value, hint) -> tuple[bool, object, str]:
    """(ok, value, what was wanted) for a YAML value of a field annotated ``hint``."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))
    if optional:
        want += " or null"
    if value is None:
        return optional, None, want
    if base is bool:
        return isinstance(value, bool), value, want
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool), value, want
    if base is float:
        if isinstance(value, bool):
            return False, value, want
        if isinstance(value, (int, float)):
            return True, float(value), want
        if isinstance(value, str):  # YAML 1.1: 3e-4 (no dot) is a string
            try:
                return True, float(value), want
            except ValueError:
                return False, value, want
        return False, value, want
    if base is str:
        return isinstance(value, str), value, want
    return True, value, want
