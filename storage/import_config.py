"""Options of ``kd cache import`` (kept apart from ``exchange`` so building the CLI does not import pyarrow)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kd.storage.errors import ConfigError
from kd.storage.format import CODECS, SOURCES


@dataclass(frozen=True)
class ImportConfig:
    """Options of ``kd cache import``: Parquet files and the provenance the user vouches for."""

    files: tuple[str, ...]
    """Parquet files (or folders, searched for *.parquet) with one row per sequence (FORMAT.md section 9)."""
    out: str
    """The cache to write: a new one, or an existing cache with the same fingerprint (shards are added)."""
    teacher_name: str
    """Display name of the teacher that produced the log-probs."""
    teacher_revision: str = ""
    """Revision of the teacher (a hub commit, a tag); recorded in every shard's provenance."""
    teacher_weights: str = ""
    """Folder of the teacher's weights: its SHA-256 becomes the fingerprint's weights_sha256."""
    teacher_sha256: str = ""
    """The teacher's weights SHA-256 (64 hex digits) when the weights are not at hand. Without it and
    --teacher-weights, the fingerprint uses sha256 of 'name@revision'."""
    tokenizer: str = ""
    """Folder of the tokenizer the token ids belong to (its fingerprint and vocabulary size are used)."""
    tokenizer_sha256: str = ""
    """Tokenizer fingerprint (64 hex digits, as kd computes it) when no --tokenizer folder is given."""
    vocab_size: int = 0
    """Bound on token ids; required with --tokenizer-sha256, optional (larger model vocab) with --tokenizer."""
    k: int = 0
    """Top-k entries per position; 0 = take it from the first row (every row must then have the same)."""
    codec: str = "sqrtq"
    """Codec of the new cache: 'sqrtq' (compact, lossy) or 'raw' (lossless float32)."""
    codec_levels: int = 340
    """sqrtq only: sqrt(p) is rounded to a multiple of 1/levels."""
    zstd_level: int = 9
    """zstd compression level of every array."""
    source: str = "teacher"
    """Who wrote the completions (dataset, teacher or student) for files without a 'source' column."""
    shard_size: int = 1024
    """Rows (sequences) per shard."""

    def validate(self) -> None:
        problems = []
        if not self.files:
            problems.append("give at least one Parquet file")
        if not self.teacher_name:
            problems.append("--teacher-name: required")
        if self.teacher_weights and self.teacher_sha256:
            problems.append("--teacher-weights and --teacher-sha256: give one, not both")
        for flag, value in (("--teacher-sha256", self.teacher_sha256), ("--tokenizer-sha256", self.tokenizer_sha256)):
            if value and not re.fullmatch(r"[0-9a-f]{64}", value):
                problems.append(f"{flag}: must be 64 lowercase hex digits, got {value!r}")
        if bool(self.tokenizer) == bool(self.tokenizer_sha256):
            problems.append("give exactly one of --tokenizer (a folder) and --tokenizer-sha256")
        if self.tokenizer_sha256 and self.vocab_size < 1:
            problems.append("--vocab-size: required (>= 1) with --tokenizer-sha256")
        if self.k < 0:
            problems.append(f"--k: must be >= 0, got {self.k}")
        if self.codec not in CODECS:
            problems.append(f"--codec: must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.source not in SOURCES:
            problems.append(f"--source: must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.shard_size < 1:
            problems.append(f"--shard-size: must be >= 1, got {self.shard_size}")
        if problems:
            raise ConfigError("invalid import options:\n  " + "\n  ".join(problems))
