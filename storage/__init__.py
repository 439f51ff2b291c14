"""The logit cache: the artifact `kd generate` writes and `kd train` reads.

The normative description of the bytes on disk is docs/FORMAT.md; the constants
and metadata classes of that format live in ``kd.storage.format`` (its one source
of truth in code). ``codec`` turns teacher top-k log-probs into compact integer
arrays and back; ``writer`` commits shards atomically; ``reader`` lists
committed shards and streams decoded sequences; ``verify`` checks a cache.
"""
