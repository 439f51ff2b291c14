"""Remote caches and the multi-writer commit protocol, against a real S3 API (moto on loopback).

What is promised (docs/FORMAT.md, section 6): every command takes an fsspec URL;
credentials come only from the environment and never land in the cache;
training needs only read access; each write attempt has a group of its own and
the commit record is created exclusively, so concurrent writers of one cache never
lose or clobber a shard; transient S3 errors are retried, a run that finally fails
leaves nothing visible and resumes cleanly; ``kd cache gc`` removes only dead
writers' leftovers. Tests marked ``remote`` use the session's moto server
(``moto_server`` / ``s3`` fixtures in conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kd.cli import app
from kd.stages import models
from kd.stages.generate.run import GenerateConfig, generate_shards
from kd.stages.generate.run import run as generate
from kd.stages.train.config import TrainConfig
from kd.stages.train.run import run as train
from kd.storage.batch import SequenceBatch
from kd.storage.cache import LogitCache
from kd.storage.errors import CacheError, FormatVersionError, ShardExistsError
from kd.storage.gc import collect_garbage
from kd.storage.verify import verify_cache

pytestmark = pytest.mark.usefixtures("isolated_datasets_cache", "one_thread")

runner = CliRunner()
FIELDS = ("token_ids", "seq_offsets", "completion_start", "topk_ids", "topk_logprobs", "tail_logprobs",
          "target_logprobs", "source", "round", "prompt_index", "sample_index")


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?"} for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def gen_config(pair, data, out, **kw) -> GenerateConfig:
    base = dict(data=str(data), out=str(out), student=str(pair.student), teacher=str(pair.teacher),
                k=8, shard_size=3, max_new_tokens=6, num_samples=2, progress=False)
    return GenerateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def local_reference(pair, data, tmp_path_factory):
    """The same generate run into a local folder: what every remote run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    generate(gen_config(pair, data, out))
    return out


def read_all(url: str) -> SequenceBatch:
    cache = LogitCache.open(url)
    return SequenceBatch.concat([cache.read_shard(r).read() for r in cache.committed_shards()])


def assert_same_content(a: SequenceBatch, b: SequenceBatch) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(np.isnan(a.behaviour_logprobs), np.isnan(b.behaviour_logprobs))


def all_bytes(fs, root: str) -> bytes:
    return b"".join(fs.cat_file(p) for p in sorted(fs.find(root)))


# Batches the writer subprocesses write; the test rebuilds them from the same (seed, name).
BATCH_CODE = textwrap.dedent('''
    import numpy as np
    from kd.storage.batch import SequenceBatch

    def writer_batch(seed, name):
        rng = np.random.default_rng([seed, sum(map(ord, name))])
        n, k, vocab = 4, 8, 100
        lengths = rng.integers(3, 12, size=n)
        starts = np.array([rng.integers(1, L) for L in lengths], np.int32)
        p = int((lengths - starts).sum())
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(p)]).astype(np.int32)
        probs = rng.dirichlet(np.ones(k + 1), size=p)
        lp = np.sort(np.log(probs[:, :k]), axis=1)[:, ::-1].astype(np.float32)
        return SequenceBatch(
            token_ids=rng.integers(0, vocab, int(lengths.sum())).astype(np.int32),
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), completion_start=starts,
            topk_ids=ids, topk_logprobs=lp, tail_logprobs=np.log(probs[:, k]).astype(np.float32),
            target_logprobs=lp[:, 0].copy(), behaviour_logprobs=np.full(p, np.nan, np.float32),
            source=np.zeros(n, np.uint8), round=np.zeros(n, np.int32),
            prompt_index=np.arange(n, dtype=np.int64), sample_index=np.zeros(n, np.int32))
''')
_ns: dict = {}
exec(BATCH_CODE, _ns)
writer_batch = _ns["writer_batch"]

WRITER = BATCH_CODE + textwrap.dedent('''
    import json, sys, time
    from kd.storage.cache import LogitCache
    from kd.storage.errors import ShardExistsError

    url, names, seed, start_at = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), float(sys.argv[4])
    cache = LogitCache.open(url)
    while time.time() < start_at:  # all writers start together
        time.sleep(0.002)
    out = {}
    for name in names:
        try:
            out[name] = cache.write_shard(name, writer_batch(seed, name), {"writer": seed}).group
        except ShardExistsError:
            out[name] = None
    print(json.dumps(out))
''')


def raw_fingerprint(make_fingerprint):
    from kd.storage.format import CodecConfig

    return make_fingerprint(k=8, vocab_size=100, codec=CodecConfig(name="raw"))


def cache_url(backend: str, tmp_path: Path, request) -> str:
    return str(tmp_path / "c") if backend == "local" else request.getfixturevalue("s3").url + "/c"


BACKENDS = ["local", pytest.param("s3", marks=pytest.mark.remote)]


# ---------------------------------------------------------------- concurrent writers
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=[pytest.mark.remote, pytest.mark.slow])])
@pytest.mark.parametrize("plan", ["disjoint", "same"])
def test_four_concurrent_writers_commit_every_shard_exactly_once(backend, plan, tmp_path, request, make_fingerprint):
    """4 processes on one cache, each shard by one worker (i/4) or all of them by all four
    (misconfigured workers, each with other bytes): every shard is committed once, holds
    exactly its winner's data, and nothing is lost, clobbered or left behind."""
    url = cache_url(backend, tmp_path, request)
    LogitCache.create(url, raw_fingerprint(make_fingerprint))
    names = [f"s{i:02d}" for i in range(8 if backend == "local" else 4)]  # moto shares our GIL: keep it small
    start_at = time.time() + 4.0  # after every interpreter has imported kd
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, url, ",".join(names[w::4] if plan == "disjoint" else names),
                          str(w), str(start_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        for w in range(4)
    ]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        outs.append(json.loads(stdout))
    cache = LogitCache.open(url)
    records = cache.committed_shards()
    assert [r.name for r in records] == names
    for r in records:
        winners = [w for w, out in enumerate(outs) if out.get(r.name) is not None]
        assert len(winners) == 1, (r.name, outs)  # exactly one writer was told it committed
        [w] = winners
        assert outs[w][r.name] == r.group and r.provenance["writer"] == w
        assert_same_content(cache.read_shard(r).read(), writer_batch(w, r.name))
    if plan == "same":
        assert sum(out[n] is None for out in outs for n in names) == 3 * len(names)
    assert cache.shard_groups() == sorted(r.group for r in records)  # losers removed their own groups
    report = verify_cache(url)
    assert report.ok and report.shards_checked == len(names) and not report.leftovers, report.format()


def test_a_writer_that_loses_the_commit_race_discards_only_its_own_group(tmp_path, make_fingerprint, monkeypatch):
    """A slow original passes the 'already committed?' check, then a retry commits first."""
    url = str(tmp_path / "c")
    slow = LogitCache.create(url, raw_fingerprint(make_fingerprint))
    retry = LogitCache.open(url)
    real_commit = LogitCache._commit

    def commit_late(name, payload):
        retry.write_shard(name, writer_batch(1, name), {"writer": 1})
        return real_commit(slow, name, payload)

    monkeypatch.setattr(slow, "_commit", commit_late)
    with pytest.raises(ShardExistsError, match="'s0' was committed in .* by another writer while this one wrote it"):
        slow.write_shard("s0", writer_batch(0, "s0"), {"writer": 0})
    record = retry.load_record("s0")
    assert record.provenance["writer"] == 1
    assert_same_content(retry.read_shard(record).read(), writer_batch(1, "s0"))
    assert retry.shard_groups() == [record.group] and verify_cache(url).ok
    with pytest.raises(ShardExistsError, match="'s0' is already committed"):
        retry.write_shard("s0", writer_batch(2, "s0"), {})


def test_generate_counts_a_lost_race_as_already_committed(pair, data, local_reference, tmp_path, monkeypatch):
    """A rival commits each shard while this run writes it: the run keeps the rival's shards and succeeds."""
    ref = LogitCache.open(str(local_reference))
    url = str(tmp_path / "c")
    rival = LogitCache.create(url, ref.fingerprint)
    real_commit = LogitCache._commit

    def racing_commit(self, name, payload):
        if self is not rival:
            rival.write_shard(name, ref.read_shard(name).read(), ref.load_record(name).provenance)
        return real_commit(self, name, payload)

    monkeypatch.setattr(LogitCache, "_commit", racing_commit)
    summary = generate(gen_config(pair, data, url))
    assert summary["shards_written"] == 0 and summary["shards_already_committed"] == summary["shards_planned"] == 3
    records = LogitCache.open(url).committed_shards()
    assert [r.provenance["created_at"] for r in records] == [r.provenance["created_at"] for r in ref.committed_shards()]
    assert rival.shard_groups() == sorted(r.group for r in records)  # the losers removed their groups
    report = verify_cache(url)
    assert report.ok and not report.leftovers


# ---------------------------------------------------------------- format 2.0 groups, 1.x layout
def test_a_1x_cache_with_data_in_shards_name_stays_readable(tmp_path, make_fingerprint):
    """Rewrite a fresh cache into the 1.0 layout (no group; data in shards/<name>/) and read it."""
    url = tmp_path / "c"
    cache = LogitCache.create(str(url), raw_fingerprint(make_fingerprint))
    record = cache.write_shard("s0", writer_batch(0, "s0"), {})
    (url / "shards" / record.group).rename(url / "shards" / "s0")
    old = record.to_dict()
    old.pop("group")
    old["format_version"] = "1.0"
    old["objects"] = {k.replace(record.group, "s0"): v for k, v in old["objects"].items()}
    (url / "commits" / "s0.json").write_text(json.dumps(old))
    meta = json.loads((url / "zarr.json").read_text())
    meta["attributes"]["kd"]["format_version"] = "1.0"
    (url / "zarr.json").write_text(json.dumps(meta))
    legacy = LogitCache.open(str(url))
    rec = legacy.load_record("s0")
    assert rec.group == "" and rec.group_dir == "shards/s0" and "group" not in rec.to_dict()
    assert_same_content(legacy.read_shard(rec).read(), writer_batch(0, "s0"))
    report = verify_cache(str(url))
    assert report.ok and not report.leftovers
    assert collect_garbage(str(url), older_than=0).removed == []  # the 1.x group is committed


@pytest.mark.parametrize("group, problem", [
    (None, "missing field 'group'"),
    ("../s0.0123456789abcdef0123456789abcdef", "is not a valid group of shard 's0'"),
    ("s1.0123456789abcdef0123456789abcdef", "is not a valid group of shard 's0'"),
    ("s0.0123", "is not a valid group of shard 's0'"),
    ("s0.0123456789ABCDEF0123456789ABCDEF", "is not a valid group of shard 's0'"),
])
def test_a_2x_record_must_name_its_own_group(tmp_path, make_fingerprint, group, problem):
    url = tmp_path / "c"
    cache = LogitCache.create(str(url), raw_fingerprint(make_fingerprint))
    record = cache.write_shard("s0", writer_batch(0, "s0"), {}).to_dict()
    if group is None:
        record.pop("group")
    else:
        record["group"] = group
    (url / "commits" / "s0.json").write_text(json.dumps(record))
    with pytest.raises(CacheError, match=problem.replace("(", r"\(")):
        LogitCache.open(str(url)).load_record("s0")
    assert not verify_cache(str(url)).ok


def test_objects_outside_the_named_group_are_refused(tmp_path, make_fingerprint):
    url = tmp_path / "c"
    cache = LogitCache.create(str(url), raw_fingerprint(make_fingerprint))
    record = cache.write_shard("s0", writer_batch(0, "s0"), {}).to_dict()
    record["objects"]["shards/s0/zarr.json"] = {"size": 1, "sha256": "0" * 64}
    (url / "commits" / "s0.json").write_text(json.dumps(record))
    with pytest.raises(CacheError, match=f"path 'shards/s0/zarr.json' is outside 'shards/{record['group']}/'"):
        LogitCache.open(str(url)).load_record("s0")


def test_a_newer_major_version_is_refused_with_a_message(tmp_path, make_fingerprint):
    url = tmp_path / "c"
    cache = LogitCache.create(str(url), raw_fingerprint(make_fingerprint))
    record = cache.write_shard("s0", writer_batch(0, "s0"), {}).to_dict()
    record["format_version"] = "3.0"
    (url / "commits" / "s0.json").write_text(json.dumps(record))
    with pytest.raises(FormatVersionError, match=r"format_version 3.0 is not readable by this kd \(it reads major "
                                                 r"versions 1 and 2, any minor\). Upgrade kd"):
        LogitCache.open(str(url)).load_record("s0")


# ---------------------------------------------------------------- gc
def _stalled_writer(cache: LogitCache, name: str, monkeypatch):
    """A writer thread that has written its group and waits before its commit; returns (thread, go)."""
    go, written = threading.Event(), threading.Event()
    real_commit = LogitCache._commit
    result = {}

    def slow_commit(n, payload):
        written.set()
        go.wait(60)
        return real_commit(cache, n, payload)

    monkeypatch.setattr(cache, "_commit", slow_commit)

    def work():
        try:
            result["record"] = cache.write_shard(name, writer_batch(5, name), {})
        except Exception as err:  # surfaced by the test
            result["error"] = err

    thread = threading.Thread(target=work)
    thread.start()
    assert written.wait(60)
    return thread, go, result


@pytest.mark.parametrize("backend", BACKENDS)
def test_gc_removes_dead_writers_leftovers_only(backend, tmp_path, request, make_fingerprint, monkeypatch):
    url = cache_url(backend, tmp_path, request)
    cache = LogitCache.create(url, raw_fingerprint(make_fingerprint))
    kept = cache.write_shard("kept", writer_batch(0, "kept"), {})
    dead = LogitCache.open(url)
    monkeypatch.setattr(dead, "_commit", lambda name, payload: (_ for _ in ()).throw(OSError("writer died")))
    with pytest.raises(OSError, match="writer died"):
        dead.write_shard("dead", writer_batch(1, "dead"), {})
    [dead_group] = [g for g in cache.shard_groups() if g.startswith("dead.")]
    garbage = [f"shards/{dead_group}"]
    if backend == "local":  # a local writer that died between its temp file and the link
        Path(cache._root, "commits", f".dead.json.{'a' * 32}.tmp").write_bytes(b"{")
        garbage.insert(0, f"commits/.dead.json.{'a' * 32}.tmp")

    report = collect_garbage(url)  # all younger than the default hour: could be a live writer
    assert report.removed == [] and sorted(report.kept_young) == sorted(garbage)
    later = time.time() + 7200
    dry = collect_garbage(url, dry_run=True, now=later)
    assert sorted(dry.removed) == sorted(garbage) and dead_group in cache.shard_groups()
    report = collect_garbage(url, now=later)
    assert sorted(report.removed) == sorted(garbage) and report.bytes_removed > 0
    assert cache.shard_groups() == [kept.group] and collect_garbage(url, now=later).removed == []
    report = verify_cache(url)
    assert report.ok and report.shards_checked == 1 and not report.leftovers
    assert_same_content(cache.read_shard("kept").read(), writer_batch(0, "kept"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gc_keeps_a_live_writers_group_and_every_committed_shard(backend, tmp_path, request, make_fingerprint,
                                                                 monkeypatch):
    url = cache_url(backend, tmp_path, request)
    cache = LogitCache.create(url, raw_fingerprint(make_fingerprint))
    kept = cache.write_shard("kept", writer_batch(0, "kept"), {})
    live = LogitCache.open(url)
    thread, go, result = _stalled_writer(live, "live", monkeypatch)
    time.sleep(1.5)
    report = collect_garbage(url, older_than=60)  # the live group is ~1.5 s old
    [live_group] = [g for g in cache.shard_groups() if g.startswith("live.")]
    assert report.removed == [] and report.kept_young == [f"shards/{live_group}"]
    everything = collect_garbage(url, older_than=0, now=time.time() + 10**6)  # even with no grace at all ...
    assert f"shards/{kept.group}" not in everything.removed  # ... a committed shard is never garbage
    go.set()
    thread.join(60)
    assert "error" in result or "record" in result
    cache = LogitCache.open(url)
    assert verify_cache(url).shards_checked == len(cache.committed_shard_names())
    assert_same_content(cache.read_shard("kept").read(), writer_batch(0, "kept"))


def test_gc_cli(tmp_path, make_fingerprint):
    url = str(tmp_path / "c")
    LogitCache.create(url, raw_fingerprint(make_fingerprint)).write_shard("kept", writer_batch(0, "kept"), {})
    (tmp_path / "c" / "shards" / f"dead.{'b' * 32}").mkdir()
    (tmp_path / "c" / "shards" / f"dead.{'b' * 32}" / "zarr.json").write_text("{}")
    result = runner.invoke(app, ["cache", "gc", url, "--older-than", "0", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"would remove shards/dead.{'b' * 32}" in result.output
    assert (tmp_path / "c" / "shards" / f"dead.{'b' * 32}").exists()
    result = runner.invoke(app, ["cache", "gc", url, "--older-than", "0", "--json"])
    assert json.loads(result.output)["removed"] == [f"shards/dead.{'b' * 32}"]
    assert not (tmp_path / "c" / "shards" / f"dead.{'b' * 32}").exists()
    result = runner.invoke(app, ["cache", "gc", url, "--older-than", "-1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --older-than: must be a number of seconds >= 0, got -1.0"]
    assert verify_cache(url).ok


# ---------------------------------------------------------------- generate -> s3 -> train, end to end
def train_config(cache: str, out: Path, student: Path) -> TrainConfig:
    return TrainConfig(cache=cache, out=str(out), student=str(student), steps=3, lr=1e-2, warmup=1,
                       batch_tokens=128, eval_every=0, save_every=3, keep=1, loader_workers=1, progress=False)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.mark.remote
def test_generate_to_s3_then_train_from_it_equals_the_local_run(pair, data, local_reference, s3, tmp_path):
    url = s3.url + "/team/cache"
    cfg = gen_config(pair, data, url)
    args = ["generate", "--data", cfg.data, "--out", url, "--student", cfg.student, "--teacher", cfg.teacher,
            "--k", "8", "--shard-size", "3", "--max-new-tokens", "6", "--num-samples", "2", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_same_content(read_all(url), read_all(str(local_reference)))

    result = runner.invoke(app, ["cache", "info", url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["shards"] == 3 and json.loads(result.output)["sequences"] == 16
    result = runner.invoke(app, ["cache", "verify", url])
    assert result.exit_code == 0 and "OK: no problems found" in result.output, result.output

    # nothing in the cache knows the endpoint or the credentials
    stored = all_bytes(s3.fs, f"{s3.bucket}/team/cache")
    for secret in ("kdtestkey", "kdtestsecret", s3.endpoint, s3.endpoint.split("//")[1]):
        assert secret.encode() not in stored, secret

    remote = train(train_config(url, tmp_path / "run-s3", pair.student))
    local = train(train_config(str(local_reference), tmp_path / "run-local", pair.student))
    assert losses(tmp_path / "run-s3") == losses(tmp_path / "run-local") and len(losses(tmp_path / "run-s3")) == 3
    assert remote["weights_sha256"] == local["weights_sha256"]


@pytest.fixture
def read_only_credentials(moto_server, s3, monkeypatch):
    """IAM users on the moto server, enforced: a writer (s3:*) and a reader (Get/List only)."""
    import boto3
    import s3fs
    from moto import settings
    from moto.core.responses import ActionAuthenticatorMixin

    iam = boto3.client("iam")

    def user(name, actions):
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="kd", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    keys = {"writer": user(f"w{s3.bucket}", ["s3:*"]), "reader": user(f"r{s3.bucket}", ["s3:GetObject", "s3:ListBucket"])}

    def use(who):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[who][0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[who][1])
        s3fs.S3FileSystem.clear_instance_cache()

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    yield use
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.remote
def test_training_needs_only_read_access(pair, data, local_reference, s3, read_only_credentials, tmp_path):
    url = s3.url + "/cache"
    read_only_credentials("writer")
    generate(gen_config(pair, data, url))
    read_only_credentials("reader")
    with pytest.raises(CacheError, match="cannot write shard .*(AccessDenied|Access Denied|denied|Forbidden)"):
        generate(gen_config(pair, data, url, round=1))  # the reader really cannot write ...
    assert len(LogitCache.open(url).committed_shard_names()) == 3
    summary = train(train_config(url, tmp_path / "run", pair.student))  # ... yet it trains
    local = train(train_config(str(local_reference), tmp_path / "run-local", pair.student))
    assert summary["weights_sha256"] == local["weights_sha256"]
    result = runner.invoke(app, ["cache", "verify", url])
    assert result.exit_code == 0, result.output


@pytest.mark.remote
def test_a_url_with_a_password_is_refused_without_echoing_it(s3):
    result = runner.invoke(app, ["cache", "info", f"s3://AKIDEXAMPLE:hunter2secret@{s3.bucket}/c"])
    assert result.exit_code == 2
    assert "contains a password" in result.output and "hunter2secret" not in result.output


# ---------------------------------------------------------------- transient and persistent S3 errors
@pytest.mark.remote
@pytest.mark.slow  # ~10-20 s: botocore sleeps up to 2^(n-1) s (full jitter) before retry n
def test_transient_s3_errors_are_retried_and_the_data_is_identical(pair, data, local_reference, s3):
    url = s3.url + "/flaky"
    s3.faults.reset(rate=0.05, seed=1)  # 5% of all requests, writes and reads: HTTP 500
    generate(gen_config(pair, data, url))
    written = s3.faults.injected
    got = read_all(url)
    injected = s3.faults.injected
    s3.faults.reset()
    assert written >= 2 and injected > written, (written, injected)
    assert_same_content(got, read_all(str(local_reference)))
    assert verify_cache(url).ok


@pytest.mark.remote
def test_persistent_s3_errors_fail_clearly_leave_nothing_visible_and_a_rerun_resumes(
        pair, data, local_reference, s3, monkeypatch):
    url = s3.url + "/down"
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")  # the user's retry settings win over kd's
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3.faults.reset(rate=1.0, methods={"PUT"}, key_contains="r0000-p000000003")  # the 2nd shard's uploads
    with pytest.raises(CacheError, match=r"cannot write shard r0000-p000000003-000000006 to s3://.*/down"):
        generate(gen_config(pair, data, url))
    assert s3.faults.injected >= 2
    s3.faults.reset()
    cache = LogitCache.open(url)
    assert cache.committed_shard_names() == ["r0000-p000000000-000000003"]  # no half shard is visible
    assert verify_cache(url).ok
    summary = generate(gen_config(pair, data, url))  # the same command again
    assert summary["shards_already_committed"] == 1 and summary["shards_written"] == 2
    assert_same_content(read_all(url), read_all(str(local_reference)))
    report = collect_garbage(url, older_than=0)
    assert all(p.startswith("shards/r0000-p000000003-000000006.") for p in report.removed)
    report = verify_cache(url)
    assert report.ok and not report.leftovers
