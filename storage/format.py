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
FORMAT_VERSION = (1, 0)
"""(major, minor). Readers refuse another major; a newer minor only adds fields old readers ignore."""

ROOT_ATTR = "kd"
"""Key of the root group's attributes that holds the cache header."""
SHARDS_GROUP = "shards"
COMMITS_DIR = "commits"
COMMIT_SUFFIX = ".json"

SHARD_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
"""Shard names are plain path components: no '/', no '..', no absolute paths, no URLs."""

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


def format_version_str() -> str:
    return f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"


def parse_format_version(value: Any, where: str) -> tuple[int, int]:
    """Parse 'MAJOR.MINOR' and refuse an unknown major version."""
    if not isinstance(value, str) or not re.fullmatch(r"\d+\.\d+", value):
        raise CacheError(f"{where}: format_version must look like '1.0', got {value!r}")
    major, minor = (int(x) for x in value.split("."))
    if major != FORMAT_VERSION[0]:
        raise FormatVersionError(
            f"{where}: format_version {value} is not readable by this kd "
            f"(it reads major version {FORMAT_VERSION[0]}, any minor). "
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
    """

    name: str
    num_sequences: int
    num_tokens: int
    num_positions: int
    objects: dict[str, dict]
    provenance: dict
    fingerprint_sha256: str
    format_version: str = field(default_factory=format_version_str)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ShardRecord:
        if not isinstance(d, dict):
            raise CacheError(f"{where}: commit record is not a JSON object")
        version = _require(d, "format_version", str, where)
        parse_format_version(version, where)
        name = parse_shard_name(_require(d, "name", str, where), f"{where}.name")
        objects = _require(d, "objects", dict, where)
        prefix = f"{SHARDS_GROUP}/{name}/"
        for path, meta in objects.items():
            if not (isinstance(path, str) and path.startswith(prefix) and ".." not in path.split("/")):
                raise CacheError(f"{where}.objects: path {path!r} is outside {prefix!r}")
            if not (isinstance(meta, dict) and isinstance(meta.get("size"), int)
                    and isinstance(meta.get("sha256"), str)):
                raise CacheError(f"{where}.objects[{path!r}]: needs integer 'size' and 'sha256'")
        counts = {}
        for key in ("num_sequences", "num_tokens", "num_positions"):
            counts[key] = _require(d, key, int, where)
            if counts[key] < 0:
                raise CacheError(f"{where}.{key}: must be >= 0, got {counts[key]}")
        return cls(
            name=name,
            objects=objects,
            provenance=_require(d, "provenance", dict, where),
            fingerprint_sha256=_require(d, "fingerprint_sha256", str, where),
            format_version=version,
            **counts,
        )


def fingerprint_sha256(fp: CacheFingerprint) -> str:
    return sha256_hex(canonical_json(fp.to_dict()))
