"""The documentation runs as written: command blocks of README.md and docs/*.md, and docs/cli.md is current.

Every fenced ``bash`` / ``sh`` / ``console`` block is executed with bash (``-euo
pipefail``: any failing command fails the test), block after block in one temporary
working folder per page, which holds links to the repository's data/, recipes/ and
scripts/ and a ``.venv/bin/activate`` that puts this interpreter's ``kd`` first on
PATH. ``KD_HOME`` points at a folder whose "converted default teacher" is a tiny
random Llama (its 6-layer prune is the default student), so ``--teacher default`` /
``--student default`` run offline in seconds; everything else is the command as
printed. A block that cannot run here is preceded by
``<!-- kd-docs: skip (reason) -->``; the reason is required.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kd.stages import models

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = ("bash", "sh", "console")
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*kd-docs:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason, or None to run it

    def commands(self) -> str:
        """The script to run: a console block's `$ ` lines; a bash block as it is."""
        if self.lang != "console":
            return self.code
        return "\n".join(line[2:] for line in self.code.splitlines() if line.startswith("$ "))


def blocks(page: Path) -> list[Block]:
    """Every command block of a markdown page, with the skip marker of the line above it."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if m.group(1) in LANGS:
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(above.strip())
            skip = None if marker is None else (marker.group("reason") or "")
            found.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1 : end]), skip))
        i = end + 1
    return found


def test_pages_have_command_blocks_and_every_skip_says_why():
    all_blocks = [b for page in PAGES for b in blocks(page)]
    assert sum(b.page.name == "README.md" and b.skip is None for b in all_blocks) >= 2
    for block in all_blocks:
        if block.skip is not None:
            assert block.skip.strip(), f"{block.page.name}:{block.line}: kd-docs skip marker without a reason"
    for page in PAGES:  # a marker must sit right above a command block, or it guards nothing
        text = page.read_text().splitlines()
        for n, line in enumerate(text):
            if "kd-docs:" in line:
                assert MARKER.match(line.strip()), f"{page.name}:{n + 1}: malformed marker {line!r}"
                nxt = next((t for t in text[n + 1 :] if t.strip()), "")
                assert FENCE.match(nxt) and FENCE.match(nxt).group(1) in LANGS, f"{page.name}:{n + 1}: dangling marker"


def test_cli_reference_is_generated_from_the_current_cli():
    from kd.cli_docs import render

    current = (ROOT / "docs" / "cli.md").read_text()
    assert current == render(), "docs/cli.md is stale: run `python -m kd.cli_docs > docs/cli.md`"


def test_cli_reference_lists_every_command_and_flag():
    import typer

    from kd.cli import app

    text = (ROOT / "docs" / "cli.md").read_text()
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        subcommands = getattr(command, "commands", {"": command})
        for sub, leaf in subcommands.items():
            path = f"kd {name} {sub}".strip()
            assert f"## `{path}`" in text
            for param in leaf.params:
                for flag in getattr(param, "opts", []):
                    if flag.startswith("--") and flag != "--help":
                        assert f"`{flag}`" in text, (path, flag)


# ---------------------------------------------------------------- running the blocks
@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs-models")
    pair = models.tiny_model_pair(root / "tiny", teacher_layers=8, student_layers=2)
    home = root / "kd-home"
    shutil.copytree(pair.teacher, home / "models" / models.TEACHER_NAME)
    return home


def workdir(tmp: Path) -> Path:
    tmp.mkdir(parents=True)
    for name in ("data", "recipes", "scripts"):
        (tmp / name).symlink_to(ROOT / name)
    (tmp / ".venv" / "bin").mkdir(parents=True)
    (tmp / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    return tmp


def run_block(block: Block, cwd: Path, env: dict) -> None:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.commands()], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (
        f"{block.page.name}:{block.line} exited {proc.returncode}\n--- block\n{block.code}\n"
        f"--- stdout (end)\n{proc.stdout[-3000:]}\n--- stderr (end)\n{proc.stderr[-3000:]}"
    )


RUNNABLE = [page for page in PAGES if any(b.skip is None for b in blocks(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_command_blocks_run_as_written(page, tiny_home, tmp_path):
    # Blocks run in separate shells; a reader runs them in one, after the quickstart's
    # `source .venv/bin/activate`: put this interpreter's `kd` on PATH as that shell has it
    # (scripts/test.sh runs pytest without activating the venv).
    env = dict(os.environ, KD_HOME=str(tiny_home), HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
               OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cwd = workdir(tmp_path / "cwd")
    ran = 0
    for block in blocks(page):
        if block.skip is None:
            run_block(block, cwd, env)
            ran += 1
    assert ran > 0
    if page.name == "README.md":  # the quickstart left what it promises
        assert (cwd / "runs" / "my" / "train" / "report" / "report.md").is_file()
        assert (cwd / "runs" / "my" / "train" / "eval_after.json").is_file()


def test_a_failing_block_fails_the_test(tmp_path):
    """The runner itself: a nonzero exit anywhere in a block is a failure."""
    block = Block(tmp_path / "x.md", 1, "bash", "true\nfalse\necho unreachable", None)
    with pytest.raises(AssertionError, match="x.md:1 exited 1"):
        run_block(block, tmp_path, dict(os.environ))
    console = Block(tmp_path / "x.md", 1, "console", "$ echo hi\nhi\n$ exit 3", None)
    assert console.commands() == "echo hi\nexit 3"
