"""The small error hierarchy of kd.

Every error a user can trigger with their input (a cache, a flag, a file) is a
``KdError``; its message says what failed, why, and what to do next. Anything
else escaping kd is a bug.
"""


class KdError(Exception):
    """Base class of every error kd raises on bad input or state."""


class ConfigError(KdError):
    """A flag or config value is invalid; the message lists every problem found."""


class CacheError(KdError):
    """A logit cache cannot be opened or used."""


class FormatVersionError(CacheError):
    """The cache was written by a format version this reader does not understand."""


class CorruptShardError(CacheError):
    """A shard's bytes or metadata are inconsistent (checksum, offsets, ranges)."""

    def __init__(self, shard: str, problem: str):
        super().__init__(
            f"shard {shard!r} is corrupt: {problem}. "
            f"Run `kd cache verify` to list every bad shard; re-generate or delete it."
        )
        self.shard = shard
        self.problem = problem


class ShardExistsError(CacheError):
    """A shard name is committed already (shards are immutable; the first commit wins)."""


class FingerprintMismatchError(CacheError):
    """Two parties (cache vs writer, cache vs student, cache vs cache) disagree."""
