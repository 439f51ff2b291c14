"""Fuzz the cache reader: mutate a small real cache and run everything that reads it.

The promise under test (docs/FORMAT.md, "Security"): whatever bytes a cache holds, a reader
returns correct data or raises one of kd's own errors (``KdError``). Each case copies a small
real cache (two sqrtq shards, one raw-codec cache), applies one mutation and runs
``LogitCache.open``, ``read_shard(...).read()`` (whole and partial), ``verify_cache`` and one epoch
of the train loader. Mutations: byte flips and truncation of any file; JSON field mutations of
commit records and zarr.json files (huge, negative and wrong-typed values, '../' paths, URLs,
pickle codecs, object dtypes, deleted and added keys, nesting bombs); shape changes; offset and
value pokes (ids >= vocab, NaN and positive log-probs); shard-index entries pointing anywhere;
decompression bombs. Half the cases also "forge" the commit record (recompute every object's
size and sha256), as an attacker would, so the deeper checks are reached.

Outcomes per step: ``identical`` (same data as before the mutation), ``valid-change`` (a forged
cache that is different but valid data: an attacker may write any valid cache), a KdError
subclass name, or ``CRASH:<type>`` (any other exception: a bug). ``SILENT`` marks an unforged
mutation that changed the data without any error: also a bug.

    python benchmarks/fuzz_cache.py --seconds 300 --seed 0     # random cases for 5 minutes
    python benchmarks/fuzz_cache.py --atheris -- -max_total_time=300   # coverage-guided (atheris)

The same harness runs in the default test suite with a small hypothesis budget
(tests/test_untrusted.py::test_fuzz_reader_only_returns_data_or_kd_errors).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import platform
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

VOCAB, K = 300, 8
INTERESTING = [10**12, -1, 0, 1, 3, 2**31, 2**63, 2**64, 1e300, 0.5, True, None, [], {}, [10**12], [0, 0],
               "../../etc/passwd", "/etc/passwd", "s3://evil/x", "file:///etc/passwd", "shards/../../x",
               "numcodecs.pickle", "string", "|O", "object", "float64", "uint64", "NaN", "", "x" * 300]


# ---------------------------------------------------------------- choosers (random, hypothesis, atheris)
class RandomChooser:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, n: int) -> int:
        return self.rng.randrange(n) if n > 0 else 0


class HypothesisChooser:
    def __init__(self, data):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def pick(self, n: int) -> int:
        return self.data.draw(self.st.integers(0, max(n - 1, 0))) if n > 1 else 0


class AtherisChooser:
    def __init__(self, fdp):
        self.fdp = fdp

    def pick(self, n: int) -> int:
        return self.fdp.ConsumeIntInRange(0, n - 1) if n > 1 else 0


# ---------------------------------------------------------------- the seed caches
def _batch(rng: np.random.Generator, n: int, raw: bool):
    from kd.storage.batch import SequenceBatch

    lengths = rng.integers(2, 24, size=n)
    starts = np.array([rng.integers(1, L + 1) for L in lengths], dtype=np.int32)
    p = int((lengths - starts).sum())
    logits = rng.standard_normal((p, VOCAB)) * 4
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=1)[:, :K]
    top = np.take_along_axis(logp, ids, axis=1)
    tail = np.log(np.clip(1 - np.exp(top).sum(-1), 1e-30, 1))
    return SequenceBatch(
        token_ids=rng.integers(0, VOCAB, size=int(lengths.sum())).astype(np.int32),
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        completion_start=starts, topk_ids=ids.astype(np.int32), topk_logprobs=top.astype(np.float32),
        tail_logprobs=tail.astype(np.float32), target_logprobs=top[:, 0].astype(np.float32),
        behaviour_logprobs=np.where(rng.random(p) < 0.5, -1.0, np.nan).astype(np.float32),
        source=rng.integers(0, 3, size=n).astype(np.uint8), round=np.zeros(n, np.int32),
        prompt_index=np.arange(n, dtype=np.int64), sample_index=np.zeros(n, np.int32),
    )


def build_seed(root: Path) -> dict[str, dict[str, object]]:
    """Two small caches under ``root`` (sqrtq with 2 shards, raw with 1); returns their decoded data."""
    from kd.storage.cache import LogitCache
    from kd.storage.format import CacheFingerprint, CodecConfig, TeacherFingerprint, TokenizerFingerprint

    expected = {}
    rng = np.random.default_rng(0)
    for cache_name, codec, shards in (("sq", CodecConfig(), ("a", "b")), ("raw", CodecConfig(name="raw"), ("a",))):
        fp = CacheFingerprint(TeacherFingerprint("t", "b" * 64), TokenizerFingerprint("a" * 64, VOCAB, "tok"), K, codec)
        cache = LogitCache.create(str(root / cache_name), fp)
        for name in shards:
            cache.write_shard(name, _batch(rng, 12, codec.name == "raw"), {"source": "teacher"})
        expected[cache_name] = {name: cache.read_shard(name).read() for name in shards}
    return expected


# ---------------------------------------------------------------- mutations
def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _record_paths(cache: Path) -> list[Path]:
    return sorted((cache / "commits").glob("*.json"))


def forge(cache: Path) -> None:
    """Recompute size and sha256 of every object of every record, as an attacker would."""
    for rec_path in _record_paths(cache):
        try:
            rec = json.loads(rec_path.read_text())
            objects = {}
            for path in (cache / "shards").rglob("*"):
                rel = str(path.relative_to(cache))
                if path.is_file() and rel.startswith(f"shards/{rec.get('group') or rec.get('name')}/"):
                    data = path.read_bytes()
                    objects[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            rec["objects"] = objects
            rec_path.write_text(json.dumps(rec))
        except (ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError):
            pass  # a record this case already broke (e.g. nested 10^5 deep) stays broken


def _json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, prefix + (i,))


def _mutate_json(path: Path, ch) -> str:
    try:
        doc = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return "json(unparseable)"
    paths = list(_json_paths(doc))
    target = paths[ch.pick(len(paths))]
    action = ch.pick(5)
    if not target or action == 4:
        path.write_text("[" * 100000 + "]" * 100000)  # a nesting bomb
        return f"json-bomb {path.name}"
    parent = doc
    for key in target[:-1]:
        parent = parent[key]
    key = target[-1]
    if action == 0 and isinstance(parent, dict):
        del parent[key]
        desc = "delete"
    elif action == 1 and isinstance(parent, dict):
        parent[f"extra{ch.pick(3)}"] = INTERESTING[ch.pick(len(INTERESTING))]
        desc = "add"
    elif action == 2:
        other = paths[ch.pick(len(paths))]
        value = doc
        for k in other:
            value = value[k]
        parent[key] = json.loads(json.dumps(value))
        desc = "swap"
    else:
        parent[key] = INTERESTING[ch.pick(len(INTERESTING))]
        desc = f"set={parent[key]!r:.40}"
    path.write_text(json.dumps(doc))
    return f"json {path.relative_to(path.parents[3]) if len(path.parents) > 3 else path.name} {list(target)} {desc}"


def _poke(cache: Path, ch) -> str:
    """Write a bad value into an array through zarr (valid chunks, bad content)."""
    import zarr

    groups = sorted(p for p in (cache / "shards").iterdir() if p.is_dir())
    group = groups[ch.pick(len(groups))]
    arrays = sorted(p.name for p in group.iterdir() if p.is_dir())
    name = arrays[ch.pick(len(arrays))]
    arr = zarr.open_array(str(group / name), mode="r+")
    if arr.shape[0] == 0:
        return f"poke {name} (empty)"
    i = ch.pick(arr.shape[0])
    values = {"f": [np.nan, np.inf, -np.inf, 0.5, 100.0], "i": [-1, VOCAB, 10**6, 2**31 - 1], "u": [0, 255, VOCAB, 65535]}
    kind = arr.dtype.kind
    choices = values.get(kind, [0])
    v = choices[ch.pick(len(choices))]
    info = np.iinfo(arr.dtype) if kind in "iu" else None
    if info is not None:
        v = int(np.clip(v, info.min, info.max))
    index = (i,) + ((ch.pick(arr.shape[1]),) if arr.ndim == 2 else ())
    arr[index] = v
    return f"poke {name}{list(index)}={v}"


def _shard_index(cache: Path, ch, bomb: bool) -> str:
    """Point a shard-index entry anywhere (or at a decompression bomb), with valid crc32c."""
    import google_crc32c  # zarr's own crc32c dependency

    chunks = [p for p in _files(cache / "shards") if p.parent.name == "c" or p.parent.parent.name == "c"]
    if not chunks:
        return "index (no chunk files)"
    path = chunks[ch.pick(len(chunks))]
    data = bytearray(path.read_bytes())
    meta = json.loads((path.parents[1 if path.parent.name == "c" else 2] / "zarr.json").read_text())
    conf = meta["codecs"][0]["configuration"]
    n_chunks = int(np.prod([s // c for s, c in zip(meta["chunk_grid"]["configuration"]["chunk_shape"], conf["chunk_shape"])]))
    index_size = 16 * n_chunks + 4
    if len(data) < index_size:
        return "index (file too short)"
    body, index = data[: len(data) - index_size], np.frombuffer(bytes(data[len(data) - index_size: -4]), "<u8").reshape(-1, 2).copy()
    j = ch.pick(n_chunks)
    if bomb:
        from numcodecs import Blosc

        size = [1 << 20, 64 << 20][ch.pick(2)]
        payload = Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE).encode(np.zeros(size, np.uint8))
        payload += struct.pack("<I", google_crc32c.value(payload))
        index[j] = (len(body), len(payload))
        body += payload
        desc = f"bomb {size} bytes in {path.relative_to(cache)} chunk {j}"
    else:
        choices = [(0, 10**12), (10**12, 16), (len(body) - 1, 100), (2**64 - 2, 2), (0, len(body) + 1)]
        index[j] = choices[ch.pick(len(choices))]
        desc = f"index {path.relative_to(cache)} chunk {j} -> {tuple(int(x) for x in index[j])}"
    raw_index = index.astype("<u8").tobytes()
    path.write_bytes(bytes(body) + raw_index + struct.pack("<I", google_crc32c.value(raw_index)))
    return desc


def mutate(root: Path, ch) -> tuple[str, bool]:
    """Apply one mutation to the caches under ``root``; return (description, forged)."""
    files = _files(root)
    kind = ch.pick(7)
    if kind == 0:
        path = files[ch.pick(len(files))]
        data = bytearray(path.read_bytes())
        if not data:
            return "flip (empty file)", False
        i = ch.pick(len(data))
        data[i] ^= 1 + ch.pick(255)
        path.write_bytes(bytes(data))
        desc = f"flip {path.relative_to(root)}@{i}"
    elif kind == 1:
        path = files[ch.pick(len(files))]
        data = path.read_bytes()
        n = ch.pick(len(data) + 1)
        path.write_bytes(data[:n])
        desc = f"truncate {path.relative_to(root)} to {n}/{len(data)}"
    elif kind in (2, 3):
        jsons = [p for p in files if p.suffix == ".json"]
        desc = _mutate_json(jsons[ch.pick(len(jsons))], ch)
    elif kind == 4:
        caches = sorted(p for p in root.iterdir() if p.is_dir())
        desc = _poke(caches[ch.pick(len(caches))], ch)
    else:
        caches = sorted(p for p in root.iterdir() if p.is_dir())
        desc = _shard_index(caches[ch.pick(len(caches))], ch, bomb=kind == 6)
    forged = kind in (4, 5, 6) or ch.pick(2) == 1
    if forged:
        for cache in root.iterdir():
            if cache.is_dir():
                forge(cache)
    return desc, forged


# ---------------------------------------------------------------- running the reader
def _same(a, b) -> bool:
    for name in ("token_ids", "seq_offsets", "completion_start", "topk_ids", "topk_logprobs", "tail_logprobs",
                 "target_logprobs", "behaviour_logprobs", "source", "round", "prompt_index", "sample_index"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        if x.shape != y.shape or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            return False
    return True


def exercise(root: Path, expected: dict, forged: bool) -> dict[str, str]:
    """Run every reader on the mutated caches; step -> outcome."""
    from kd.stages.train.loader import CacheLoader, LoaderConfig
    from kd.storage.cache import LogitCache
    from kd.storage.errors import KdError
    from kd.storage.verify import verify_cache

    outcomes = {}

    def step(name, fn):
        try:
            outcomes[name] = fn()
        except KdError as err:
            outcomes[name] = type(err).__name__
        except Exception as err:  # noqa: BLE001 (the point: anything else is a crash)
            outcomes[name] = f"CRASH:{type(err).__name__}"
            outcomes[name + ".traceback"] = traceback.format_exc(limit=6)

    for cache_name, shards in expected.items():
        url = str(root / cache_name)

        def read_all():
            cache = LogitCache.open(url)
            results = []
            for name in cache.committed_shard_names():
                reader = cache.read_shard(name)
                batch = reader.read()
                part = reader.read(2, 5)
                ok = name in shards and _same(batch, shards[name]) and _same(part, shards[name].select(range(2, 5)))
                results.append("identical" if ok else ("valid-change" if forged else "SILENT"))
            return "identical" if set(results) <= {"identical"} else sorted(set(results) - {"identical"})[0]

        def verify():
            report = verify_cache(url)
            return "verify-ok" if report.ok else "verify-flagged"

        def load():
            with CacheLoader(url, LoaderConfig(max_tokens_per_batch=1 << 14, num_workers=0)) as loader:
                tokens = sum(b.num_tokens for b in loader.iter_epoch())
            want = sum(int(s.num_tokens) for s in shards.values())
            return "identical" if tokens == want else ("valid-change" if forged else "SILENT")

        step(f"{cache_name}.read", read_all)
        step(f"{cache_name}.verify", verify)
        step(f"{cache_name}.loader", load)
    return outcomes


def run_case(seed: Path, work: Path, expected: dict, ch) -> tuple[str, dict[str, str]]:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(seed, work)
    desc, forged = mutate(work, ch)
    return desc + (" +forged" if forged else ""), exercise(work, expected, forged)


def is_failure(outcome: str) -> bool:
    return outcome.startswith("CRASH") or outcome == "SILENT"


# ---------------------------------------------------------------- entry points
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="Run random cases for this long.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="Write the summary as JSON here.")
    parser.add_argument("--atheris", action="store_true", help="Coverage-guided fuzzing with atheris instead.")
    args, rest = parser.parse_known_args(argv)
    logging.disable(logging.WARNING)
    sys.path.insert(0, str(REPO.parent))
    tmp = Path(tempfile.mkdtemp(prefix="kd-fuzz-"))
    seed_dir = tmp / "seed"
    seed_dir.mkdir()
    expected = build_seed(seed_dir)
    if args.atheris:
        return _atheris(seed_dir, tmp / "work", expected, rest)
    rng = random.Random(args.seed)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures, cases, t0 = [], 0, time.time()
    while time.time() - t0 < args.seconds:
        desc, outcomes = run_case(seed_dir, tmp / "work", expected, RandomChooser(rng))
        cases += 1
        for step, outcome in outcomes.items():
            if not step.endswith(".traceback"):
                counts[step.split(".", 1)[1]][outcome] += 1
                if is_failure(outcome):
                    failures.append({"case": desc, "step": step, "outcome": outcome,
                                     "traceback": outcomes.get(step + ".traceback", "")})
    summary = {"cases": cases, "seconds": round(time.time() - t0, 1), "seed": args.seed,
               "outcomes": {k: dict(v.most_common()) for k, v in counts.items()},
               "failures": len(failures), "first_failures": failures[:10],
               "machine": f"{platform.machine()} {platform.python_version()}"}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


def _atheris(seed_dir: Path, work: Path, expected: dict, libfuzzer_args: list[str]) -> int:
    import atheris

    def one_input(data: bytes) -> None:
        _, outcomes = run_case(seed_dir, work, expected, AtherisChooser(atheris.FuzzedDataProvider(data)))
        bad = {k: v for k, v in outcomes.items() if not k.endswith(".traceback") and is_failure(v)}
        if bad:
            raise RuntimeError(f"reader failure: {bad} {outcomes}")

    # coverage feedback on kd's own modules (already imported by build_seed)
    for name, module in list(sys.modules.items()):
        if name == "kd" or name.startswith("kd.storage") or name == "kd.stages.train.loader":
            for value in list(vars(module).values()):
                if callable(value) and getattr(value, "__module__", "") == name:
                    try:
                        setattr(module, value.__name__, atheris.instrument_func(value))
                    except Exception:  # noqa: BLE001 (classes and builtins stay as they are)
                        pass
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
