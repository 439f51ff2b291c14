"""`kd cache ls|copy|merge|export|import` and the format's compatibility promise.

Caches are tiny random ones (conftest ``make_batch``); remote stores are fsspec's
``memory://`` and a fault-injecting subclass of it (``faulty://``) that fails
after N writes or damages what is read back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from typer.testing import CliRunner

from kd.cli import app
from kd.storage import exchange, tools
from kd.storage.cache import LogitCache
from kd.storage.errors import CacheError
from kd.storage.format import CodecConfig
from kd.storage.verify import verify_cache

runner = CliRunner()
BATCH_FIELDS = ("token_ids", "seq_offsets", "completion_start", "topk_ids", "topk_logprobs", "tail_logprobs",
                "target_logprobs", "behaviour_logprobs", "source", "round", "prompt_index", "sample_index")


def _make_cache(url, make_batch, make_fingerprint, names, seed=0, codec=None, k=8, **fp):
    cache = LogitCache.create(str(url), make_fingerprint(k=k, codec=codec, **fp))
    for i, name in enumerate(names):
        cache.write_shard(name, make_batch(np.random.default_rng(seed + i), num_sequences=6, k=k),
                          {"round": i % 2, "source": "student", "student_step": 10 * i,
                           "created_at": f"2025-01-0{i + 1}"})
    return cache


def _shards(url) -> dict:
    """{name: decoded batch} of every committed shard."""
    cache = LogitCache.open(str(url))
    return {r.name: cache.read_shard(r).read() for r in cache.committed_shards()}


def _assert_same(a, b, where=""):
    for name in BATCH_FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{where} {name}")


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _summary(output: str) -> dict:
    """The `key  value` lines a cache command prints, as {key: value string}."""
    return dict(line.split(None, 1) for line in output.strip().splitlines())


class FaultyFS(MemoryFileSystem):
    """memory:// with injected faults: fail once ``writes_left`` write-opens are used up; damage reads of
    paths containing all of ``damage_reads`` (a byte flipped: a transfer that went wrong)."""

    protocol = ("faulty",)
    store: dict = {}
    pseudo_dirs = [""]
    writes_left: int | None = None
    damage_reads: tuple[str, ...] = ()

    def _open(self, path, mode="rb", **kwargs):
        if any(c in mode for c in "wxa"):
            if FaultyFS.writes_left is not None:
                if FaultyFS.writes_left <= 0:
                    raise ConnectionError(f"injected failure writing {path}")
                FaultyFS.writes_left -= 1
        elif FaultyFS.damage_reads and all(d in path for d in FaultyFS.damage_reads):
            data = bytearray(super().cat_file(path))
            data[len(data) // 2] ^= 0xFF
            return MemoryFile(None, path, bytes(data))
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def faulty():
    fsspec.register_implementation("faulty", FaultyFS, clobber=True)
    FaultyFS.store.clear()
    FaultyFS.writes_left, FaultyFS.damage_reads = None, ()
    yield FaultyFS
    FaultyFS.store.clear()
    FaultyFS.writes_left, FaultyFS.damage_reads = None, ()


@pytest.fixture
def memory():
    MemoryFileSystem.store.clear()
    yield "memory://kd-test"
    MemoryFileSystem.store.clear()


# ---------------------------------------------------------------- ls
def test_ls_lists_committed_shards_with_provenance(tmp_path, make_batch, make_fingerprint, monkeypatch):
    url = tmp_path / "c"
    cache = _make_cache(url, make_batch, make_fingerprint, ["r0000-a", "r0001-b"])
    def die(*args):
        raise OSError("killed before the commit")

    monkeypatch.setattr(LogitCache, "_commit", die)  # a writer that dies before committing
    with pytest.raises(OSError):
        cache.write_shard("r0002-dead", make_batch(np.random.default_rng(9)), {"round": 2})
    monkeypatch.undo()
    result = runner.invoke(app, ["cache", "ls", str(url)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["shard", "round", "source", "sequences", "tokens", "positions", "bytes", "step",
                                "created"]
    records = {r.name: r for r in cache.committed_shards()}
    for line, name, step in zip(lines[1:3], ["r0000-a", "r0001-b"], ["0", "10"], strict=True):
        r = records[name]
        assert line.split() == [name, name[4], "student", "6", f"{r.num_tokens:,}", f"{r.num_positions:,}",
                                f"{cache.object_bytes(r):,}", step, f"2025-01-0{int(name[4]) + 1}"]
    assert "r0002-dead" not in result.output and lines[3].startswith("2 committed shard(s)")
    rows = json.loads(runner.invoke(app, ["cache", "ls", str(url), "--json"]).output)
    assert [r["name"] for r in rows] == ["r0000-a", "r0001-b"]
    assert rows[1]["student_step"] == 10 and rows[1]["sequences"] == 6
    assert rows[0]["bytes"] == cache.object_bytes(records["r0000-a"])
    _one_line_error(runner.invoke(app, ["cache", "ls", str(tmp_path / "nope")]), "no logit cache at")


# ---------------------------------------------------------------- copy
def test_copy_local_to_remote_and_back_is_exact_and_resumable(tmp_path, make_batch, make_fingerprint, memory):
    src = tmp_path / "src"
    _make_cache(src, make_batch, make_fingerprint, ["s0", "s1", "s2"])
    mid, back = f"{memory}/mid", tmp_path / "back"
    result = runner.invoke(app, ["cache", "copy", str(src), mid, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _summary(result.output)["copied_shards"] == "3"
    assert tools.copy_cache(mid, str(back), progress=False)["copied_shards"] == 3
    expected, got = _shards(src), _shards(back)
    assert got.keys() == expected.keys()
    for name in expected:
        _assert_same(got[name], expected[name], name)
    assert verify_cache(mid).ok and verify_cache(str(back)).ok
    assert LogitCache.open(str(back)).fingerprint == LogitCache.open(str(src)).fingerprint
    # the commit records are copied as stored, but for the group (a fresh one per copy) and the paths naming it
    for name in expected:
        a, b = (json.loads((c / "commits" / f"{name}.json").read_text()) for c in (src, back))
        assert a.pop("group") != b.pop("group")
        assert sorted(a.pop("objects").values(), key=str) == sorted(b.pop("objects").values(), key=str)
        assert a == b
    # a rerun copies nothing; a new source shard is added alone
    LogitCache.open(str(src)).write_shard("s3", make_batch(np.random.default_rng(7)), {})
    summary = tools.copy_cache(str(src), str(back), progress=False)
    assert (summary["copied_shards"], summary["skipped_shards"]) == (1, 3)


def test_copy_refuses_a_destination_with_another_fingerprint(tmp_path, make_batch, make_fingerprint):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_cache(src, make_batch, make_fingerprint, ["s0"], k=8)
    _make_cache(dst, make_batch, make_fingerprint, ["d0"], k=4)
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    line = _one_line_error(runner.invoke(app, ["cache", "copy", str(src), str(dst)]), "k: 4 vs 8", str(dst), str(src))
    assert "destination" in line and "source" in line
    assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before


def test_copy_leaves_shards_with_bad_checksums_uncommitted(tmp_path, make_batch, make_fingerprint, faulty):
    src = tmp_path / "src"
    _make_cache(src, make_batch, make_fingerprint, ["s0", "s1", "s2"])
    # damaged in the source: a flipped byte in s1's token ids
    group = src / LogitCache.open(str(src)).load_record("s1").group_dir
    chunk = next(p for p in (group / "token_ids").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"1 shard\(s\) failed their checksums.*shard s1: source object "
                                         r"shards/s1\.[0-9a-f]{32}/token_ids/.* but its commit record says") as err:
        tools.copy_cache(str(src), "faulty://dst", progress=False)
    assert "(2 other(s) were)" in str(err.value)
    assert LogitCache.open("faulty://dst").committed_shard_names() == ["s0", "s2"]
    # damaged in transit: what arrives at the destination does not hash to the record
    FaultyFS.damage_reads = ("shards/s0.", "/topk_codes/")
    with pytest.raises(CacheError, match=r"shard s0: object shards/s0\.[0-9a-f]{32}/topk_codes/.* arrived damaged"):
        tools.copy_cache(str(src), "faulty://dst2", progress=False)
    assert LogitCache.open("faulty://dst2").committed_shard_names() == ["s2"]


def test_copy_resumes_after_injected_write_failures(tmp_path, make_batch, make_fingerprint, faulty):
    src = tmp_path / "src"
    _make_cache(src, make_batch, make_fingerprint, ["s0", "s1", "s2", "s3"])
    objects = len(LogitCache.open(str(src)).load_record("s0").objects)
    LogitCache.create("faulty://dst", LogitCache.open(str(src)).fingerprint)
    FaultyFS.writes_left = 2 * (objects + 1) + objects // 2  # two shards and their records, then half of one
    with pytest.raises(CacheError, match=r"stopped at shard s2 .*ConnectionError: injected failure.*"
                                         r"2 shard\(s\) were committed before\. Rerun the same command to resume"):
        tools.copy_cache(str(src), "faulty://dst", progress=False)
    dst = LogitCache.open("faulty://dst")
    assert dst.committed_shard_names() == ["s0", "s1"]
    [leftover] = verify_cache("faulty://dst").leftovers  # the half-copied shard: invisible
    assert leftover.startswith("faulty://dst/shards/s2.")
    FaultyFS.writes_left = None
    summary = tools.copy_cache(str(src), "faulty://dst", progress=False)
    assert (summary["copied_shards"], summary["skipped_shards"]) == (2, 2)
    expected, got = _shards(src), _shards("faulty://dst")
    assert got.keys() == expected.keys()
    for name in expected:
        _assert_same(got[name], expected[name], name)
    assert verify_cache("faulty://dst").ok


def test_copy_killed_mid_way_resumes(tmp_path, make_batch, make_fingerprint):
    """SIGKILL a real `kd cache copy` process (slowed down per object) and rerun it."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    names = [f"s{i}" for i in range(5)]
    _make_cache(src, make_batch, make_fingerprint, names)
    script = textwrap.dedent(f"""
        import sys, time
        from kd.storage import tools
        real = tools._stream
        def slow(*args, **kwargs):
            time.sleep(0.04)
            return real(*args, **kwargs)
        tools._stream = slow
        from kd.cli import main
        sys.argv = ["kd", "cache", "copy", {str(src)!r}, {str(dst)!r}, "--no-progress"]
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (dst / "commits").exists() and any(not p.name.startswith(".") for p in (dst / "commits").iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = LogitCache.open(str(dst)).committed_shard_names()
    assert 1 <= len(committed) < len(names)
    assert verify_cache(str(dst)).ok
    result = runner.invoke(app, ["cache", "copy", str(src), str(dst), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert summary["skipped_shards"] == str(len(committed))
    assert summary["copied_shards"] == str(len(names) - len(committed))
    expected, got = _shards(src), _shards(dst)
    assert got.keys() == expected.keys()
    for name in names:
        _assert_same(got[name], expected[name], name)
    assert verify_cache(str(dst)).ok


# ---------------------------------------------------------------- merge
@pytest.mark.parametrize("change, difference", [
    ({"k": 4}, "k: 8 vs 4"),
    ({"tok": "f" * 64}, "tokenizer: tiny-tok (vocab 100, aaaaaaaaaaaa) vs tiny-tok (vocab 100, ffffffffffff)"),
    ({"codec": CodecConfig(name="raw")}, "codec: {'name': 'sqrtq'"),
])
def test_merge_refuses_caches_with_different_fingerprints(tmp_path, make_batch, make_fingerprint, change, difference):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _make_cache(a, make_batch, make_fingerprint, ["s0"])
    _make_cache(b, make_batch, make_fingerprint, ["s1"], **change)
    _one_line_error(runner.invoke(app, ["cache", "merge", str(a), str(b), "--out", str(out)]),
                    f"cannot merge {a} and {b}: their fingerprints differ", difference)
    assert not out.exists()
    # an existing output is left as it was
    _make_cache(out, make_batch, make_fingerprint, ["o0"], seed=5)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _one_line_error(runner.invoke(app, ["cache", "merge", str(a), str(b), "--out", str(out)]), difference)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_merge_combines_caches_sequence_by_sequence(tmp_path, make_batch, make_fingerprint, memory):
    a, b, out = tmp_path / "a", f"{memory}/b", tmp_path / "out"
    _make_cache(a, make_batch, make_fingerprint, ["r0000-p000000000-000000006", "r0000-p000000006-000000012"])
    tools.copy_cache(str(a), b, progress=False)  # b shares a's shards byte for byte ...
    cache_b = LogitCache.open(b)
    cache_b.write_shard("r0001-p000000000-000000006", make_batch(np.random.default_rng(40), num_sequences=6),
                        {"round": 1})
    result = runner.invoke(app, ["cache", "merge", str(a), b, "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert (summary["copied_shards"], summary["skipped_shards"]) == ("3", "2")  # ... copied once
    merged, from_a, from_b = _shards(out), _shards(a), _shards(b)
    assert sorted(merged) == sorted(from_a.keys() | from_b.keys())
    for name, batch in {**from_a, **from_b}.items():
        _assert_same(merged[name], batch, name)
        for i in range(batch.num_sequences):  # sequence by sequence, through the partial reader too
            _assert_same(LogitCache.open(str(out)).read_shard(name).read(i, i + 1), batch.select([i]), f"{name}[{i}]")
    assert verify_cache(str(out)).ok


def test_merge_name_collisions_with_different_content(tmp_path, make_batch, make_fingerprint):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _make_cache(a, make_batch, make_fingerprint, ["r0000-p000000000-000000006", "shared"])
    _make_cache(b, make_batch, make_fingerprint, ["r0000-p000000000-000000006"], seed=100)  # other data, same name
    line = _one_line_error(runner.invoke(app, ["cache", "merge", str(a), str(b), "--out", str(out)]),
                           "1 shard name(s) appear in several inputs with different content",
                           f"r0000-p000000000-000000006 ({b})", "nothing was written", "--on-conflict rename")
    assert "shared" not in line and not out.exists()
    result = runner.invoke(app, ["cache", "merge", str(a), str(b), "--out", str(out), "--on-conflict", "rename",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _summary(result.output)["renamed_shards"] == "['r0000-p000000000-000000006.m2']"
    merged = _shards(out)
    assert sorted(merged) == ["r0000-p000000000-000000006", "r0000-p000000000-000000006.m2", "shared"]
    _assert_same(merged["r0000-p000000000-000000006"], _shards(a)["r0000-p000000000-000000006"])
    _assert_same(merged["r0000-p000000000-000000006.m2"], _shards(b)["r0000-p000000000-000000006"])
    assert verify_cache(str(out)).ok
    # rerunning the merge finds everything in place
    summary = tools.merge_caches([str(a), str(b)], str(out), on_conflict="rename", progress=False)
    assert (summary["copied_shards"], summary["skipped_shards"]) == (0, 3)


# ---------------------------------------------------------------- export
def _expected_rows(url):
    """Rows as the export promises them: the reader's decoded values, top-k by descending log-prob."""
    rows = []
    cache = LogitCache.open(str(url))
    for record in cache.committed_shards():
        batch = cache.read_shard(record).read()
        po = batch.pos_offsets
        for i in range(batch.num_sequences):
            lo, hi = po[i], po[i + 1]
            order = np.argsort(-batch.topk_logprobs[lo:hi], axis=1, kind="stable")
            rows.append({
                "input_ids": batch.sequence_tokens(i),
                "completion_start": int(batch.completion_start[i]),
                "topk_ids": np.take_along_axis(batch.topk_ids[lo:hi], order, 1),
                "topk_logprobs": np.take_along_axis(batch.topk_logprobs[lo:hi], order, 1),
                "tail_logprob": batch.tail_logprobs[lo:hi],
                "target_logprob": batch.target_logprobs[lo:hi],
                "behaviour_logprob": batch.behaviour_logprobs[lo:hi],
                "source": ["dataset", "teacher", "student"][batch.source[i]],
                "round": int(batch.round[i]), "prompt_index": int(batch.prompt_index[i]),
                "sample_index": int(batch.sample_index[i]), "shard": record.name,
            })
    return rows


def _check_rows(dataset, expected):
    assert len(dataset) == len(expected)
    for row, want in zip(dataset, expected, strict=True):
        np.testing.assert_array_equal(row["input_ids"], want["input_ids"])
        assert row["completion_start"] == want["completion_start"]
        np.testing.assert_array_equal(row["loss_mask"], np.arange(len(want["input_ids"])) >= want["completion_start"])
        k = want["topk_ids"].shape[1]
        np.testing.assert_array_equal(np.asarray(row["topk_ids"]).reshape(-1, k), want["topk_ids"])
        np.testing.assert_array_equal(np.asarray(row["topk_logprobs"], np.float32).reshape(-1, k),
                                      want["topk_logprobs"])
        for name in ("tail_logprob", "target_logprob"):
            np.testing.assert_array_equal(np.asarray(row[name], np.float32), want[name])
        behaviour = np.array([np.nan if v is None else v for v in row["behaviour_logprob"]], np.float32)
        np.testing.assert_array_equal(behaviour, want["behaviour_logprob"])  # null <=> NaN in the cache
        for name in ("source", "round", "prompt_index", "sample_index", "shard"):
            assert row[name] == want[name], name


@pytest.mark.parametrize("codec", [CodecConfig(), CodecConfig(name="raw")], ids=["sqrtq", "raw"])
def test_export_parquet_reads_back_through_datasets(tmp_path, make_batch, make_fingerprint, codec, monkeypatch):
    import datasets

    url = tmp_path / "c"
    _make_cache(url, make_batch, make_fingerprint, ["s0", "s1"], codec=codec)
    monkeypatch.setattr(exchange, "ROW_GROUP_POSITIONS", 40)  # several row groups per shard
    out = tmp_path / "export.parquet"
    result = runner.invoke(app, ["cache", "export", str(url), "--format", "parquet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert pq.ParquetFile(out).metadata.num_row_groups >= 4
    assert json.loads(pq.read_schema(out).metadata[b"kd"])["fingerprint"]["k"] == 8
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    _check_rows(ds, _expected_rows(url))
    _one_line_error(runner.invoke(app, ["cache", "export", str(url), "--out", str(out)]), "already exists")


def test_export_hf_dataset_folder_loads_by_name(tmp_path, make_batch, make_fingerprint):
    import datasets

    url = tmp_path / "c"
    _make_cache(url, make_batch, make_fingerprint, ["s0", "s1", "s2"])
    out = tmp_path / "ds"
    summary = exchange.export_cache(str(url), str(out), "hf-dataset")
    assert summary["rows"] == 18 and len(list((out / "data").glob("*.parquet"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left over
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    _check_rows(ds, _expected_rows(url))


def test_export_then_import_is_lossless_for_raw(tmp_path, make_batch, make_fingerprint):
    url = tmp_path / "c"
    _make_cache(url, make_batch, make_fingerprint, ["s0", "s1"], codec=CodecConfig(name="raw"))
    exchange.export_cache(str(url), str(tmp_path / "e.parquet"))
    result = runner.invoke(app, ["cache", "import", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "back"),
                                 "--teacher-name", "tiny-teacher", "--teacher-sha256", "b" * 64,
                                 "--tokenizer-sha256", "a" * 64, "--vocab-size", "100", "--codec", "raw",
                                 "--shard-size", "4"])
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert (summary["shards_written"], summary["sequences"]) == ("3", "12")
    back = LogitCache.open(str(tmp_path / "back"))
    assert back.fingerprint.teacher.weights_sha256 == "b" * 64 and back.fingerprint.k == 8
    original = [b for b in LogitCache.open(str(url)).iter_batches()]
    from kd.storage.batch import SequenceBatch

    want, got = SequenceBatch.concat(original), SequenceBatch.concat(list(back.iter_batches()))
    for name in BATCH_FIELDS:
        if name in ("topk_ids", "topk_logprobs"):  # export sorts by descending log-prob: compare by id
            continue
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    og, ow = np.argsort(got.topk_ids, 1), np.argsort(want.topk_ids, 1)
    np.testing.assert_array_equal(np.take_along_axis(got.topk_ids, og, 1), np.take_along_axis(want.topk_ids, ow, 1))
    np.testing.assert_array_equal(np.take_along_axis(got.topk_logprobs, og, 1),
                                  np.take_along_axis(want.topk_logprobs, ow, 1))
    provenance = back.committed_shards()[0].provenance
    assert provenance["imported"]["file"] == "e.parquet" and provenance["imported"]["rows"] == [0, 4]
    # importing the same file again skips what is there
    again = exchange.import_parquet(exchange.ImportConfig(
        files=(str(tmp_path / "e.parquet"),), out=str(tmp_path / "back"), teacher_name="tiny-teacher",
        teacher_sha256="b" * 64, tokenizer_sha256="a" * 64, vocab_size=100, codec="raw", shard_size=4))
    assert (again["shards_written"], again["shards_skipped"]) == (0, 3)


# ---------------------------------------------------------------- import: bad input
def _good_table(rng, n=5, k=4, vocab=100):
    rows = {"input_ids": [], "completion_start": [], "topk_ids": [], "topk_logprobs": []}
    for _ in range(n):
        length = int(rng.integers(4, 12))
        start = int(rng.integers(1, length))
        rows["input_ids"].append(rng.integers(0, vocab, length).tolist())
        rows["completion_start"].append(start)
        ids = [rng.choice(vocab, k, replace=False).tolist() for _ in range(length - start)]
        lps = [np.log(np.sort(rng.dirichlet(np.ones(k + 1)))[::-1][:k]).tolist() for _ in range(length - start)]
        rows["topk_ids"].append(ids)
        rows["topk_logprobs"].append(lps)
    return rows


def _set(rows, column, row, value, pos=None, j=None):
    rows = json.loads(json.dumps(rows))
    if pos is None:
        rows[column][row] = value
    else:
        rows[column][row][pos][j] = value
    return rows


BAD_INPUTS = [
    (lambda r: _set(r, "topk_ids", 3, 100, 0, 1), "row 3, column 'topk_ids': an id is outside [0, vocab_size=100)"),
    (lambda r: _set(r, "input_ids", 2, [1, 2, -1, 5]), "row 2, column 'input_ids': token id -1 is outside"),
    (lambda r: _set(r, "topk_logprobs", 4, 0.25, 0, 0),
     "row 4, column 'topk_logprobs': log-probs must be finite and <= 0"),
    (lambda r: _set(r, "topk_logprobs", 1, float("nan"), 0, 2),
     "row 1, column 'topk_logprobs': log-probs must be finite"),
    (lambda r: _set(r, "topk_ids", 1, r["topk_ids"][1][:-1]), "row 1, column 'topk_ids': has"),
    (lambda r: _set(r, "topk_ids", 0, r["topk_ids"][0][0][0], 0, 1),
     "row 0, column 'topk_ids': a position repeats a token id"),
    (lambda r: _set(r, "completion_start", 2, 0), "row 2, column 'completion_start': 0 is outside [1,"),
    (lambda r: {**r, "topk_ids": [[row_[:-1] for row_ in ids] for ids in r["topk_ids"]]},
     "row 0, column 'topk_ids': a position has 3 ids, expected k=4"),
    (lambda r: {key: v for key, v in r.items() if key != "topk_logprobs"}, "missing column 'topk_logprobs'"),
    (lambda r: _set(r, "topk_logprobs", 2, None), "row 2, column 'topk_logprobs': is null"),
    (lambda r: {**r, "input_ids": [[float(x) for x in ids] for ids in r["input_ids"]]},
     "row 0, column 'input_ids': values have Arrow type double, expected integers"),
    (lambda r: {**{key: v for key, v in r.items() if key != "completion_start"},
                "loss_mask": [[int(t >= c) ^ (i == 3 and t == 0) for t in range(len(ids))]
                              for i, (ids, c) in enumerate(zip(r["input_ids"], r["completion_start"], strict=True))]},
     "row 3, column 'loss_mask': must be 0 on the prompt and 1 on the completion"),
    (lambda r: {**r, "topk_logprobs": [[[-0.01] * 4 for _ in ids] for ids in r["topk_ids"]]},
     "row 0, column 'topk_logprobs': the top-k probabilities sum to 3.9602 > 1"),
]


@pytest.mark.parametrize("mutate, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_import_refuses_bad_rows_and_writes_nothing(tmp_path, make_batch, make_fingerprint, mutate, message):
    rng = np.random.default_rng(0)
    good, bad = tmp_path / "a-good.parquet", tmp_path / "b-bad.parquet"
    pq.write_table(pa.table(_good_table(rng)), good)
    pq.write_table(pa.table(mutate(_good_table(np.random.default_rng(1)))), bad)
    out = tmp_path / "out"
    args = ["cache", "import", str(good), str(bad), "--out", str(out), "--teacher-name", "t",
            "--tokenizer-sha256", "a" * 64, "--vocab-size", "100", "--k", "4"]
    _one_line_error(runner.invoke(app, args), f"{bad}: " if "missing" in message else f"{bad}: {message}",
                    message, "nothing was imported")
    assert not out.exists()  # the good file before it was not written either
    # an existing cache keeps exactly what it had
    cache = LogitCache.create(str(out), exchange._fingerprint(exchange.ImportConfig(
        files=("x",), out=str(out), teacher_name="t", tokenizer_sha256="a" * 64, vocab_size=100), k=4))
    cache.write_shard("keep", make_batch(np.random.default_rng(3), k=4), {})
    _one_line_error(runner.invoke(app, args), message)
    assert LogitCache.open(str(out)).committed_shard_names() == ["keep"]
    assert not (out / "shards" / "import-a-good-000000000-000000005").exists()


def test_import_options_are_checked_together(tmp_path):
    result = runner.invoke(app, ["cache", "import", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "o"),
                                 "--teacher-name", "t", "--codec", "zip", "--teacher-sha256", "xyz"])
    assert result.exit_code == 2
    for needle in ("--codec: must be one of sqrtq, raw, got 'zip'", "--teacher-sha256: must be 64 lowercase hex",
                   "give exactly one of --tokenizer"):
        assert needle in result.output


# ---------------------------------------------------------------- import -> train
def test_import_then_train(tmp_path):
    """Teacher top-k captured "elsewhere" (here: the tiny teacher) as Parquet -> kd cache import -> kd train."""
    import torch

    from kd.stages import models
    from kd.stages.train.run import TrainConfig, run

    pair = models.tiny_model_pair(tmp_path / "pair")
    teacher = models.load_model(pair.teacher, device="cpu", dtype=torch.float32)
    rng, k = np.random.default_rng(0), 8
    rows = {"input_ids": [], "loss_mask": [], "topk_ids": [], "topk_logprobs": [], "target_logprob": []}
    for _ in range(24):
        ids = rng.integers(4, 260, size=int(rng.integers(10, 24)))
        start = int(rng.integers(1, len(ids) // 2))
        with torch.no_grad():
            logp = torch.log_softmax(teacher(torch.from_numpy(ids)[None]).logits[0].double(), -1)  # (L, V)
        top = logp[start - 1 : len(ids) - 1].topk(k, -1)
        rows["input_ids"].append(ids.tolist())
        rows["loss_mask"].append([t >= start for t in range(len(ids))])
        rows["topk_ids"].append(top.indices.tolist())
        rows["topk_logprobs"].append(top.values.float().tolist())
        target_ids = torch.from_numpy(ids[start:])
        rows["target_logprob"].append(logp[torch.arange(start - 1, len(ids) - 1), target_ids].tolist())
    pq.write_table(pa.table(rows, schema=pa.schema([
        ("input_ids", pa.list_(pa.int64())), ("loss_mask", pa.list_(pa.bool_())),
        ("topk_ids", pa.list_(pa.list_(pa.int64()))), ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("target_logprob", pa.list_(pa.float64()))])), tmp_path / "distill.parquet")
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["cache", "import", str(tmp_path / "distill.parquet"), "--out", str(cache),
                                 "--teacher-name", "tiny-teacher", "--teacher-weights", str(pair.teacher),
                                 "--tokenizer", str(pair.teacher), "--shard-size", "8"])
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert (summary["shards_written"], summary["k"]) == ("3", "8")
    assert verify_cache(str(cache)).ok
    record = LogitCache.open(str(cache)).committed_shards()[0]
    assert record.provenance["teacher"] == "tiny-teacher"
    assert record.provenance["imported"]["target_logprob"] == "column"
    torch.set_num_threads(1)
    summary = run(TrainConfig(cache=str(cache), out=str(tmp_path / "run"), student=str(pair.student), steps=3,
                              lr=1e-2, warmup=1, batch_tokens=128, eval_every=0, save_every=3,
                              heldout_fraction=0.0, loader_workers=0, progress=False))
    assert summary["step"] == 3
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))


# ---------------------------------------------------------------- compatibility promise
def test_a_newer_major_version_is_refused_by_every_command(tmp_path, make_batch, make_fingerprint):
    url = tmp_path / "c"
    _make_cache(url, make_batch, make_fingerprint, ["s0"])
    meta = json.loads((url / "zarr.json").read_text())
    meta["attributes"]["kd"]["format_version"] = "3.0"
    (url / "zarr.json").write_text(json.dumps(meta))
    for command in (["info"], ["verify"], ["ls"], ["copy", str(url), str(tmp_path / "d")],
                    ["merge", str(url), "--out", str(tmp_path / "m")],
                    ["export", str(url), "--out", str(tmp_path / "e.parquet")]):
        args = ["cache", *command] if len(command) > 1 else ["cache", command[0], str(url)]
        _one_line_error(runner.invoke(app, args), "format_version 3.0 is not readable by this kd",
                        "any minor", "Upgrade kd")
    assert not (tmp_path / "d").exists() and not (tmp_path / "m").exists() and not (tmp_path / "e.parquet").exists()
    # a commit record of a newer major version is refused too, naming the record
    meta["attributes"]["kd"]["format_version"] = "2.0"
    (url / "zarr.json").write_text(json.dumps(meta))
    record = json.loads((url / "commits/s0.json").read_text())
    (url / "commits/s0.json").write_text(json.dumps({**record, "format_version": "3.1"}))
    _one_line_error(runner.invoke(app, ["cache", "ls", str(url)]),
                    "commits/s0.json: format_version 3.1 is not readable")


def test_a_newer_minor_version_with_unknown_fields_is_read_and_copied(tmp_path, make_batch, make_fingerprint):
    url = tmp_path / "c"
    _make_cache(url, make_batch, make_fingerprint, ["s0", "s1"])
    expected = _shards(url)
    meta = json.loads((url / "zarr.json").read_text())
    meta["attributes"]["kd"].update(format_version="2.9", created_by={"tool": "kd 9.9"}, future_flag=True)
    meta["attributes"]["someone_else"] = {"x": 1}
    (url / "zarr.json").write_text(json.dumps(meta))
    path = url / "commits/s0.json"
    record = json.loads(path.read_text())
    record.update(format_version="2.9", future_field={"a": [1, 2]}, signature="abc")
    next(iter(record["objects"].values()))["crc32c"] = 12345
    path.write_text(json.dumps(record))
    assert LogitCache.open(str(url)).header.format_version == "2.9"
    for args in (["info"], ["ls"], ["verify"]):
        result = runner.invoke(app, ["cache", *args, str(url)])
        assert result.exit_code == 0, result.output
    got = _shards(url)
    for name in expected:
        _assert_same(got[name], expected[name], name)
    tools.copy_cache(str(url), str(tmp_path / "d"), progress=False)
    copied = json.loads((tmp_path / "d/commits/s0.json").read_text())
    assert copied["future_field"] == {"a": [1, 2]} and copied["signature"] == "abc"  # kept for newer readers
    assert verify_cache(str(tmp_path / "d")).ok


@pytest.mark.remote
def test_copy_to_and_from_s3_with_transient_errors(tmp_path, make_batch, make_fingerprint, s3):
    """Local -> s3:// (moto on loopback, 10% of PUTs fail with HTTP 500 and are retried) -> local."""
    src, back = tmp_path / "src", tmp_path / "back"
    _make_cache(src, make_batch, make_fingerprint, ["s0", "s1", "s2"])
    s3.faults.reset(rate=0.1, methods={"PUT"})
    result = runner.invoke(app, ["cache", "copy", str(src), f"{s3.url}/c", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert s3.faults.injected > 0
    s3.faults.reset()
    assert tools.copy_cache(f"{s3.url}/c", str(back), progress=False)["copied_shards"] == 3
    expected, got = _shards(src), _shards(back)
    assert got.keys() == expected.keys()
    for name in expected:
        _assert_same(got[name], expected[name], name)
    assert verify_cache(f"{s3.url}/c").ok
