"""Where a cache lives: a local folder or any fsspec URL (``s3://bucket/prefix``, ``gs://…``).

Three things object stores need that local disks do not:

- **Credentials** come only from the standard environment and config files of
  the backend (for S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_PROFILE``, ``~/.aws/config``, instance roles; ``AWS_ENDPOINT_URL`` or
  ``AWS_ENDPOINT_URL_S3`` for a non-AWS server). kd never writes them, nor the
  endpoint, into the cache, and refuses a URL that embeds a password.
- **Retries**: every S3 request is retried by botocore's ``standard`` retry mode
  (HTTP 500/502/503/504, throttling, connection errors and timeouts) with
  exponential backoff and full jitter: before retry n it sleeps a uniformly
  random time in [0, min(2^(n-1), 20)] seconds, at most ``S3_MAX_ATTEMPTS``
  attempts per request. ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` in the
  environment (or ``retry_mode`` / ``max_attempts`` in the AWS config file)
  take precedence. A request that still fails raises ``OSError``; the shard
  being written then stays uncommitted (invisible) and a rerun redoes it.
- **Exclusive commits**: ``put_exclusive`` writes an object only if it does not
  exist yet, atomically: a hard link of a finished temp file on local disks,
  a conditional PUT (``If-None-Match: *``) on S3. Other fsspec backends fall back
  to fsspec's check-then-write, which two writers can both pass (see
  docs/FORMAT.md, section 6: then the last complete record wins).
"""

from __future__ import annotations

import os
import threading
import uuid
from urllib.parse import urlsplit

import fsspec

from kd.storage.errors import CacheError

S3_MAX_ATTEMPTS = 8
"""Attempts per S3 request (botocore standard retry mode) unless the AWS environment/config says otherwise."""

_S3_PROTOCOLS = ("s3", "s3a")
_RETRY_ENV = ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")


class FetchError(CacheError):
    """An object of a shard could not be fetched (I/O, after the store's own retries): not corruption."""


def protocols(fs) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local(fs) -> bool:
    return "file" in protocols(fs) or "local" in protocols(fs)


def is_s3(fs) -> bool:
    return any(p in _S3_PROTOCOLS for p in protocols(fs))


def storage_options(url: str) -> dict:
    """fsspec options kd adds for ``url``: only S3 retry settings, never credentials."""
    scheme = urlsplit(url).scheme
    if scheme in _S3_PROTOCOLS and not any(os.environ.get(v) for v in _RETRY_ENV):
        return {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}}}
    return {}


def check_url(url: str) -> None:
    """Refuse a URL that carries a password: it would end up in shard provenance and logs."""
    parts = urlsplit(url)
    if parts.scheme and parts.scheme != "file" and parts.password is not None:
        redacted = parts._replace(netloc=f"{parts.username}:***@{parts.hostname}").geturl()
        raise CacheError(
            f"the cache URL {redacted} contains a password. Put credentials in the environment "
            "or the backend's config file (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
            "~/.aws/credentials), never in the URL: kd records cache URLs in provenance."
        )


def url_to_fs(url: str):
    """(filesystem, root path without trailing '/') for a local path or fsspec URL."""
    check_url(url)
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options(url))
    except (ImportError, ValueError) as err:
        raise CacheError(
            f"cannot open cache location {url!r}: {err}. Remote URLs need the 'remote' extra "
            "(pip install 'kd[remote]')."
        ) from err
    return fs, root.rstrip("/") or root


def zarr_store(fs, root: str, url: str, read_only: bool = False):
    """A Zarr store on the cache root, with the same retry settings as kd's own calls."""
    import zarr.storage

    if is_local(fs):
        return zarr.storage.LocalStore(root, read_only=read_only)
    # zarr needs its own instance in asynchronous mode; it gets the same options as ``fs``
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options(url), read_only=read_only)


def is_temp_name(path: str) -> bool:
    """A temp file of an interrupted metadata write: put_exclusive's ``.<name>.<hex>.tmp``, or zarr's
    ``<name>.partial``; what a writer killed before publishing leaves (garbage for ``kd cache gc``)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.endswith(".partial") or (name.startswith(".") and name.endswith(".tmp"))


def put_exclusive(fs, path: str, payload: bytes) -> bool:
    """Write ``payload`` to ``path`` only if nothing is there; True if written, False if it existed.

    Readers never see a partial object: locally the bytes go to a temp file first
    (fsynced), then a hard link publishes it (``link`` fails if the target exists,
    unlike ``rename``); on S3 one conditional PUT does both.
    """
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        _fsync_dir(folder)
        return True
    try:
        fs.pipe_file(path, payload, mode="create")
    except FileExistsError:
        return False
    return True


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ReadAheadStore:
    """A Zarr store wrapper that serves whole objects fetched ahead of time from memory.

    On an object store every Zarr read is a request (shard index, then chunk ranges),
    issued one array after another: reading one segment of a shard costs several
    sequential round trips. ``LogitCache.read_ahead`` and ``ShardPrefetcher`` instead fetch all of a
    shard's objects in one concurrent batch and ``hold`` them here while the shard is
    decoded; reads of anything not held go to the wrapped store as usual.
    Reference-counted (under a lock), so decode threads may hold the same objects.
    """

    def __new__(cls, store):
        from zarr.storage import WrapperStore

        class _Store(WrapperStore):
            def __init__(self, inner, held=None, lock=None):
                super().__init__(inner)
                self._held = {} if held is None else held  # key -> [bytes, refcount]
                self._lock = lock or threading.Lock()

            def _with_store(self, inner):
                return type(self)(inner, self._held, self._lock)

            def hold(self, objects: dict[str, bytes]) -> None:
                with self._lock:
                    for key, data in objects.items():
                        entry = self._held.setdefault(key, [data, 0])
                        entry[1] += 1

            def release(self, objects: dict[str, bytes]) -> None:
                with self._lock:
                    for key in objects:
                        entry = self._held.get(key)
                        if entry is not None:
                            entry[1] -= 1
                            if entry[1] <= 0:
                                del self._held[key]

            async def get(self, key, prototype, byte_range=None):
                entry = self._held.get(key)
                if entry is None:
                    return await self._store.get(key, prototype, byte_range)
                return prototype.buffer.from_bytes(_slice(entry[0], byte_range))

            async def get_partial_values(self, prototype, key_ranges):
                return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

        return _Store(store)


def _slice(data: bytes, byte_range) -> bytes:
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix :] if byte_range.suffix else b""
    raise TypeError(f"unknown byte range {byte_range!r}")
