"""Recipes: every shipped recipe is valid, ``--config`` precedence, clear errors, resume checks.

The shipped recipes are validated as the stages would validate them (``*.validate()``:
values and combinations, not the existence of models or data on this machine). The
CLI is checked with the stage's ``run`` replaced by a recorder where only the resolved
config matters, and for real (tiny models, CPU) where the run folder and resume matter.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kd.cli import app
from kd.stages import models
from kd.stages.eval import EvalConfig
from kd.stages.generate.run import GenerateConfig
from kd.stages.recipes import load_recipe, resolve_config
from kd.stages.train.config import TrainConfig
from kd.storage.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
runner = CliRunner()


# ---------------------------------------------------------------- the shipped recipes
def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert "cpu-demo.yaml" in names and any("8xgpu" in n for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_for_every_stage(path):
    train = resolve_config("train", path, {}, set())
    generate = resolve_config("generate", path, {}, set())
    evaluate = resolve_config("eval", path, {}, set())
    assert isinstance(train, TrainConfig) and isinstance(generate, GenerateConfig) and isinstance(evaluate, EvalConfig)
    for config in (train, generate, evaluate):
        config.validate()
    raw = load_recipe(path)
    for key, value in raw.items():  # every key of the file reached the config
        if key not in ("generate", "eval"):
            assert getattr(train, key) == value or getattr(train, key) == pytest.approx(float(value)), key
    for key, value in raw.get("generate", {}).items():
        assert getattr(generate, key) == value, key


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_one_consistent_pipeline(path):
    """generate writes the cache train reads, with the teacher train and eval use."""
    train = resolve_config("train", path, {}, set())
    generate = resolve_config("generate", path, {}, set())
    evaluate = resolve_config("eval", path, {}, set())
    assert generate.out == train.cache
    assert generate.teacher == train.teacher == evaluate.teacher
    assert generate.student == train.student
    if train.refresh_every:
        assert train.prompts == generate.data
        assert train.max_staleness is None or train.max_staleness >= train.refresh_every


def test_the_demo_script_runs_every_stage_from_the_cpu_recipe():
    script = (ROOT / "scripts" / "demo.sh").read_text()
    assert "RECIPE=recipes/cpu-demo.yaml" in script
    for command in ("kd eval --config \"$RECIPE\"", "kd generate --config \"$RECIPE\"", "kd train --config \"$RECIPE\""):
        assert command in script
    assert "--lr" not in script and "--batch-tokens" not in script  # sizes and settings live in the recipe


# ---------------------------------------------------------------- errors
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_unknown_keys_and_bad_types_are_all_reported_with_the_file_and_a_suggestion(tmp_path):
    path = write(tmp_path, "cache: c\nout: o\nstpes: 4\nwarmup: soon\nbatch-tokens: 8\n"
                           "generate:\n  max_new_tokns: 3\neval:\n  split: 3\nevl:\n  show: 1\n")
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert result.output == (
        f"error: --config {path}: 6 problems (top-level keys are kd train options, the 'generate:' and "
        "'eval:' blocks those of kd generate and kd eval; see `kd COMMAND --help`):\n"
        "  - unknown key 'stpes' (did you mean 'steps'?)\n"
        "  - 'warmup': expected an integer, got 'soon'\n"
        "  - unknown key 'batch-tokens' (did you mean 'batch_tokens'?)\n"
        "  - unknown key 'evl' (did you mean 'eval'?)\n"
        "  - unknown key 'generate.max_new_tokns' (did you mean 'generate.max_new_tokens'?)\n"
        "  - 'eval.split': expected a string, got 3\n"
    )
    assert not (tmp_path / "o").exists()


def test_the_whole_file_is_checked_whichever_command_reads_it(tmp_path):
    path = write(tmp_path, "stpes: 4\ngenerate:\n  k: 8\n")
    result = runner.invoke(app, ["generate", "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown key 'stpes' (did you mean 'steps'?)" in result.output


@pytest.mark.parametrize("text, message", [
    ("- steps\n", "must be a mapping of option names to values, got a list"),
    ("steps: [1\n", "not valid YAML"),
    ("generate: 3\n", "'generate:' must be a mapping of generate options, got 3"),
    ("lr: null\n", "'lr': expected a number, got None"),
    ("resume: 1\n", "'resume': expected true or false, got 1"),
])
def test_malformed_recipes_name_the_file_and_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        resolve_config("train", path, {}, set())
    assert str(err.value).startswith(f"--config {path}: ") and message in str(err.value)


def test_a_missing_recipe_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: --config {tmp_path / 'nope.yaml'}: cannot read it (")


def test_required_options_come_from_the_command_line_or_the_recipe(tmp_path):
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2
    assert result.output == ("error: --cache is required: give it on the command line (or in a --config file); "
                             "--out is required: give it on the command line (or in a --config file)\n")
    result = runner.invoke(app, ["eval", "--config", str(write(tmp_path, "eval:\n  split: heldout\n"))])
    assert result.exit_code == 2
    assert result.output == (f"error: --student is required: give it on the command line or in the "
                             f"'eval:' block of {tmp_path / 'recipe.yaml'}\n")


def test_yaml_1_1_exponents_without_a_dot_are_numbers(tmp_path):
    config = resolve_config("train", write(tmp_path, "cache: c\nout: o\nlr: 3e-4\nimportance_clip: 2\n"), {}, set())
    assert config.lr == 3e-4 and isinstance(config.lr, float)
    assert config.importance_clip == 2.0 and isinstance(config.importance_clip, float)


# ---------------------------------------------------------------- precedence on the command line
@pytest.fixture
def recorded(monkeypatch):
    """Replace each stage's run() by a recorder of the config it gets."""
    import kd.stages.eval
    import kd.stages.generate.run
    import kd.stages.train.run

    seen = {}

    def recorder(stage, result):
        def run(config, *args, **kwargs):
            seen[stage] = config
            return result
        return run

    monkeypatch.setattr(kd.stages.train.run, "run", recorder("train", {"step": 0}))
    monkeypatch.setattr(kd.stages.generate.run, "run", recorder("generate", {"sequences": 0}))
    monkeypatch.setattr(kd.stages.eval, "run", recorder("eval", {}))
    monkeypatch.setattr(kd.stages.eval, "format_results", lambda result: "")
    return seen


def test_flags_typed_on_the_command_line_override_the_recipe_even_when_equal_to_the_default(tmp_path, recorded):
    path = write(tmp_path, "cache: c\nout: o\nsteps: 5\nlr: 1.0e-3\nwarmup: 2\nprogress: false\n"
                           "generate:\n  k: 8\n  limit: 4\neval:\n  student: s\n  show: 2\n")
    default_steps = TrainConfig.__dataclass_fields__["steps"].default
    result = runner.invoke(app, ["train", "--config", str(path), "--steps", str(default_steps), "--progress",
                                 "--out", "elsewhere"])
    assert result.exit_code == 0, result.output
    config = recorded["train"]
    assert (config.steps, config.progress, config.out) == (default_steps, True, "elsewhere")  # the flags
    assert (config.lr, config.warmup, config.cache) == (1e-3, 2, "c")  # the recipe
    assert config.loss == TrainConfig.__dataclass_fields__["loss"].default  # neither: the default

    assert runner.invoke(app, ["generate", "--config", str(path), "-k", "16"]).exit_code == 0
    assert (recorded["generate"].k, recorded["generate"].limit) == (16, 4)
    assert runner.invoke(app, ["eval", "--config", str(path), "--student", "t"]).exit_code == 0
    assert (recorded["eval"].student, recorded["eval"].show) == ("t", 2)


def test_without_a_recipe_the_flags_and_defaults_make_the_config(recorded):
    result = runner.invoke(app, ["train", "--cache", "c", "--out", "o", "--lr", "0.5"])
    assert result.exit_code == 0, result.output
    assert recorded["train"] == TrainConfig(cache="c", out="o", lr=0.5)


# ---------------------------------------------------------------- the run folder and resume, for real
@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A tiny pair and a cache of its student's samples, written by `kd generate --config`."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("recipe-run")
    pair = models.tiny_model_pair(root / "pair")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i} words about the number {i * 7}."}) + "\n"
                            for i in range(24)))
    recipe = {
        "cache": str(root / "cache"), "out": str(root / "run"), "student": str(pair.student), "steps": 3,
        "lr": 1e-3, "warmup": 1, "batch_tokens": 512, "heldout_fraction": 0.25, "eval_every": 0,
        "save_every": 2, "loader_workers": 0, "progress": False, "device": "cpu",
        "generate": {"data": str(data), "out": str(root / "cache"), "student": str(pair.student),
                     "teacher": str(pair.teacher), "max_new_tokens": 6, "k": 8, "shard_size": 8,
                     "progress": False, "device": "cpu"},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["generate", "--config", str(path)])
    assert result.exit_code == 0, result.output
    return root, path, recipe


def test_the_resolved_config_is_saved_and_resume_refuses_a_changed_recipe(tiny_cache):
    root, path, recipe = tiny_cache
    result = runner.invoke(app, ["train", "--config", str(path), "--steps", "2"])
    assert result.exit_code == 0, result.output
    saved = json.loads((root / "run" / "config.json").read_text())
    expected = asdict(resolve_config("train", path, {"steps": 2}, {"steps"}))
    expected.update(device="cpu", dtype="float32")  # the run records what "auto" resolved to
    assert saved == expected

    # the recipe is edited: a value that changes the experiment is refused on resume, naming both values
    changed = root / "changed.yaml"
    changed.write_text(yaml.safe_dump({**recipe, "lr": 2e-3}))
    result = runner.invoke(app, ["train", "--config", str(changed), "--resume"])
    assert result.exit_code == 2
    assert "--lr: checkpoint has 0.001, this run 0.002" in result.output
    assert json.loads((root / "run" / "config.json").read_text()) == saved  # nothing overwritten

    # a value that may change on resume (the total steps) is accepted
    result = runner.invoke(app, ["train", "--config", str(path), "--resume"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["resumed_from"] == 2 and summary["step"] == 3
    assert json.loads((root / "run" / "config.json").read_text())["steps"] == 3
