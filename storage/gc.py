"""`kd cache gc`: remove what dead writers left behind, never a committed shard or a live writer's work.

Garbage is (docs/FORMAT.md, section 6):

- a shard group under ``shards/`` that no commit record names: the group of a
  writer that died before its commit, or of a writer that lost a commit race
  and died before removing its own group;
- a temporary commit file ``commits/.<name>.json.<hex>.tmp`` of a local writer
  that died between writing and publishing it;
- a temporary ``.zarr.json.<hex>.tmp`` (root or ``shards/``) of a cache creator that
  died between writing and publishing the group metadata.

A live writer's group looks exactly like a dead one's until its record
appears, so gc removes only garbage whose *youngest* object is older than the
grace period ``older_than`` (default one hour; a writer writes a shard group in
seconds to minutes). Just before removing a group, gc re-reads the shard's
commit record, so a group committed while gc ran is kept. The one remaining
race is a writer that stalls for longer than the grace period between reading
its objects back and creating its record: its record would then name removed
objects, which ``kd cache verify`` reports and a rerun cannot fix by itself
(delete the record, rerun generate). Choose ``older_than`` well above the
longest stall you expect. Ages compare object modification times (server
clock on object stores) with this machine's clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from kd.storage import remote
from kd.storage.cache import LogitCache
from kd.storage.errors import ConfigError, KdError
from kd.storage.format import COMMITS_DIR, GROUP_SUFFIX_RE, SHARDS_GROUP, parse_shard_name

DEFAULT_OLDER_THAN = 3600.0
"""Grace period in seconds: garbage younger than this may belong to a live writer and is kept."""


@dataclass
class GcReport:
    url: str
    dry_run: bool
    older_than: float
    removed: list[str] = field(default_factory=list)  # paths relative to the cache root
    kept_young: list[str] = field(default_factory=list)  # garbage candidates inside the grace period
    bytes_removed: int = 0

    def to_dict(self) -> dict:
        return {
            "url": self.url,
            "dry_run": self.dry_run,
            "older_than_s": self.older_than,
            "removed": self.removed,
            "kept_young": self.kept_young,
            "bytes_removed": self.bytes_removed,
        }

    def format(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"gc {self.url}: {verb} {len(self.removed)} leftover(s), {self.bytes_removed:,} bytes"]
        lines += [f"  {verb} {p}" for p in self.removed]
        lines += [f"  kept {p} (younger than {self.older_than:g} s: a live writer?)" for p in self.kept_young]
        return "\n".join(lines)


def _mtime(info: dict) -> float | None:
    """Modification time (epoch seconds) from an fsspec info dict, whatever the backend calls it."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _youngest(fs, path: str) -> tuple[float | None, int]:
    """(latest modification time of anything under ``path``, total bytes); None if undatable."""
    entries = fs.find(path, detail=True, withdirs=False)
    if not entries:  # an empty local folder: its own time
        try:
            entries = {path: fs.info(path)}
        except FileNotFoundError:
            return None, 0
    times = [_mtime(info) for info in entries.values()]
    size = sum(int(info.get("size") or 0) for info in entries.values())
    return (None if any(t is None for t in times) else max(times)), size


def collect_garbage(url: str, older_than: float = DEFAULT_OLDER_THAN, dry_run: bool = False,
                    now: float | None = None) -> GcReport:
    """Remove (or with ``dry_run`` list) uncommitted shard groups and temp files older than ``older_than`` s."""
    if not (isinstance(older_than, (int, float)) and older_than >= 0):
        raise ConfigError(f"--older-than: must be a number of seconds >= 0, got {older_than!r}")
    cache = LogitCache.open(url)
    fs, root = cache._fs, cache._root
    now = time.time() if now is None else now
    report = GcReport(url=url, dry_run=dry_run, older_than=float(older_than))

    referenced = set()
    groups = cache.shard_groups()
    for name in cache.committed_shard_names():
        try:
            referenced.add(cache.load_record(name).group_dir.rsplit("/", 1)[-1])
        except KdError:  # unreadable record: protect every group that could be its
            referenced.update(g for g in groups if _shard_of(g) == name)

    candidates = [(f"{SHARDS_GROUP}/{g}", _shard_of(g)) for g in groups if g not in referenced]
    try:
        temps = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{COMMITS_DIR}", detail=False, refresh=True)]
    except FileNotFoundError:
        temps = []
    candidates += [(f"{COMMITS_DIR}/{t}", None) for t in temps if remote.is_temp_name(t)]
    # temp files of a root or shards-group metadata write killed before it was published (cache
    # creation): put_exclusive's ".zarr.json.<hex>.tmp", or zarr's "zarr.json.partial" (earlier kd)
    for folder in ("", f"{SHARDS_GROUP}/"):
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{folder}", detail=False, refresh=True)]
        except FileNotFoundError:
            names = []
        candidates += [(f"{folder}{b}", None) for b in names if remote.is_temp_name(b)]

    for rel, shard in candidates:
        path = f"{root}/{rel}"
        youngest, size = _youngest(fs, path)
        if youngest is None and size == 0 and not fs.exists(path):
            continue  # vanished meanwhile (its writer cleaned up)
        if youngest is None or now - youngest < older_than:
            report.kept_young.append(rel)
            continue
        if shard is not None and _committed_now(cache, shard, rel):
            continue  # committed while gc ran
        report.removed.append(rel)
        report.bytes_removed += size
        if not dry_run:
            fs.rm(path, recursive=True)
    return report


def _shard_of(group: str) -> str:
    """The shard name of a group folder: ``<name>.<32 hex>`` (2.x) or ``<name>`` (1.x)."""
    if len(group) > 33 and GROUP_SUFFIX_RE.match(group[-33:]):
        return group[:-33]
    return group


def _committed_now(cache: LogitCache, shard: str, rel: str) -> bool:
    try:
        parse_shard_name(shard)
    except KdError:
        return False  # not a shard name: no record can name it
    try:
        return cache.is_committed(shard) and cache.load_record(shard).group_dir == rel
    except KdError:
        return True  # cannot tell: keep it
