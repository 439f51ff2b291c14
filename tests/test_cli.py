"""The `kd` command line: help lists every stage, cache tools print and exit as documented."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from kd.cli import app
from kd.storage.cache import LogitCache

runner = CliRunner()


def test_help_lists_the_stages():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "train", "cache"):
        assert command in result.output
    result = runner.invoke(app, ["cache", "--help"])
    assert "info" in result.output and "verify" in result.output


def test_console_script_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "kd.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout


def _cache(tmp_path, make_batch, make_fingerprint):
    url = str(tmp_path / "c")
    cache = LogitCache.create(url, make_fingerprint())
    cache.write_shard("r0000-a", make_batch(np.random.default_rng(0)), {"round": 0, "source": "student", "student_step": 0})
    cache.write_shard("r0001-a", make_batch(np.random.default_rng(1)), {"round": 1, "source": "student", "student_step": 50})
    return url


def test_cache_info_table_and_json(tmp_path, make_batch, make_fingerprint):
    url = _cache(tmp_path, make_batch, make_fingerprint)
    result = runner.invoke(app, ["cache", "info", url])
    assert result.exit_code == 0, result.output
    assert "shards                 2" in result.output and "bytes/token" in result.output
    result = runner.invoke(app, ["cache", "info", url, "--json"])
    info = json.loads(result.output)
    assert info["shards"] == 2 and info["sequences"] == 10 and info["k"] == 8
    assert info["sequences_by_round"] == {"0": 5, "1": 5}
    assert info["bytes_per_token"] > 0


def test_cache_verify_exit_codes(tmp_path, make_batch, make_fingerprint):
    url = _cache(tmp_path, make_batch, make_fingerprint)
    result = runner.invoke(app, ["cache", "verify", url])
    assert result.exit_code == 0 and "OK" in result.output
    chunk = next(p for p in (next((tmp_path / "c" / "shards").glob("r0001-a.*")) / "token_ids").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = runner.invoke(app, ["cache", "verify", url, "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert [p["shard"] for p in report["problems"]] == [f"{url}/shards/r0001-a"]


def test_missing_cache_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["cache", "info", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "error: no logit cache at" in result.output
    assert "Traceback" not in result.output
