"""Constants and metadata classes of the logit-cache format: its one source of truth in code.

docs/FORMAT.md is the normative description; this module mirrors it. Every
metadata class is a frozen dataclass with ``to_dict``/``from_dict``; the
``parse_*`` validators name the field and the bad value, so a cache from
someone else fails with a message rather than a stack trace.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from kd.storage.errors import CacheError, FingerprintMismatchError, FormatVersionError

FORMAT_NAME = "kd-logit-cache"
FORMAT_VERSION = (2, 0)
"""(major, minor) this kd writes. A newer minor only adds fields old readers ignore."""
READABLE_MAJORS = (1, 2)
"""Major versions this kd reads. 2.0 moved each write attempt into its own shard group
(``ShardRecord.group``); 1.x records (no group, data in ``shards/<name>/``) stay readable."""

ROOT_ATTR = "kd"
"""Key of the root group's attributes that holds the cache header."""
SHARDS_GROUP = "shards"
COMMITS_DIR = "commits"
COMMIT_SUFFIX = ".json"

SHARD_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
"""Shard names are plain path components: no '/', no '..', no absolute paths, no URLs."""
GROUP_SUFFIX_RE = re.compile(r"^\.[0-9a-f]{32}$")
"""A shard group is ``<name>.<32 hex>``: one unique folder per write attempt (format 2.0)."""

# Per-sequence `source` codes (uint8).
SOURCES = ("dataset", "teacher", "student")
SOURCE_CODE = {name: i for i, name in enumerate(SOURCES)}

# Arrays every shard holds, whatever the codec: name -> (dtype, axis it is indexed by).
# N = sequences, T = tokens, P = predicted completion positions.
SEQUENCE_ARRAYS = {
    "seq_offsets": "int64",  # (N+1,) CSR offsets into token_ids
    "pos_offsets": "int64",  # (N+1,) CSR offsets into the position arrays
    "completion_start": "int32",  # (N,) index in the sequence of its first completion token
    "source": "uint8",  # (N,) SOURCE_CODE
    "round": "int32",  # (N,) refresh round that produced the sequence
    "prompt_index": "int64",  # (N,) row of the prompt in the prompt dataset
    "sample_index": "int32",  # (N,) which of the samples for that prompt
}
TOKEN_ARRAYS = {"token_ids": "int32"}  # (T,)

# ---- Limits a reader checks before it allocates or decompresses anything (docs/FORMAT.md, "Security").
# A cache is untrusted input: every count, shape and size it declares is checked against these and
# against each other first, so a crafted cache cannot make a reader allocate more than a bounded
# multiple of what it asked for.
MAX_JSON_BYTES = 16 << 20
"""Largest commit record or zarr.json a reader parses."""
MAX_SHARD_SEQUENCES = 1 << 22
"""Sequences per shard (the per-sequence arrays, ~33 bytes a sequence, are read when a shard opens)."""
MAX_SHARD_TOKENS = 1 << 34
"""Tokens per shard."""
MAX_SHARD_OBJECTS = 1 << 16
"""Objects a commit record may list."""
MAX_CHUNK_BYTES = 16 << 20
"""Largest uncompressed inner chunk (writers aim at 1 MiB)."""
MAX_CHUNKS_PER_SHARD = 1 << 16
"""Inner chunks per Zarr shard file (its index is 16 bytes a chunk)."""
MAX_COMPRESSION_RATIO = 1 << 16
"""A shard's declared decoded bytes (token ids and position arrays) may exceed its stored bytes
by at most this factor (plus ``COMPRESSION_SLACK_BYTES``). blosc-zstd reaches about 30,000 on
constant 16 MiB chunks, so real data never trips it; a size bomb does."""
COMPRESSION_SLACK_BYTES = 64 << 20
"""Decoded bytes a shard may declare beyond the ratio above (chunks equal to the fill value are
not stored at all)."""
LOGPROB_TOLERANCE = 1e-3
"""Target and behaviour log-probs above this are refused (float16 rounding stays far below it)."""

OBJECT_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
"""One component of an object path under a shard group (array names, 'zarr.json', chunk keys)."""
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def format_version_str() -> str:
    return f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"


def parse_format_version(value: Any, where: str) -> tuple[int, int]:
    """Parse 'MAJOR.MINOR' and refuse an unknown major version."""
    if not isinstance(value, str) or not re.fullmatch(r"\d+\.\d+", value):
        raise CacheError(f"{where}: format_version must look like '1.0', got {value!r}")
    major, minor = (int(x) for x in value.split("."))
    if major not in READABLE_MAJORS:
        readable = " and ".join(str(m) for m in READABLE_MAJORS)
        raise FormatVersionError(
            f"{where}: format_version {value} is not readable by this kd "
            f"(it reads major versions {readable}, any minor). "
            + (
                "Upgrade kd (pip install -U kd)."
                if major > FORMAT_VERSION[0]
                else "Convert the cache with the kd version that wrote it."
            )
        )
    return major, minor


def parse_shard_name(value: Any, where: str = "shard name") -> str:
    if not isinstance(value, str) or not SHARD_NAME_RE.match(value) or ".." in value:
        raise CacheError(
            f"{where}: {value!r} is not a valid shard name (lowercase letters, digits, "
            "'.', '_', '-'; at most 128 characters; no path separators)"
        )
    return value


def parse_group_name(value: Any, name: str, where: str = "shard group") -> str:
    """A shard group MUST be ``<name>.<32 lowercase hex>`` for the record's own shard name."""
    if not (isinstance(value, str) and value.startswith(name)
            and GROUP_SUFFIX_RE.match(value[len(name):])):
        raise CacheError(
            f"{where}: {value!r} is not a valid group of shard {name!r} "
            f"(expected '{name}.' followed by 32 lowercase hex digits)"
        )
    return value


def _require(d: dict, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise CacheError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise CacheError(f"{where}.{key}: expected {_type_names(types)}, got {value!r}")
    return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _type_names(types) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class CodecConfig:
    """How the teacher top-k is encoded; part of the cache fingerprint.

    ``name``: "sqrtq" (default, lossy, documented error) or "raw" (lossless fp32).
    ``levels``: sqrtq only; sqrt(probability) is rounded to a multiple of 1/levels.
    ``zstd_level``: compression level of the blosc-zstd codec on every array.
    """

    name: str = "sqrtq"
    levels: int = 340
    zstd_level: int = 9

    def __post_init__(self):
        if self.name not in CODECS:
            raise CacheError(f"codec.name: unknown codec {self.name!r}; known: {sorted(CODECS)}")
        if not (isinstance(self.levels, int) and 2 <= self.levels <= 65535):
            raise CacheError(f"codec.levels: must be an integer in [2, 65535], got {self.levels!r}")
        if not (isinstance(self.zstd_level, int) and 1 <= self.zstd_level <= 22):
            raise CacheError(f"codec.zstd_level: must be in [1, 22], got {self.zstd_level!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.name == "raw":
            d.pop("levels")
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "codec") -> CodecConfig:
        name = _require(d, "name", str, where)
        levels = d.get("levels", 340) if name == "raw" else _require(d, "levels", int, where)
        return cls(name=name, levels=levels, zstd_level=_require(d, "zstd_level", int, where))


CODECS = ("sqrtq", "raw")


@dataclass(frozen=True)
class TokenizerFingerprint:
    """Identity of a tokenizer: a hash of its vocabulary, special tokens and chat template."""

    sha256: str
    vocab_size: int
    name: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "tokenizer") -> TokenizerFingerprint:
        return cls(
            sha256=_require(d, "sha256", str, where),
            vocab_size=_require(d, "vocab_size", int, where),
            name=d.get("name", "") if isinstance(d.get("name", ""), str) else "",
        )


@dataclass(frozen=True)
class TeacherFingerprint:
    """Identity of the teacher: a display name and a hash of its weights."""

    name: str
    weights_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "teacher") -> TeacherFingerprint:
        return cls(
            name=_require(d, "name", str, where),
            weights_sha256=_require(d, "weights_sha256", str, where),
        )


@dataclass(frozen=True)
class CacheFingerprint:
    """What every shard of one cache shares; writers, readers and merges compare it.

    Two caches (or a cache and a writer) are compatible iff their fingerprints are equal.
    """

    teacher: TeacherFingerprint
    tokenizer: TokenizerFingerprint
    k: int
    codec: CodecConfig = field(default_factory=CodecConfig)

    def __post_init__(self):
        if not (isinstance(self.k, int) and 1 <= self.k <= self.tokenizer.vocab_size):
            raise CacheError(
                f"fingerprint.k: must be in [1, vocab_size={self.tokenizer.vocab_size}], "
                f"got {self.k!r}"
            )

    def to_dict(self) -> dict:
        return {
            "teacher": self.teacher.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "k": self.k,
            "codec": self.codec.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "fingerprint") -> CacheFingerprint:
        return cls(
            teacher=TeacherFingerprint.from_dict(_require(d, "teacher", dict, where), f"{where}.teacher"),
            tokenizer=TokenizerFingerprint.from_dict(
                _require(d, "tokenizer", dict, where), f"{where}.tokenizer"
            ),
            k=_require(d, "k", int, where),
            codec=CodecConfig.from_dict(_require(d, "codec", dict, where), f"{where}.codec"),
        )

    def differences(self, other: CacheFingerprint) -> list[str]:
        """Human-readable differences, each naming both sides."""
        out = []
        if self.teacher.weights_sha256 != other.teacher.weights_sha256:
            out.append(
                f"teacher: {self.teacher.name} ({self.teacher.weights_sha256[:12]}) vs "
                f"{other.teacher.name} ({other.teacher.weights_sha256[:12]})"
            )
        if self.tokenizer.sha256 != other.tokenizer.sha256:
            out.append(
                f"tokenizer: {self.tokenizer.name or '?'} (vocab {self.tokenizer.vocab_size}, "
                f"{self.tokenizer.sha256[:12]}) vs {other.tokenizer.name or '?'} "
                f"(vocab {other.tokenizer.vocab_size}, {other.tokenizer.sha256[:12]})"
            )
        if self.k != other.k:
            out.append(f"k: {self.k} vs {other.k}")
        if self.codec.to_dict() != other.codec.to_dict():  # `levels` means nothing for raw
            out.append(f"codec: {self.codec.to_dict()} vs {other.codec.to_dict()}")
        return out

    def check_same(self, other: CacheFingerprint, this_side: str, other_side: str) -> None:
        diffs = self.differences(other)
        if diffs:
            raise FingerprintMismatchError(
                f"{this_side} and {other_side} do not match ({this_side} vs {other_side}): "
                + "; ".join(diffs)
                + ". Use a cache made with the same teacher, tokenizer, k and codec, "
                "or write to a new cache."
            )


@dataclass(frozen=True)
class CacheHeader:
    """The root group's ``kd`` attribute."""

    fingerprint: CacheFingerprint
    format_version: str = field(default_factory=format_version_str)
    format: str = FORMAT_NAME

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "fingerprint": self.fingerprint.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "root attributes 'kd'") -> CacheHeader:
        if not isinstance(d, dict):
            raise CacheError(f"{where}: not a kd logit cache (no 'kd' attribute on the root group)")
        fmt = _require(d, "format", str, where)
        if fmt != FORMAT_NAME:
            raise CacheError(f"{where}.format: expected {FORMAT_NAME!r}, got {fmt!r}")
        version = _require(d, "format_version", str, where)
        parse_format_version(version, where)
        fp = CacheFingerprint.from_dict(_require(d, "fingerprint", dict, where), f"{where}.fingerprint")
        return cls(fingerprint=fp, format_version=version, format=fmt)


@dataclass(frozen=True)
class ShardRecord:
    """A shard's commit record, ``commits/<name>.json``: written last, it makes the shard visible.

    ``objects`` maps each stored object of the shard (a path relative to the cache
    root) to its size and sha256; ``provenance`` says how the data was made.
    ``group`` is the folder under ``shards/`` holding the data, ``<name>.<32 hex>``
    (one per write attempt, format 2.0); empty in 1.x records, whose data is in
    ``shards/<name>/``. Use ``group_dir`` for the path.
    """

    name: str
    num_sequences: int
    num_tokens: int
    num_positions: int
    objects: dict[str, dict]
    provenance: dict
    fingerprint_sha256: str
    format_version: str = field(default_factory=format_version_str)
    group: str = ""

    @property
    def group_dir(self) -> str:
        """The shard group's path relative to the cache root: ``shards/<group>`` (1.x: ``shards/<name>``)."""
        return f"{SHARDS_GROUP}/{self.group or self.name}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.group:
            d.pop("group")  # a 1.x record stays byte-identical when copied
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ShardRecord:
        if not isinstance(d, dict):
            raise CacheError(f"{where}: commit record is not a JSON object")
        version = _require(d, "format_version", str, where)
        parse_format_version(version, where)
        name = parse_shard_name(_require(d, "name", str, where), f"{where}.name")
        group = ""
        if int(version.split(".")[0]) >= 2:
            group = parse_group_name(_require(d, "group", str, where), name, f"{where}.group")
        objects = _require(d, "objects", dict, where)
        prefix = f"{SHARDS_GROUP}/{group or name}/"
        if len(objects) > MAX_SHARD_OBJECTS:
            raise CacheError(f"{where}.objects: {len(objects)} objects, more than the limit {MAX_SHARD_OBJECTS}")
        for path, meta in objects.items():
            parse_object_path(path, prefix, f"{where}.objects")
            size = meta.get("size") if isinstance(meta, dict) else None
            if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0
                    and isinstance(meta.get("sha256"), str) and SHA256_RE.match(meta["sha256"])):
                raise CacheError(
                    f"{where}.objects[{path!r}]: needs an integer 'size' >= 0 and a 64-hex 'sha256'"
                )
        counts = parse_counts(d, where)
        return cls(
            name=name,
            objects=objects,
            provenance=_require(d, "provenance", dict, where),
            fingerprint_sha256=_require(d, "fingerprint_sha256", str, where),
            format_version=version,
            group=group,
            **counts,
        )


def parse_object_path(path: Any, prefix: str, where: str) -> str:
    """An object path of a commit record: ``prefix`` (``shards/<group>/``) then plain components.

    Refuses '..', '.', empty components, absolute paths, URLs, backslashes and anything else a
    path could use to leave the shard group (docs/FORMAT.md, section 2).
    """
    ok = isinstance(path, str) and path.startswith(prefix) and len(path) <= 1024
    if ok:
        parts = path[len(prefix):].split("/")
        ok = all(OBJECT_PART_RE.match(part) and part not in (".", "..") for part in parts)
    if not ok:
        raise CacheError(
            f"{where}: path {path!r} is outside {prefix!r} (object paths are '{prefix}' followed by "
            "plain names: no '..', no absolute paths, no URLs)"
        )
    return path


def parse_counts(d: dict, where: str) -> dict[str, int]:
    """num_sequences / num_tokens / num_positions of a record: within the limits and consistent.

    Every sequence holds at least one token (completion_start >= 1) and predicts at most
    length - 1 positions, so N <= T and P <= T - N.
    """
    limits = {"num_sequences": MAX_SHARD_SEQUENCES, "num_tokens": MAX_SHARD_TOKENS,
              "num_positions": MAX_SHARD_TOKENS}
    counts = {}
    for key, limit in limits.items():
        counts[key] = _require(d, key, int, where)
        if not 0 <= counts[key] <= limit:
            raise CacheError(f"{where}.{key}: must be in [0, {limit}], got {counts[key]}")
    n, t, p = counts["num_sequences"], counts["num_tokens"], counts["num_positions"]
    if n > t or p > t - n:
        raise CacheError(
            f"{where}: counts are inconsistent (num_sequences={n}, num_tokens={t}, num_positions={p}; "
            "a shard needs num_sequences <= num_tokens and num_positions <= num_tokens - num_sequences)"
        )
    return counts


def fingerprint_sha256(fp: CacheFingerprint) -> str:
    return sha256_hex(canonical_json(fp.to_dict()))
