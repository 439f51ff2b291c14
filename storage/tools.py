"""`kd cache ls`, `copy` and `merge`: list, move and combine the committed shards of caches.

Copy protocol (resumable, the same on local disks and object stores). For each
committed shard of the source, in name order:

1. every object its commit record lists is streamed into a shard group of this
   attempt's own at the destination (``shards/<name>.<32 random hex>/``, as
   ``LogitCache.write_shard`` does), hashing the bytes read: a source object
   that does not match its record is not committed;
2. every object is read back from the destination and hashed again (verified
   on arrival: a damaged transfer is not committed either), and the shard is
   opened there (metadata, shapes, offsets);
3. only then is the commit record created, exclusively, through the
   destination cache's own commit (``LogitCache._commit``).

A copy that is killed leaves at most an uncommitted group, which readers never
see (``kd cache gc`` removes it). Rerunning the same copy skips every shard
already committed at the destination with the same content (the same object
sizes and SHA-256s) and redoes the others. Shards that failed their checksums
are reported together at the end; the others are copied.

The commit record is copied as stored, fields unknown to this kd (a newer
minor version) included; only ``name``, ``group``, the object paths (which
name the group) and ``fingerprint_sha256`` (equal fingerprints can differ in
display names, which the hash covers) are rewritten, and a 1.x record becomes
a 2.0 one (it now names its group).

Merge = copy from several caches into one, after checking that their
fingerprints (teacher weights, tokenizer, k, codec) are identical. Shard-name
collisions: two shards with the same name and the same content (the same
object sizes and SHA-256s) are one shard, copied once. Same name, different
content: refused by default, naming the shards, before anything is written.
With ``on_conflict="rename"`` the shard of the later input number i (1-based,
command-line order) is committed as ``<name>.m<i>`` (still a valid shard name;
``kd generate`` treats such names as foreign and never overwrites them).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass

from tqdm.auto import tqdm

from kd.storage import remote
from kd.storage.cache import LogitCache, ShardReader
from kd.storage.errors import CacheError, FingerprintMismatchError, KdError
from kd.storage.format import (
    FORMAT_VERSION,
    SHARD_NAME_RE,
    SHARDS_GROUP,
    ShardRecord,
    canonical_json,
    fingerprint_sha256,
    format_version_str,
    parse_group_name,
)

BLOCK_BYTES = 8 << 20
"""Objects are streamed in blocks of this size: memory does not grow with shard size."""

ON_CONFLICT = ("refuse", "rename")


# ---------------------------------------------------------------- kd cache ls
def list_shards(url: str) -> list[dict]:
    """One dict per committed shard: name, counts, bytes and provenance (commit records only)."""
    cache = LogitCache.open(url)
    rows = []
    for record in cache.committed_shards():
        prov = record.provenance
        refresh = prov.get("refresh") if isinstance(prov.get("refresh"), dict) else {}
        rows.append({
            "name": record.name,
            "round": prov.get("round"),
            "source": prov.get("source"),
            "sequences": record.num_sequences,
            "tokens": record.num_tokens,
            "positions": record.num_positions,
            "bytes": cache.object_bytes(record),
            "student_step": prov.get("student_step"),
            "created_at": prov.get("created_at"),
            "refresh_run": refresh.get("run_id"),
        })
    return rows


def format_listing(url: str, rows: list[dict]) -> str:
    """A table of ``list_shards`` rows with a total line; '-' where provenance has no value."""
    head = ("shard", "round", "source", "sequences", "tokens", "positions", "bytes", "step", "created")
    table = [head] + [
        (r["name"], *("-" if r[key] is None else str(r[key]) for key in ("round", "source")),
         f"{r['sequences']:,}", f"{r['tokens']:,}", f"{r['positions']:,}", f"{r['bytes']:,}",
         "-" if r["student_step"] is None else str(r["student_step"]), str(r["created_at"] or "-"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    right = {3, 4, 5, 6}  # numbers

    def line(row) -> str:
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        return "  ".join(cells).rstrip()

    lines = [line(row) for row in table]
    total = (f"{len(rows)} committed shard(s) in {url}: {sum(r['sequences'] for r in rows):,} sequences, "
             f"{sum(r['positions'] for r in rows):,} completion tokens, {sum(r['bytes'] for r in rows):,} bytes")
    return "\n".join(lines + [total])


# ---------------------------------------------------------------- transfers
@dataclass
class _Transfer:
    """One committed shard of ``src`` to commit as ``name`` in the destination."""

    src: LogitCache
    record: ShardRecord
    name: str

    @property
    def bytes(self) -> int:
        return self.src.object_bytes(self.record)


def content_key(record: ShardRecord) -> tuple:
    """What makes two shards the same: the sizes and SHA-256s of their objects (not their paths)."""
    return tuple(sorted((meta["size"], meta["sha256"]) for meta in record.objects.values()))


def _open_or_create(url: str, src: LogitCache, src_label: str) -> LogitCache:
    """The destination cache, created with the source's fingerprint, or an existing one that must match it."""
    try:
        dst = LogitCache.open(url)
    except KdError:
        return LogitCache.create(url, src.fingerprint)  # re-raises anything but "no cache here"
    dst.fingerprint.check_same(src.fingerprint, f"the destination {url}", src_label)
    return dst


def _record_for(transfer: _Transfer, dst: LogitCache) -> dict:
    """The commit record to write at the destination: the stored JSON (fields unknown to this kd are
    kept) with the destination's fingerprint hash, the shard's name there, and a fresh group."""
    src, record = transfer.src, transfer.record
    raw = json.loads(src._fs.cat_file(src._commit_path(record.name)))
    if int(record.format_version.split(".")[0]) < FORMAT_VERSION[0]:
        raw["format_version"] = format_version_str()  # the record now names a group (format 2.0)
    group = parse_group_name(f"{transfer.name}.{uuid.uuid4().hex}", transfer.name)
    old_prefix = record.group_dir + "/"
    raw.update(
        name=transfer.name,
        group=group,
        fingerprint_sha256=fingerprint_sha256(dst.fingerprint),
        objects={f"{SHARDS_GROUP}/{group}/{path[len(old_prefix):]}": meta for path, meta in record.objects.items()},
    )
    return raw


def _makedirs(fs, path: str) -> None:
    if remote.is_local(fs):  # object stores have no folders
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)


def _stream(src_fs, src_path: str, dst_fs, dst_path: str, bar) -> tuple[int, str]:
    """Copy one object block by block; return (size, sha256) of the bytes read from the source."""
    digest, size = hashlib.sha256(), 0
    _makedirs(dst_fs, dst_path)
    with src_fs.open(src_path, "rb") as fin, dst_fs.open(dst_path, "wb") as fout:
        while block := fin.read(BLOCK_BYTES):
            digest.update(block)
            fout.write(block)
            size += len(block)
            bar.update(len(block))
    return size, digest.hexdigest()


def _hash(fs, path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _copy_shard(transfer: _Transfer, dst: LogitCache, bar) -> str | None:
    """Copy, verify and commit one shard; return a problem (shard left uncommitted) or None.

    The objects go to a group of this attempt's own (as ``LogitCache.write_shard`` does), so
    concurrent or killed copies never write into each other's files.
    """
    src, record = transfer.src, transfer.record
    raw = _record_for(transfer, dst)
    pairs = list(zip(record.objects.items(), raw["objects"], strict=True))  # ((source path, meta), destination path)
    for (src_rel, meta), dst_rel in pairs:
        size, sha = _stream(src._fs, f"{src._root}/{src_rel}", dst._fs, f"{dst._root}/{dst_rel}", bar)
        if (size, sha) != (meta["size"], meta["sha256"]):
            return (f"source object {src_rel} has {size} bytes, sha256 {sha[:12]}…, but its commit record says "
                    f"{meta['size']} bytes, {meta['sha256'][:12]}… (run `kd cache verify {src.url}`)")
    for (_, meta), dst_rel in pairs:
        size, sha = _hash(dst._fs, f"{dst._root}/{dst_rel}")
        if (size, sha) != (meta["size"], meta["sha256"]):
            return (f"object {dst_rel} arrived damaged ({size} bytes, sha256 {sha[:12]}…; "
                    f"expected {meta['sha256'][:12]}…)")
    copied = ShardRecord.from_dict(raw, where=f"commit record of {transfer.name}")
    ShardReader(dst, copied)  # opens (metadata, shapes, offsets) before it becomes visible
    if not dst._commit(transfer.name, canonical_json(raw).encode()):
        dst._fs.rm(dst.shard_group_path(copied), recursive=True)  # our own group: nobody else uses it
        if content_key(dst.load_record(transfer.name)) != content_key(record):
            raise CacheError(f"shard {transfer.name} was committed in {dst.url} by another writer with "
                             "different content while this copy wrote it; nothing of this copy is left")
    return None


def _run(dst: LogitCache, todo: list[_Transfer], skipped: int, progress: bool, verb: str) -> dict:
    total = sum(t.bytes for t in todo)
    started = time.perf_counter()
    failed = []
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{verb} {len(todo)} shard(s)",
              disable=None if progress else True, dynamic_ncols=True) as bar:
        for done, transfer in enumerate(todo):
            try:
                problem = _copy_shard(transfer, dst, bar)
            except OSError as err:  # network, disk, permissions: committed shards stay intact
                raise CacheError(
                    f"{verb} to {dst.url} stopped at shard {transfer.record.name} of {transfer.src.url} "
                    f"({type(err).__name__}: {err}); {done - len(failed)} shard(s) were committed before. "
                    "Rerun the same command to resume."
                ) from err
            if problem:
                failed.append(f"{transfer.src.url} shard {transfer.record.name}: {problem}")
    seconds = time.perf_counter() - started
    if failed:
        raise CacheError(
            f"{len(failed)} shard(s) failed their checksums and were NOT committed to {dst.url} "
            f"({len(todo) - len(failed)} other(s) were): " + "; ".join(failed)
        )
    return {
        "destination": dst.url,
        "copied_shards": len(todo),
        "skipped_shards": skipped,
        "copied_bytes": total,
        "seconds": round(seconds, 3),
        "bytes_per_second": round(total / seconds) if seconds > 0 else None,
    }


# ---------------------------------------------------------------- kd cache copy
def copy_cache(src_url: str, dst_url: str, progress: bool = True) -> dict:
    """Copy every committed shard of ``src_url`` to ``dst_url`` (created with the source's fingerprint).

    Resumable: shards committed at the destination with the same content are skipped.
    Raises FingerprintMismatchError when the destination is a cache with another
    fingerprint, CacheError when it holds a different shard of the same name or
    when shards fail their checksums (those are left uncommitted).
    """
    src = LogitCache.open(src_url)
    dst = _open_or_create(dst_url, src, f"the source {src_url}")
    todo, skipped, clashes = [], 0, []
    for record in src.committed_shards():
        if dst.is_committed(record.name):
            if content_key(dst.load_record(record.name)) == content_key(record):
                skipped += 1
                continue
            clashes.append(record.name)
        else:
            todo.append(_Transfer(src, record, record.name))
    if clashes:
        raise CacheError(
            f"{dst_url} already holds {len(clashes)} shard(s) of the same name with different content "
            f"({', '.join(clashes[:5])}{', …' if len(clashes) > 5 else ''}); nothing was copied. "
            "Copy into a new destination, or use `kd cache merge --on-conflict rename`."
        )
    return _run(dst, todo, skipped, progress, "copy")


# ---------------------------------------------------------------- kd cache merge
def merge_caches(inputs: list[str], out: str, on_conflict: str = "refuse", progress: bool = True) -> dict:
    """Merge the committed shards of ``inputs`` into ``out`` (see the module docstring for collisions).

    Every check (fingerprints, name collisions) happens before anything is written.
    """
    if not inputs:
        raise CacheError("merge needs at least one input cache")
    if on_conflict not in ON_CONFLICT:
        raise CacheError(f"--on-conflict must be one of {', '.join(ON_CONFLICT)}, got {on_conflict!r}")
    caches = [LogitCache.open(url) for url in inputs]
    first = caches[0]
    for url, cache in zip(inputs[1:], caches[1:], strict=True):
        diffs = first.fingerprint.differences(cache.fingerprint)
        if diffs:
            raise FingerprintMismatchError(
                f"cannot merge {inputs[0]} and {url}: their fingerprints differ ({inputs[0]} vs {url}): "
                + "; ".join(diffs) + ". Only caches made with the same teacher, tokenizer, k and codec merge."
            )
    try:
        existing = LogitCache.open(out)
    except KdError:
        existing = None
    if existing is not None:
        existing.fingerprint.check_same(first.fingerprint, f"the output {out}", f"the input {inputs[0]}")

    # name -> content key of what the output will hold, starting with what it holds already
    taken: dict[str, tuple] = {}
    if existing is not None:
        taken = {r.name: content_key(r) for r in existing.committed_shards()}
    todo, skipped, clashes = [], 0, []
    for number, cache in enumerate(caches, start=1):
        for record in cache.committed_shards():
            key, name = content_key(record), record.name
            if name in taken and taken[name] != key and on_conflict == "rename":
                name = f"{record.name}.m{number}"
                if not SHARD_NAME_RE.match(name):
                    raise CacheError(f"cannot rename shard {record.name!r} of {cache.url}: {name!r} is too long")
            if name not in taken:
                taken[name] = key
                todo.append(_Transfer(cache, record, name))
            elif taken[name] == key:
                skipped += 1
            else:
                clashes.append(f"{record.name} ({cache.url})")
    if clashes:
        raise CacheError(
            f"{len(clashes)} shard name(s) appear in several inputs with different content: "
            f"{', '.join(clashes[:5])}{', …' if len(clashes) > 5 else ''}; nothing was written to {out}. "
            "Pass --on-conflict rename to keep both (the later input's shard becomes <name>.m<input number>)."
        )
    if existing is None:
        existing = LogitCache.create(out, first.fingerprint)
    already = {n for n in existing.committed_shard_names()}
    pending = [t for t in todo if t.name not in already]  # committed by a concurrent or earlier run
    summary = _run(existing, pending, skipped + len(todo) - len(pending), progress, "merge")
    summary["inputs"] = list(inputs)
    summary["renamed_shards"] = sorted(t.name for t in todo if t.name != t.record.name)
    return summary
