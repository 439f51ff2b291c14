"""The README's first command, scripts/demo.sh, run as a script at a tiny size.

The demo's stages (eval before -> generate -> train with refresh -> eval after ->
report -> summary) run exactly as a user runs them, through ``bash scripts/demo.sh``
and the ``kd`` console script, with two substitutions that keep it offline and fast:

* ``KD_HOME`` points at a temporary folder whose "converted default teacher" is a
  tiny random Llama (``tiny_model_pair``, 8 layers, byte tokenizer), so
  ``--teacher default`` / ``--student default`` resolve to it and to its 6-layer
  prune, built on first use exactly as for the real teacher;
* ``KD_DEMO_*`` shrink the sizes; ``KD_DEMO_SKIP_SETUP=1`` uses this interpreter's
  environment instead of building .venv.

Everything else (the recipe recipes/cpu-demo.yaml, the flags, the summary script)
is the real thing, so the test also pins that demo.sh trains with the recipe.
Seven ``kd`` processes start (each imports torch and transformers): about a minute
of CPU, hence ``slow`` (scripts/test.sh runs slow tests too).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd.stages import models

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZES = {"KD_DEMO_PROMPTS": "16", "KD_DEMO_STEPS": "4", "KD_DEMO_REFRESH_EVERY": "2",
         "KD_DEMO_REFRESH_PROMPTS": "4", "KD_DEMO_EVAL_PROMPTS": "3", "KD_DEMO_NEW_TOKENS": "8"}


def tiny_kd_home(root: Path) -> Path:
    """A KD_HOME whose default teacher is a tiny random 8-layer Llama (the student is pruned from it)."""
    pair = models.tiny_model_pair(root / "tiny", teacher_layers=8, student_layers=2)
    home = root / "kd-home"
    shutil.copytree(pair.teacher, home / "models" / models.TEACHER_NAME)  # keeps kd's marker file
    return home


def demo_env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(SIZES)
    env.update(KD_HOME=str(tiny_kd_home(tmp_path)), KD_DEMO_SKIP_SETUP="1", KD_DEMO_DIR=str(tmp_path / "demo"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=demo_env(tmp), cwd=tmp,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "demo", proc.stdout


def test_demo_runs_every_stage_in_order(demo):
    _, out = demo
    stages = [int(m) for m in re.findall(r"^== (\d)/6", out, flags=re.M)]
    assert stages == [1, 2, 3, 4, 5, 6]


def test_demo_trains_with_the_recipe_plus_only_the_size_overrides(demo):
    run, _ = demo
    recipe = yaml.safe_load((ROOT / "recipes" / "cpu-demo.yaml").read_text())
    saved = json.loads((run / "train" / "config.json").read_text())
    overridden = {"steps": 4, "refresh_every": 2, "eval_every": 2, "save_every": 2, "refresh_prompts": 4,
                  "max_new_tokens": 8, "cache": str(run / "cache"), "out": str(run / "train")}
    for key, value in recipe.items():
        if key in ("generate", "eval"):
            continue
        want = overridden.get(key, value)
        assert saved[key] == pytest.approx(want) if isinstance(want, float) else saved[key] == want, key
    assert saved["lr"] == pytest.approx(3e-4) and saved["batch_tokens"] == 1024  # from the recipe, not defaults
    before = json.loads((run / "eval_before.json").read_text())["config"]
    assert before["split"] == recipe["eval"]["split"] and before["show"] == recipe["eval"]["show"]
    assert before["limit"] == 3 and before["max_new_tokens"] == 8


def test_demo_eval_results_are_finite_and_the_student_changed(demo):
    run, _ = demo
    before = json.loads((run / "eval_before.json").read_text())
    after = json.loads((run / "eval_after.json").read_text())
    assert before["student_step"] is None or before["student_step"] == 0
    assert after["student_step"] == 4
    for result in (before, after):
        for samples in ("student_samples", "teacher_samples"):
            part = result[samples]
            for key in ("kl", "top1", "student_nll", "student_ppl", "teacher_nll", "teacher_ppl"):
                assert math.isfinite(part[key]), (samples, key)
            assert part["kl"] >= 0 and 0 <= part["top1"] <= 1 and part["positions"] > 0
        assert len(result["examples"]) == 3
    # trained weights score the same held-out samples differently (teacher samples are seeded, so identical)
    assert after["teacher_samples"]["kl"] != before["teacher_samples"]["kl"]


def test_demo_refreshes_and_logs_them(demo):
    run, _ = demo
    records = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    refreshes = [r for r in records if r.get("kind") == "refresh"]
    assert [r["round"] for r in refreshes] == [1, 2]  # before steps 0 and 2 of 4
    assert all(r["sequences"] == 4 for r in refreshes)


def test_demo_report_has_valid_pngs_and_the_summary_has_numbers(demo):
    import matplotlib.image

    run, out = demo
    report = run / "train" / "report"
    pngs = sorted(report.glob("*.png"))
    assert len(pngs) >= 4
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # decodes, not blank
        assert f"]({png.name})" in (report / "report.md").read_text()
    assert f"report: {run / 'train' / 'report' / 'report.md'}" in out
    rows = re.findall(r"^(KL\(teacher \|\| student\)|top-1 agreement) on (student|teacher) samples\s+"
                      r"(\d+\.\d{4})\s+(\d+\.\d{4})$", out, flags=re.M)
    assert len(rows) == 4
    after = json.loads((run / "eval_after.json").read_text())
    kl_student = next(r for r in rows if r[0].startswith("KL") and r[1] == "student")
    assert float(kl_student[3]) == pytest.approx(after["student_samples"]["kl"], abs=1e-4)
    assert out.count("  student after ") == 3
