"""The logit-cache format: round trips, error bounds, atomic commits, corruption, fingerprints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd.storage import codec as codec_mod
from kd.storage.cache import LogitCache
from kd.storage.errors import CacheError, CorruptShardError, FingerprintMismatchError, FormatVersionError
from kd.storage.format import CodecConfig, TokenizerFingerprint
from kd.storage.verify import verify_cache

CODECS = [CodecConfig(), CodecConfig(name="raw"), CodecConfig(levels=1000)]


def _by_id(ids, lps):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)


def _kl(batch, decoded):
    ids_t, lp_t = _by_id(batch.topk_ids, batch.topk_logprobs)
    _, lp_d = _by_id(decoded.topk_ids, decoded.topk_logprobs)
    p = np.exp(np.concatenate([lp_t, batch.tail_logprobs[:, None]], 1).astype(np.float64))
    logq = np.concatenate([lp_d, decoded.tail_logprobs[:, None]], 1).astype(np.float64)
    logp = np.log(np.maximum(p, 1e-300))
    return (p * (logp - logq)).sum(1)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.levels}")
def test_round_trip(tmp_path, make_batch, make_fingerprint, codec):
    batch = make_batch(np.random.default_rng(0), num_sequences=12, k=8, vocab_size=300)
    cache = LogitCache.create(str(tmp_path / "c"), make_fingerprint(k=8, vocab_size=300, codec=codec))
    record = cache.write_shard("s0", batch, {"source": "student"})
    assert record.num_positions == batch.num_positions and record.num_tokens == batch.num_tokens
    out = LogitCache.open(str(tmp_path / "c")).read_shard("s0").read()
    for name in ("token_ids", "seq_offsets", "completion_start", "source", "round", "prompt_index", "sample_index"):
        np.testing.assert_array_equal(getattr(out, name), getattr(batch, name), err_msg=name)
    ids_t, _ = _by_id(batch.topk_ids, batch.topk_logprobs)
    ids_d, _ = _by_id(out.topk_ids, out.topk_logprobs)
    np.testing.assert_array_equal(ids_d, ids_t)  # ids are lossless
    kl = _kl(batch, out)
    if codec.name == "raw":
        np.testing.assert_array_equal(out.topk_ids, batch.topk_ids)
        np.testing.assert_array_equal(out.topk_logprobs, batch.topk_logprobs)
        np.testing.assert_array_equal(out.target_logprobs, batch.target_logprobs)
        np.testing.assert_array_equal(out.behaviour_logprobs, batch.behaviour_logprobs)
        assert np.abs(kl).max() < 1e-12
    else:
        # the documented bound on the expected KL, with slack for a small sample
        assert kl.mean() <= (batch.k + 1) / (6 * codec.levels**2) * 2
        assert kl.min() >= -1e-6
        # float16 scalars: relative error <= 2^-11
        np.testing.assert_allclose(out.target_logprobs, batch.target_logprobs, rtol=2**-10, atol=1e-7)
        np.testing.assert_array_equal(np.isnan(out.behaviour_logprobs), np.isnan(batch.behaviour_logprobs))
    # decoded distribution over k+1 buckets is normalized (the documented rule)
    total = np.exp(out.topk_logprobs.astype(np.float64)).sum(1) + np.exp(out.tail_logprobs.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_sqrt_codes_respect_their_error_bound(make_batch):
    batch = make_batch(np.random.default_rng(1), num_sequences=20, k=16, vocab_size=64)
    codec = CodecConfig(levels=255)
    enc = codec_mod.encode(batch.topk_ids, batch.topk_logprobs, batch.tail_logprobs, batch.target_logprobs,
                           batch.behaviour_logprobs, codec, 64)
    _, lp = _by_id(batch.topk_ids, batch.topk_logprobs)
    err = np.abs(enc["topk_codes"] / 255.0 - np.exp(lp.astype(np.float64) / 2))
    assert err.max() <= 0.5 / 255 + 1e-9
    tail_err = np.abs(enc["tail_code"] / 255.0 - np.exp(batch.tail_logprobs.astype(np.float64) / 2))
    assert tail_err.max() <= 0.5 / 255 + 1e-9


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 9),
    k=st.integers(1, 12),
    max_len=st.integers(2, 40),
    seed=st.integers(0, 2**16),
    raw=st.booleans(),
    start=st.integers(0, 9),
    width=st.integers(0, 9),
)
def test_partial_reads_match_full_reads(tmp_path_factory, make_batch, make_fingerprint, n, k, max_len, seed, raw, start, width):
    rng = np.random.default_rng(seed)
    batch = make_batch(rng, num_sequences=n, k=k, vocab_size=50, max_len=max_len)
    codec = CodecConfig(name="raw") if raw else CodecConfig()
    cache = LogitCache.create(str(tmp_path_factory.mktemp("c")), make_fingerprint(k=k, vocab_size=50, codec=codec))
    cache.write_shard("s", batch, {})
    reader = cache.read_shard("s")
    full = reader.read()
    stop = min(n, start + width)
    start = min(start, stop)
    part = reader.read(start, stop)
    expected = full.select(range(start, stop))
    for name in ("token_ids", "seq_offsets", "completion_start", "topk_ids", "topk_logprobs", "tail_logprobs", "target_logprobs"):
        np.testing.assert_array_equal(getattr(part, name), getattr(expected, name), err_msg=name)
    np.testing.assert_array_equal(np.isnan(part.behaviour_logprobs), np.isnan(expected.behaviour_logprobs))


def test_uncommitted_shard_is_invisible_and_rewritten(tmp_path, make_batch, make_fingerprint, monkeypatch):
    url = str(tmp_path / "c")
    cache = LogitCache.create(url, make_fingerprint())
    batch = make_batch(np.random.default_rng(2))
    cache.write_shard("keep", batch, {})

    def boom(*a, **kw):
        raise OSError("simulated crash before the commit record")

    monkeypatch.setattr(LogitCache, "_commit", boom)
    with pytest.raises(OSError):
        cache.write_shard("lost", batch, {})
    monkeypatch.undo()
    [lost] = (tmp_path / "c" / "shards").glob("lost.*")  # data written in its own group ...
    assert [r.name for r in cache.committed_shards()] == ["keep"]  # ... but not visible
    report = verify_cache(url)
    assert report.ok and report.leftovers == [f"{url}/shards/{lost.name}"]
    cache.write_shard("lost", batch, {})  # a rerun rewrites it
    assert [r.name for r in cache.committed_shards()] == ["keep", "lost"]
    assert verify_cache(url).ok


def test_writer_killed_mid_shard_leaves_no_visible_shard(tmp_path):
    """SIGKILL a real writer process while it writes a large shard; nothing half-written is visible."""
    url = tmp_path / "c"
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import random_batch, fingerprint
        from kd.storage.cache import LogitCache
        cache = LogitCache.create({str(url)!r}, fingerprint(k=64, vocab_size=2000))
        batch = random_batch(np.random.default_rng(0), num_sequences=200, k=64, vocab_size=2000, max_len=200)
        print("ready", flush=True)
        for i in range(1000):
            cache.write_shard(f"s{{i:04d}}", batch, {{}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    # wait until at least one shard is committed and another is in flight, then kill
    commits = url / "commits"
    for _ in range(600):
        if commits.exists() and len([p for p in commits.iterdir() if not p.name.startswith(".")]) >= 1:
            break
        proc.wait(timeout=0.05) if proc.poll() is not None else None
        import time

        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = LogitCache.open(str(url))
    committed = cache.committed_shards()
    assert committed, "the writer should have committed at least one shard before the kill"
    report = verify_cache(str(url))
    assert report.ok, report.format()
    for record in committed:
        assert cache.read_shard(record).read().num_sequences == 200


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_catches_a_flipped_byte_in_any_object(tmp_path, make_batch, make_fingerprint):
    src = tmp_path / "src"
    LogitCache.create(str(src), make_fingerprint()).write_shard("s0", make_batch(np.random.default_rng(3)), {})
    objects = sorted(p.relative_to(src) for p in next((src / "shards").glob("s0.*")).rglob("*") if p.is_file())
    assert len(objects) > 10
    import shutil

    for i, rel in enumerate(objects):
        dst = tmp_path / f"copy{i}"
        shutil.copytree(src, dst)
        _flip_byte(dst / rel)
        report = verify_cache(str(dst))
        assert not report.ok, rel
        assert any(f"shards/s0" in shard and str(rel) in problem for shard, problem in report.problems), report.format()


def test_reader_refuses_a_corrupt_chunk_naming_the_shard(tmp_path, make_batch, make_fingerprint):
    url = tmp_path / "c"
    LogitCache.create(str(url), make_fingerprint()).write_shard("s0", make_batch(np.random.default_rng(4)), {})
    chunk = next(p for p in (next((url / "shards").glob("s0.*")) / "topk_codes").rglob("*") if p.is_file() and p.name != "zarr.json")
    _flip_byte(chunk, 20)
    with pytest.raises(CorruptShardError, match="'s0'"):
        LogitCache.open(str(url)).read_shard("s0").read()


def test_verify_reports_bad_values(tmp_path, make_batch, make_fingerprint):
    """A shard written with out-of-range ids is caught by verify (bypassing the writer's own check)."""
    url = str(tmp_path / "c")
    cache = LogitCache.create(url, make_fingerprint(vocab_size=100, codec=CodecConfig(name="raw")))
    batch = make_batch(np.random.default_rng(5))
    batch.validate = lambda *a, **k: None  # simulate a foreign writer
    batch.topk_ids[0, 0] = 150
    batch.topk_logprobs[1, 2] = 0.5
    cache.write_shard("bad", batch, {})
    report = verify_cache(url)
    assert not report.ok
    text = report.format()
    assert "bad" in text and ("vocab_size=100" in text or "<= 0" in text)


def test_writer_refuses_invalid_batches_before_writing(tmp_path, make_batch, make_fingerprint):
    url = tmp_path / "c"
    cache = LogitCache.create(str(url), make_fingerprint(vocab_size=100))
    cache.write_shard("good", make_batch(np.random.default_rng(6)), {})
    batch = make_batch(np.random.default_rng(7))
    batch.token_ids[0] = 100
    with pytest.raises(CacheError, match="token_ids has ids outside"):
        cache.write_shard("bad", batch, {})
    assert not list((url / "shards").glob("bad*"))
    assert [r.name for r in cache.committed_shards()] == ["good"]
    with pytest.raises(CacheError, match="already committed"):
        cache.write_shard("good", make_batch(np.random.default_rng(6)), {})
    with pytest.raises(CacheError, match="not a valid shard name"):
        cache.write_shard("../evil", make_batch(np.random.default_rng(6)), {})


def test_fingerprint_mismatch_names_both_sides(tmp_path, make_batch, make_fingerprint):
    url = str(tmp_path / "c")
    LogitCache.create(url, make_fingerprint(k=8)).write_shard("s0", make_batch(np.random.default_rng(8)), {})
    other_tok = make_fingerprint(k=8, tok="f" * 64)
    with pytest.raises(FingerprintMismatchError) as err:
        LogitCache.create(url, other_tok)
    assert "tokenizer" in str(err.value) and "aaaaaaaaaaaa" in str(err.value) and "ffffffffffff" in str(err.value)
    with pytest.raises(FingerprintMismatchError, match="k: 8 vs 16"):
        LogitCache.create(url, make_fingerprint(k=16))
    with pytest.raises(FingerprintMismatchError, match="codec"):
        LogitCache.create(url, make_fingerprint(k=8, codec=CodecConfig(name="raw")))
    assert len(LogitCache.open(url).committed_shards()) == 1


def _create_in_child(url: str, fp, barrier, results) -> None:
    barrier.wait()
    try:
        LogitCache.create(url, fp)
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - the test reports whatever escaped
        results.put(f"{type(err).__name__}: {err}")


def test_writers_creating_one_cache_at_once_all_get_it(tmp_path, make_fingerprint):
    """N processes create the same new cache together (N generate workers on one --out, a retried
    job): each ends up with the cache or, with another fingerprint, a clear mismatch; zarr's own
    'a group exists' race (its check, then its write) never escapes. 12 rounds of 6 processes
    raised it in about every other round before create() handled it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(12):
        url = str(tmp_path / f"c{trial}")
        barrier, results = ctx.Barrier(6), ctx.Queue()
        fps = [make_fingerprint(k=8)] * 5 + [make_fingerprint(k=16)]  # the last one asks for another k
        procs = [ctx.Process(target=_create_in_child, args=(url, fp, barrier, results)) for fp in fps]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        ok = [o for o in outcomes if o == "ok"]
        refused = [o for o in outcomes if o != "ok"]
        # whoever created first decides the fingerprint; everyone else opens it or is refused by name
        assert len(refused) in (1, 5), outcomes
        assert all(o.startswith("FingerprintMismatchError") and "k: " in o for o in refused), outcomes
        assert len(ok) + len(refused) == 6
        assert verify_cache(url).ok

def test_unknown_major_version_is_refused(tmp_path, make_batch, make_fingerprint):
    url = tmp_path / "c"
    LogitCache.create(str(url), make_fingerprint())
    meta = json.loads((url / "zarr.json").read_text())
    meta["attributes"]["kd"]["format_version"] = "3.0"
    (url / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match="format_version 3.0 is not readable.*Upgrade kd"):
        LogitCache.open(str(url))
    meta["attributes"]["kd"]["format_version"] = "2.7"  # a newer minor is fine
    (url / "zarr.json").write_text(json.dumps(meta))
    assert LogitCache.open(str(url)).header.format_version == "2.7"


def test_not_a_cache_gives_a_clear_error(tmp_path):
    with pytest.raises(CacheError, match="no logit cache at"):
        LogitCache.open(str(tmp_path / "nothing"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(CacheError, match="not empty but holds no logit cache"):
        LogitCache.create(str(tmp_path / "junk"), _fp())
    assert (tmp_path / "junk" / "file.txt").read_text() == "x"


def _fp():
    from kd.storage.format import CacheFingerprint, TeacherFingerprint

    return CacheFingerprint(TeacherFingerprint("t", "0" * 64), TokenizerFingerprint("1" * 64, 10), k=2)


def test_commit_record_with_path_outside_the_shard_is_refused(tmp_path, make_batch, make_fingerprint):
    url = tmp_path / "c"
    LogitCache.create(str(url), make_fingerprint()).write_shard("s0", make_batch(np.random.default_rng(9)), {})
    path = url / "commits" / "s0.json"
    record = json.loads(path.read_text())
    record["objects"]["../../etc/passwd"] = {"size": 1, "sha256": "0"}
    path.write_text(json.dumps(record))
    with pytest.raises(CacheError, match="outside"):
        LogitCache.open(str(url)).committed_shards()


def test_files_follow_the_zarr_v3_spec_tensorstore_reads_them(tmp_path, make_batch, make_fingerprint):
    ts = pytest.importorskip("tensorstore")
    url = tmp_path / "c"
    batch = make_batch(np.random.default_rng(10), num_sequences=30, k=8, vocab_size=300)
    cache = LogitCache.create(str(url), make_fingerprint(k=8, vocab_size=300))
    cache.write_shard("s0", batch, {})
    reader = cache.read_shard("s0")
    stored = reader.stored_position_arrays()
    for name, expected in {**stored, "token_ids": batch.token_ids, "seq_offsets": batch.seq_offsets}.items():
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(reader.cache.shard_group_path(reader.record) + "/" + name)}}).result()
        np.testing.assert_array_equal(arr.read().result(), expected, err_msg=name)
    # decode with nothing but the documented rule and the attributes
    group = Path(reader.cache.shard_group_path(reader.record))
    codes = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(group / "topk_codes")}}).result()
    attrs = json.loads((group / "topk_codes/zarr.json").read_text())["attributes"]
    levels = attrs["levels"]
    c = codes.read().result().astype(np.float64)
    p = np.where(c > 0, c / levels, 0.25 / levels) ** 2
    decoded = reader.read()
    np.testing.assert_allclose(
        np.log(p / (p.sum(1) + np.where(stored["tail_code"] > 0, stored["tail_code"] / levels, 0.25 / levels) ** 2)[:, None]),
        decoded.topk_logprobs,
        rtol=1e-5,
        atol=1e-5,
    )


def test_raw_codec_fingerprints_ignore_levels(tmp_path, make_fingerprint):
    url = str(tmp_path / "c")
    LogitCache.create(url, make_fingerprint(codec=CodecConfig(name="raw", levels=255)))
    LogitCache.create(url, make_fingerprint(codec=CodecConfig(name="raw", levels=340)))  # same cache
    with pytest.raises(FingerprintMismatchError, match="codec"):
        LogitCache.create(url, make_fingerprint(codec=CodecConfig(name="raw", zstd_level=3)))
