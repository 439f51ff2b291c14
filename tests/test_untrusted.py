"""A cache from someone else must never hurt the reader (docs/FORMAT.md, "Security").

Each test crafts a bad cache the way an attacker would (editing files, then re-signing the
commit record so the deeper checks are reached) and checks the exact message kd gives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kd.cli import app
from kd.stages.train.loader import CacheLoader, LoaderConfig
from kd.storage.cache import LogitCache
from kd.storage.errors import CacheError, CorruptShardError
from kd.storage.format import CodecConfig
from kd.storage.verify import verify_cache

VOCAB = 100


# ---------------------------------------------------------------- helpers
def _cache(tmp_path: Path, make_batch, make_fingerprint, codec=None, shards=("good", "bad")) -> Path:
    url = tmp_path / "c"
    cache = LogitCache.create(str(url), make_fingerprint(vocab_size=VOCAB, codec=codec))
    for i, name in enumerate(shards):
        cache.write_shard(name, make_batch(np.random.default_rng(i), num_sequences=6, vocab_size=VOCAB), {})
    return url


def _record(url: Path, name: str) -> dict:
    return json.loads((url / "commits" / f"{name}.json").read_text())


def _group(url: Path, name: str) -> Path:
    rec = _record(url, name)
    return url / "shards" / (rec.get("group") or name)


def _forge(url: Path, name: str) -> None:
    """Re-sign the record (every object's size and sha256), as an attacker would."""
    rec = _record(url, name)
    group = _group(url, name)
    rec["objects"] = {
        str(p.relative_to(url)): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(group.rglob("*")) if p.is_file()
    }
    (url / "commits" / f"{name}.json").write_text(json.dumps(rec))


def _edit_meta(url: Path, name: str, array: str, fn) -> None:
    path = _group(url, name) / array / "zarr.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))
    _forge(url, name)


def _poke(url: Path, name: str, array: str, index, value) -> None:
    arr = zarr.open_array(str(_group(url, name) / array), mode="r+")
    arr[index] = value
    _forge(url, name)


def _open_error(url: Path, name: str = "bad") -> str:
    with pytest.raises(CorruptShardError) as err:
        LogitCache.open(str(url)).read_shard(name).read()
    return str(err.value)


def _assert_good_shard_intact(url: Path) -> None:
    reader = LogitCache.open(str(url)).read_shard("good")
    assert reader.read().num_sequences == 6


# ---------------------------------------------------------------- 1. no code execution from data
class _PickleCodec(zarr.abc.codec.BytesBytesCodec):
    """What a plugin's pickle codec does: unpickle chunk bytes (executes code from the file)."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data):
        return cls()

    def to_dict(self):
        return {"name": "test.pickle"}

    async def _decode_single(self, chunk_bytes, chunk_spec):
        return chunk_spec.prototype.buffer.from_bytes(pickle.loads(chunk_bytes.to_bytes()))

    async def _encode_single(self, chunk_bytes, chunk_spec):
        return chunk_spec.prototype.buffer.from_bytes(pickle.dumps(chunk_bytes.to_bytes()))

    def compute_encoded_size(self, input_byte_length, chunk_spec):
        raise NotImplementedError


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling runs Path(marker).touch()
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_codec_in_array_metadata_is_refused_before_any_chunk_is_read(tmp_path, make_batch, make_fingerprint):
    from zarr.registry import register_codec

    register_codec("test.pickle", _PickleCodec)  # as if a plugin package registered it
    url = _cache(tmp_path, make_batch, make_fingerprint)
    marker = tmp_path / "pwned"
    chunk = _group(url, "bad") / "token_ids" / "c" / "0"
    chunk.write_bytes(pickle.dumps(_Payload(str(marker))))

    def to_pickle(meta):  # token_ids stored unsharded through the pickle codec
        meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "test.pickle"}]
        meta["chunk_grid"]["configuration"]["chunk_shape"] = meta["shape"]

    _edit_meta(url, "bad", "token_ids", to_pickle)
    message = _open_error(url)
    assert "token_ids/zarr.json: codecs ['bytes', 'test.pickle'] refused" in message
    assert "'sharding_indexed'" in message and "'bad'" in message
    assert not marker.exists()
    # the control: plain zarr does run the payload, so the refusal above is what protects the user
    try:
        zarr.open_array(str(_group(url, "bad") / "token_ids"), mode="r")[...]
    except Exception:  # noqa: BLE001 (the payload returns None, decoding then fails)
        pass
    assert marker.exists()
    _assert_good_shard_intact(url)


@pytest.mark.parametrize("dtype", ["string", "variable_length_utf8", "float64", {"name": "numcodecs.pickle"}])
def test_object_and_foreign_dtypes_are_refused(tmp_path, make_batch, make_fingerprint, dtype):
    url = _cache(tmp_path, make_batch, make_fingerprint)
    _edit_meta(url, "bad", "token_ids", lambda m: m.update(data_type=dtype))
    assert f"data_type {dtype!r} refused; the format stores this array as 'int32'" in _open_error(url)


def test_consolidated_metadata_cannot_bypass_the_checks(tmp_path, make_batch, make_fingerprint):
    url = _cache(tmp_path, make_batch, make_fingerprint)
    path = _group(url, "bad") / "zarr.json"
    meta = json.loads(path.read_text())
    meta["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
    path.write_text(json.dumps(meta))
    _forge(url, "bad")
    assert "zarr.json has fields kd does not accept: ['consolidated_metadata']" in _open_error(url)


def test_checkpoints_load_with_weights_only():
    source = (Path(__file__).parent.parent / "stages" / "train" / "checkpoint.py").read_text()
    assert "weights_only=True" in source and "weights_only=False" not in source
    repo = Path(__file__).parent.parent
    sources = [*repo.glob("*.py"), *repo.glob("storage/*.py"), *repo.glob("stages/**/*.py")]
    assert len(sources) > 20
    for path in sources:  # kd's own code: no pickle anywhere, no weights_only=False
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text and "weights_only=False" not in text, path


# ---------------------------------------------------------------- 2. paths only from the naming rules
@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "s3://evil/bucket/x", "shards/good/x",
                                  "SHARDS/../x", "{g}/../../x", "{g}/./zarr.json", "{g}//zarr.json", "{g}/a\\b"])
def test_record_object_paths_outside_the_shard_group_are_refused(tmp_path, make_batch, make_fingerprint, path):
    url = _cache(tmp_path, make_batch, make_fingerprint)
    rec = _record(url, "bad")
    group = str(_group(url, "bad").relative_to(url))
    rec["objects"][path.format(g=group)] = {"size": 1, "sha256": "0" * 64}
    (url / "commits" / "bad.json").write_text(json.dumps(rec))
    with pytest.raises(CorruptShardError, match="is outside") as err:
        LogitCache.open(str(url)).load_record("bad")
    assert "no '..', no absolute paths, no URLs" in str(err.value)
    report = verify_cache(str(url))
    assert [s for s, _ in report.problems] == [f"{url}/shards/bad"]


@pytest.mark.parametrize("field,value", [("name", "../good"), ("name", "/abs"), ("group", "../../x"),
                                         ("group", "s3://evil/x")])
def test_record_names_and_groups_must_follow_the_naming_rules(tmp_path, make_batch, make_fingerprint, field, value):
    url = _cache(tmp_path, make_batch, make_fingerprint)
    rec = _record(url, "bad")
    rec[field] = value
    (url / "commits" / "bad.json").write_text(json.dumps(rec))
    with pytest.raises(CacheError, match="not a valid"):
        LogitCache.open(str(url)).load_record("bad")


# ---------------------------------------------------------------- 3. size bombs
def test_a_shape_of_10_12_is_refused_before_anything_is_allocated(tmp_path, make_batch, make_fingerprint):
    url = _cache(tmp_path, make_batch, make_fingerprint)
    _edit_meta(url, "bad", "seq_offsets", lambda m: m.update(shape=[10**12]))
    tracemalloc.start()
    message = _open_error(url)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "seq_offsets/zarr.json: shape [1000000000000] disagrees with the commit record, which implies [7]" in message
    assert peak < 32 << 20


def test_record_counts_beyond_the_limits_or_each_other_are_refused(tmp_path, make_batch, make_fingerprint):
    url = _cache(tmp_path, make_batch, make_fingerprint)
    rec = _record(url, "bad")
    for counts, expected in (
        ({"num_sequences": 10**12}, "num_sequences: must be in [0, 4194304], got 1000000000000"),
        ({"num_positions": rec["num_tokens"]}, "counts are inconsistent"),
    ):
        (url / "commits" / "bad.json").write_text(json.dumps({**rec, **counts}))
        with pytest.raises(CorruptShardError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            LogitCache.open(str(url)).load_record("bad")


def test_a_consistent_but_huge_shard_is_refused_by_the_compression_bound(tmp_path, make_batch, make_fingerprint):
    """Record and metadata agree on 2^33 tokens, but no chunk stores them: a size bomb."""
    url = _cache(tmp_path, make_batch, make_fingerprint)
    rec = _record(url, "bad")
    big = 1 << 33
    _edit_meta(url, "bad", "token_ids", lambda m: (m.update(shape=[big]), m["chunk_grid"]["configuration"].update(
        chunk_shape=[big]), m["codecs"][0]["configuration"].update(chunk_shape=[1 << 18])))
    (_group(url, "bad") / "token_ids" / "c" / "0").unlink()
    _forge(url, "bad")
    rec = _record(url, "bad")
    rec["num_tokens"] = big
    (url / "commits" / "bad.json").write_text(json.dumps(rec))
    tracemalloc.start()
    message = _open_error(url)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "declare" in message and "decoded bytes but store only" in message and "size bomb" in message
    assert peak < 32 << 20


def test_inner_chunks_that_do_not_divide_the_shard_are_refused(tmp_path, make_batch, make_fingerprint):
    url = _cache(tmp_path, make_batch, make_fingerprint)

    def mismatch(meta):
        meta["codecs"][0]["configuration"]["chunk_shape"] = [meta["chunk_grid"]["configuration"]["chunk_shape"][0] + 1]

    _edit_meta(url, "bad", "token_ids", mismatch)
    assert "does not fit inner chunks" in _open_error(url)


def _rewrite_index(chunk: Path, entry: tuple[int, int] | None = None, payload: bytes | None = None) -> None:
    """Replace the (single) chunk of a Zarr shard file, with valid crc32c on chunk and index."""
    import google_crc32c

    data = chunk.read_bytes()
    body = data[: len(data) - 20]  # one chunk: 16-byte index + 4-byte crc32c
    if payload is not None:  # the payload replaces the chunk
        body = b""
        payload += struct.pack("<I", google_crc32c.value(payload))
        entry = (len(body), len(payload))
        body += payload
    index = struct.pack("<QQ", *entry)
    chunk.write_bytes(body + index + struct.pack("<I", google_crc32c.value(index)))


def test_a_shard_index_pointing_outside_its_file_is_refused(tmp_path, make_batch, make_fingerprint):
    url = _cache(tmp_path, make_batch, make_fingerprint)
    _rewrite_index(_group(url, "bad") / "topk_codes" / "c" / "0" / "0", entry=(10**12, 1 << 30))
    _forge(url, "bad")
    message = _open_error(url)
    assert "the shard index of" in message and "topk_codes/c/0/0 points outside its data (offset 1000000000000" in message


def test_a_decompression_bomb_is_refused_before_decompressing(tmp_path, make_batch, make_fingerprint):
    from numcodecs import Blosc

    url = _cache(tmp_path, make_batch, make_fingerprint)
    # 16 MiB of zeros in one blosc block: 553 bytes, smaller than the honest chunk it replaces
    bomb = Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE, blocksize=16 << 20).encode(np.zeros(16 << 20, np.uint8))
    assert len(bomb) < 600
    _rewrite_index(_group(url, "bad") / "topk_codes" / "c" / "0" / "0", payload=bomb)
    _forge(url, "bad")
    reader = LogitCache.open(str(url)).read_shard("bad")  # the index is fine: the bomb is in the chunk
    tracemalloc.start()
    with pytest.raises(CorruptShardError) as err:
        reader.read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "a chunk declares 16777216 decompressed bytes, its array's chunk holds" in str(err.value)
    assert "(refused before decompressing)" in str(err.value)
    assert peak < 8 << 20  # the 16 MiB were never allocated


# ---------------------------------------------------------------- 4. value checks: verify, loader, CLI
VALUE_CASES = {
    # case: (codec, array, index, value, message fragment naming the first bad index)
    "id-over-vocab": ("raw", "topk_ids", (3, 1), 150, "top-k id 150 at position row 3 (sequence"),
    "token-over-vocab": ("sqrtq", "token_ids", 0, 100, "token id 100 at token 0 of sequence 0 is outside [0, vocab_size=100)"),
    "nan-target": ("sqrtq", "target_logprob", 2, np.nan, "target log-prob nan at position row 2"),
    "inf-logprob": ("raw", "topk_logprobs", (5, 0), np.inf, "top-k log-prob inf at position row 5"),
    "positive-logprob": ("raw", "topk_logprobs", (1, 2), 0.5, "top-k log-prob 0.5 at position row 1"),
    "offsets-backwards": ("sqrtq", "seq_offsets", 2, 0, "seq_offsets goes backwards at index 2"),
    "completion-past-end": ("sqrtq", "completion_start", 1, 999, "completion_start[1] = 999 is past the end of sequence 1"),
    "pos-offsets-off": ("sqrtq", "pos_offsets", 3, None, "disagrees with the completion lengths"),
}


@pytest.fixture(params=sorted(VALUE_CASES))
def bad_value_cache(request, tmp_path, make_batch, make_fingerprint):
    codec, array, index, value, fragment = VALUE_CASES[request.param]
    url = _cache(tmp_path, make_batch, make_fingerprint, codec=CodecConfig(name=codec))
    if value is None:  # pos_offsets: non-decreasing, right ends, one middle value wrong
        off = zarr.open_array(str(_group(url, "bad") / array), mode="r")[...]
        value = int(off[index - 1]) if off[index - 1] != off[index] else int(off[index + 1])
    _poke(url, "bad", array, index, value)
    return url, fragment


def test_verify_reports_each_bad_value_with_the_shard_and_first_bad_index(bad_value_cache):
    url, fragment = bad_value_cache
    report = verify_cache(str(url))
    assert not report.ok
    assert {s for s, _ in report.problems} == {f"{url}/shards/bad"}
    assert any(fragment in p for _, p in report.problems), report.format()
    result = CliRunner().invoke(app, ["cache", "verify", str(url)])
    assert result.exit_code == 1 and f"BAD {url}/shards/bad:" in result.output and fragment in result.output


def test_the_loader_refuses_the_bad_shard_naming_it_or_skips_it_when_asked(bad_value_cache, caplog):
    url, fragment = bad_value_cache
    config = LoaderConfig(max_tokens_per_batch=4096, num_workers=0)
    with pytest.raises(CorruptShardError) as err:
        with CacheLoader(str(url), config) as loader:
            list(loader.iter_epoch())
    assert str(err.value).startswith("shard 'bad' is corrupt: ") and fragment in str(err.value)
    good = LogitCache.open(str(url)).read_shard("good").read()
    with caplog.at_level(logging.WARNING), CacheLoader(str(url), LoaderConfig(
            max_tokens_per_batch=4096, num_workers=0, skip_bad_shards=True)) as loader:
        tokens = sum(b.num_tokens for b in loader.iter_epoch())
    assert tokens == good.num_tokens  # all of the good shard, nothing of the bad one
    assert any("skipping shard 'bad'" in r.getMessage() and fragment in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- kd train through the CLI
@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    from kd.stages import models

    root = tmp_path_factory.mktemp("tiny")
    student = models.tiny_model_pair(root / "pair").student
    tok = models.tokenizer_fingerprint(models.load_tokenizer(student), name="tiny",
                                       model_vocab_size=models.model_vocab_size(student))
    return student, tok


def test_kd_train_refuses_a_bad_shard_with_one_error_line_or_skips_it(tiny_student, tmp_path, make_batch):
    from kd.storage.format import CacheFingerprint, TeacherFingerprint

    student, tok = tiny_student
    url = tmp_path / "c"
    cache = LogitCache.create(str(url), CacheFingerprint(TeacherFingerprint("t", "0" * 64), tok, 8, CodecConfig()))
    for i, name in enumerate(("bad", "good")):
        cache.write_shard(name, make_batch(np.random.default_rng(i), num_sequences=8, vocab_size=tok.vocab_size), {})
    _poke(url, "bad", "token_ids", 3, tok.vocab_size + 7)
    args = ["train", "--cache", str(url), "--student", str(student), "--steps", "1", "--warmup", "0",
            "--batch-tokens", "512", "--heldout-fraction", "0", "--eval-every", "0", "--no-progress",
            "--loader-workers", "0"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: shard 'bad' is corrupt: token id")
    assert f"is outside [0, vocab_size={tok.vocab_size})" in lines[0]
    assert not list((tmp_path / "run").glob("checkpoints/*/*"))  # no step was taken
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run2"), "--skip-bad-shards"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["step"] == 1


# ---------------------------------------------------------------- 5. fuzzing
@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory, benchmark_module):
    harness = benchmark_module("fuzz_cache")
    seed = tmp_path_factory.mktemp("fuzz-seed")
    return harness, seed, harness.build_seed(seed)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_reader_only_returns_data_or_kd_errors(fuzz_seed, tmp_path_factory, data):
    harness, seed, expected = fuzz_seed
    logging.disable(logging.WARNING)
    try:
        desc, outcomes = harness.run_case(seed, tmp_path_factory.mktemp("fuzz"), expected,
                                          harness.HypothesisChooser(data))
    finally:
        logging.disable(logging.NOTSET)
    failures = {k: v for k, v in outcomes.items() if not k.endswith(".traceback") and harness.is_failure(v)}
    assert not failures, (desc, failures, outcomes)
    assert set(outcomes) >= {"sq.read", "sq.verify", "sq.loader", "raw.read"}

