"""Open a shard's Zarr arrays from metadata kd checked first: untrusted bytes meet zarr only here.

zarr-python trusts the metadata it reads. A ``zarr.json`` may name any registered codec (a
plugin's pickle codec would unpickle chunk bytes), declare a shape of 10**12 (reading it
allocates that much), or carry a shard index that points anywhere; and a blosc chunk's header
says how large it decompresses, which the decoder allocates before it looks further. So kd
reads every ``zarr.json`` of a shard itself, accepts only the layout docs/FORMAT.md describes,
and hands zarr the metadata object it validated (zarr never parses the file again):

- node: ``zarr_format`` 3, ``node_type`` array, no storage transformers, no unknown fields;
  the shard group holds no consolidated metadata (which would bypass these checks);
- ``data_type``: exactly the dtype the format prescribes for that array (no object, string or
  structured types); ``shape``: exactly what the commit record's counts imply; ``fill_value`` 0;
- codecs: ``sharding_indexed`` with inner ``bytes(little) -> blosc -> crc32c`` and index
  ``bytes(little) -> crc32c``, nothing else (no pickle, no numcodecs-only codecs);
- chunk shapes: an inner chunk holds at most ``MAX_CHUNK_BYTES`` and divides the shard shape;
  a shard holds at most ``MAX_CHUNKS_PER_SHARD`` chunks and is no larger than the array;
- stored objects: each has the size its commit record says, no chunk file exists that the
  record does not list, and the shard's declared decoded size is within
  ``MAX_COMPRESSION_RATIO`` of its stored size;
- shard indices (of the arrays read in slices): every (offset, nbytes) lies inside its file and
  nbytes is at most the chunk's largest possible compressed size;
- blosc headers, checked on every decode before decompressing: the chunk decompresses to
  exactly its declared size, and its compressed size is the number of bytes read.

Every refusal is a ``CorruptShardError`` naming the shard, the object and the rule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import numpy as np
from zarr.codecs import BloscCodec
from zarr.core.array import Array, AsyncArray
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.storage import StorePath

from kd.storage.errors import CacheError, CorruptShardError
from kd.storage.format import (
    COMPRESSION_SLACK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS_PER_SHARD,
    MAX_COMPRESSION_RATIO,
    MAX_JSON_BYTES,
    MAX_SHARD_OBJECTS,
    ShardRecord,
)

ARRAY_KEYS = {"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
              "fill_value", "codecs", "attributes", "dimension_names", "storage_transformers"}
GROUP_KEYS = {"zarr_format", "node_type", "attributes"}
BLOSC_CNAMES = {"zstd", "lz4", "lz4hc", "blosclz", "zlib"}
BLOSC_SHUFFLES = {"noshuffle", "shuffle", "bitshuffle"}
BLOSC_HEADER = 16
"""blosc1 header: version, versionlz, flags, typesize (1 byte each), then uint32 nbytes,
blocksize, cbytes. blosc never stores more than nbytes + BLOSC_HEADER."""
CRC_BYTES = 4


class ChunkRefused(CacheError):
    """A chunk failed a check made before decompressing it (raised inside zarr's decode)."""


class _CheckedBloscCodec(BloscCodec):
    """blosc that checks the chunk's header against the chunk's declared size before decoding."""

    def _decode_sync(self, chunk_bytes, chunk_spec):
        expected = math.prod(chunk_spec.shape) * chunk_spec.dtype.to_native_dtype().itemsize
        raw = chunk_bytes.as_numpy_array()
        if raw.nbytes < BLOSC_HEADER:
            raise ChunkRefused(f"a blosc chunk of {raw.nbytes} bytes is shorter than its header")
        nbytes, blocksize, cbytes = struct.unpack("<III", raw[4:16].tobytes())
        if nbytes != expected:
            raise ChunkRefused(
                f"a chunk declares {nbytes} decompressed bytes, its array's chunk holds {expected} "
                "(refused before decompressing)"
            )
        if cbytes != raw.nbytes or blocksize > max(nbytes, 1) or (nbytes and blocksize == 0):
            raise ChunkRefused(
                f"a blosc chunk header is inconsistent (cbytes {cbytes}, {raw.nbytes} bytes stored, "
                f"blocksize {blocksize}, nbytes {nbytes})"
            )
        return super()._decode_sync(chunk_bytes, chunk_spec)


@dataclasses.dataclass(frozen=True)
class ArraySchema:
    """What the format prescribes for one array of a shard."""

    dtype: str
    shape: tuple[int, ...]
    sliced: bool  # read in slices (its shard index is checked at open) rather than whole


def read_json(fs, path: str, size: int | None, shard: str, what: str) -> dict:
    """Parse a small JSON object, reading at most MAX_JSON_BYTES; CorruptShardError otherwise."""
    if size is not None and size > MAX_JSON_BYTES:
        raise CorruptShardError(shard, f"{what} has {size} bytes, more than the limit {MAX_JSON_BYTES}")
    try:
        raw = fs.cat_file(path, start=0, end=MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise CorruptShardError(shard, f"{what} is missing") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CorruptShardError(shard, f"{what} is larger than the limit {MAX_JSON_BYTES} bytes")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as err:  # RecursionError: a deeply nested bomb
        raise CorruptShardError(shard, f"{what} is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(value, dict):
        raise CorruptShardError(shard, f"{what} is not a JSON object")
    return value


def open_shard_arrays(cache, record: ShardRecord, schemas: dict[str, ArraySchema]) -> dict[str, Array]:
    """Validate the shard group of ``record`` and return its arrays, built from checked metadata.

    Raises CorruptShardError naming the first rule broken. I/O errors (OSError) pass through.
    """
    fs, root, shard = cache._fs, cache._root, record.name
    group_dir = record.group_dir
    sizes = _stored_sizes(fs, root, record)
    group_meta = read_json(fs, f"{root}/{group_dir}/zarr.json", sizes.get(f"{group_dir}/zarr.json"),
                           shard, f"{group_dir}/zarr.json")
    if group_meta.get("zarr_format") != 3 or group_meta.get("node_type") != "group":
        raise CorruptShardError(shard, f"{group_dir}/zarr.json is not a Zarr v3 group")
    extra = sorted(set(group_meta) - GROUP_KEYS)
    if extra:  # consolidated_metadata would make zarr skip the arrays' own (checked) zarr.json
        raise CorruptShardError(shard, f"{group_dir}/zarr.json has fields kd does not accept: {extra}")
    store = cache.zarr_store()
    arrays, declared, stored = {}, 0, 0
    for name, schema in schemas.items():
        where = f"{group_dir}/{name}/zarr.json"
        meta = read_json(fs, f"{root}/{where}", sizes.get(where), shard, where)
        layout = _check_array_metadata(meta, schema, shard, where)
        try:
            metadata = ArrayV3Metadata.from_dict(meta)
        except Exception as err:  # noqa: BLE001 (fill_value and friends, parsed by zarr)
            raise CorruptShardError(shard, f"{where}: {type(err).__name__}: {err}") from None
        sharding = metadata.codecs[0]
        inner = tuple(_checked_blosc(c) if isinstance(c, BloscCodec) else c for c in sharding.codecs)
        object.__setattr__(metadata, "codecs", (dataclasses.replace(sharding, codecs=inner),))
        arrays[name] = Array(AsyncArray(metadata, StorePath(store, f"{group_dir}/{name}")))
        files = _check_chunk_files(fs, root, record, name, metadata, layout, sizes, shard, schema.sliced)
        if schema.sliced:
            declared += math.prod(schema.shape) * np.dtype(schema.dtype).itemsize
            stored += files
    if declared > MAX_COMPRESSION_RATIO * stored + COMPRESSION_SLACK_BYTES:
        raise CorruptShardError(
            shard,
            f"its arrays declare {declared} decoded bytes but store only {stored} "
            f"(more than {MAX_COMPRESSION_RATIO}x compression: a size bomb?)",
        )
    return arrays


def _stored_sizes(fs, root: str, record: ShardRecord) -> dict[str, int]:
    """Sizes of the objects under the shard group; the record's objects must all be there, same size."""
    try:
        found = fs.find(f"{root}/{record.group_dir}", detail=True)
    except FileNotFoundError:
        found = {}
    sizes = {path[len(root) + 1:]: info.get("size") for path, info in found.items()}
    missing = sorted(set(record.objects) - set(sizes))
    if missing:
        raise CorruptShardError(record.name, f"{len(missing)} object(s) are missing, e.g. {missing[0]}")
    for path, meta in sorted(record.objects.items()):
        if sizes[path] != meta["size"]:
            raise CorruptShardError(
                record.name, f"object {path} has {sizes[path]} bytes, its commit record says {meta['size']}"
            )
    return sizes


@dataclasses.dataclass(frozen=True)
class _Layout:
    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    index_at_end: bool


def _ints(value, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _check_array_metadata(meta: dict, schema: ArraySchema, shard: str, where: str) -> _Layout:
    """Refuse anything but the format's layout, naming the field; return the chunk layout."""

    def bad(msg: str):
        raise CorruptShardError(shard, f"{where}: {msg}")

    extra = sorted(set(meta) - ARRAY_KEYS)
    if extra:
        bad(f"fields kd does not accept: {extra}")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        bad("not a Zarr v3 array")
    if meta.get("data_type") != schema.dtype:
        bad(f"data_type {meta.get('data_type')!r} refused; the format stores this array as {schema.dtype!r}")
    ndim = len(schema.shape)
    if not _ints(meta.get("shape"), ndim) or tuple(meta["shape"]) != schema.shape:
        bad(f"shape {meta.get('shape')!r} disagrees with the commit record, which implies {list(schema.shape)}")
    fill = meta.get("fill_value")
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or fill != 0:
        # chunks equal to the fill value are not stored: another value would change what they read as
        bad(f"fill_value {fill!r} refused (the format's arrays use 0)")
    if meta.get("storage_transformers") not in (None, []):
        bad("storage_transformers are not allowed")
    names = meta.get("dimension_names")
    if names is not None and not (isinstance(names, list) and len(names) == ndim
                                  and all(n is None or isinstance(n, str) for n in names)):
        bad("dimension_names must be a list of names")
    if not isinstance(meta.get("attributes", {}), dict):
        bad("attributes must be an object")
    cke = meta.get("chunk_key_encoding")
    if not (isinstance(cke, dict) and cke.get("name") == "default" and set(cke) <= {"name", "configuration"}
            and (cke.get("configuration") or {}).get("separator", "/") in ("/", ".")
            and set(cke.get("configuration") or {}) <= {"separator"}):
        bad(f"chunk_key_encoding {cke!r} refused (only 'default' with separator '/' or '.')")
    grid = meta.get("chunk_grid")
    if not (isinstance(grid, dict) and grid.get("name") == "regular" and isinstance(grid.get("configuration"), dict)
            and _ints(grid["configuration"].get("chunk_shape"), ndim)):
        bad(f"chunk_grid {grid!r} refused (only 'regular' with one size per dimension)")
    shard_shape = tuple(grid["configuration"]["chunk_shape"])
    codecs = meta.get("codecs")
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)
            and codecs[0].get("name") == "sharding_indexed"):
        bad(f"codecs {_names(codecs)} refused: the format stores every array as one 'sharding_indexed' codec")
    conf = codecs[0].get("configuration")
    if not (isinstance(conf, dict) and set(conf) <= {"chunk_shape", "codecs", "index_codecs", "index_location"}
            and _ints(conf.get("chunk_shape"), ndim)):
        bad("sharding_indexed configuration refused")
    chunk_shape = tuple(conf["chunk_shape"])
    _check_codec_chain(conf.get("codecs"), ("bytes", "blosc", "crc32c"), schema, bad, "inner codecs")
    _check_codec_chain(conf.get("index_codecs"), ("bytes", "crc32c"), schema, bad, "index_codecs")
    if conf.get("index_location", "end") not in ("start", "end"):
        bad(f"index_location {conf.get('index_location')!r} refused")
    itemsize = np.dtype(schema.dtype).itemsize
    if any(c < 1 for c in chunk_shape) or math.prod(chunk_shape) * itemsize > MAX_CHUNK_BYTES:
        bad(f"inner chunk shape {list(chunk_shape)} refused (at most {MAX_CHUNK_BYTES} bytes, no zero sizes)")
    for s, c, n in zip(shard_shape, chunk_shape, schema.shape):
        if s < 1 or s % c or s > max(c, -(-n // c) * c):
            bad(f"shard shape {list(shard_shape)} does not fit inner chunks {list(chunk_shape)} and "
                f"shape {list(schema.shape)} (a multiple of the chunk, no larger than the array)")
    if math.prod(s // c for s, c in zip(shard_shape, chunk_shape)) > MAX_CHUNKS_PER_SHARD:
        bad(f"more than {MAX_CHUNKS_PER_SHARD} chunks per shard")
    if math.prod(-(-n // s) for n, s in zip(schema.shape, shard_shape)) > MAX_SHARD_OBJECTS:
        bad(f"more than {MAX_SHARD_OBJECTS} shard files")
    return _Layout(shard_shape, chunk_shape, conf.get("index_location", "end") == "end")


def _names(codecs) -> list:
    if not isinstance(codecs, list):
        return [codecs]
    return [c.get("name") if isinstance(c, dict) else c for c in codecs]


def _check_codec_chain(codecs, expected: tuple[str, ...], schema: ArraySchema, bad, what: str) -> None:
    if _names(codecs) != list(expected) or not all(isinstance(c, dict) for c in codecs):
        bad(f"{what} {_names(codecs)} refused: the format allows exactly {list(expected)}")
    for codec in codecs:
        conf = codec.get("configuration")
        if not set(codec) <= {"name", "configuration"} or not (conf is None or isinstance(conf, dict)):
            bad(f"{what}: codec {codec.get('name')!r} is malformed")
        conf = conf or {}
        name = codec["name"]
        if name == "bytes":
            if set(conf) - {"endian"} or conf.get("endian", "little") != "little":
                bad(f"{what}: bytes codec configuration {conf!r} refused (little-endian only)")
        elif name == "crc32c":
            if conf:
                bad(f"{what}: crc32c takes no configuration, got {conf!r}")
        elif name == "blosc":
            ok = (set(conf) <= {"typesize", "cname", "clevel", "shuffle", "blocksize"}
                  and conf.get("cname") in BLOSC_CNAMES and conf.get("shuffle") in BLOSC_SHUFFLES
                  and isinstance(conf.get("clevel"), int) and 0 <= conf["clevel"] <= 9
                  and isinstance(conf.get("typesize", 1), int) and 1 <= conf.get("typesize", 1) <= 255
                  and isinstance(conf.get("blocksize", 0), int) and 0 <= conf.get("blocksize", 0) <= MAX_CHUNK_BYTES)
            if not ok:
                bad(f"{what}: blosc configuration {conf!r} refused")


def _checked_blosc(codec: BloscCodec) -> _CheckedBloscCodec:
    return _CheckedBloscCodec(typesize=codec.typesize, cname=codec.cname, clevel=codec.clevel,
                              shuffle=codec.shuffle, blocksize=codec.blocksize)


def _check_chunk_files(fs, root, record, name, metadata, layout: _Layout, sizes, shard, sliced) -> int:
    """Check the array's Zarr shard files against the record and bounds; return their stored bytes.

    For arrays read in slices, also check every shard index entry before zarr follows it.
    """
    prefix = f"{record.group_dir}/{name}/"
    grid = [-(-n // s) for n, s in zip(metadata.shape, layout.shard_shape)]
    keys = {prefix + metadata.encode_chunk_key(tuple(idx)) for idx in np.ndindex(*grid)} if all(grid) else set()
    unlisted = sorted(p for p in sizes if p.startswith(prefix) and p != prefix + "zarr.json" and p not in record.objects)
    if unlisted:
        raise CorruptShardError(shard, f"{unlisted[0]} is not listed in the commit record")
    strays = sorted(p for p in record.objects if p.startswith(prefix) and p != prefix + "zarr.json" and p not in keys)
    if strays:
        raise CorruptShardError(shard, f"{strays[0]} is not a chunk of array {name!r} (shape {list(metadata.shape)})")
    n_chunks = math.prod(s // c for s, c in zip(layout.shard_shape, layout.chunk_shape))
    chunk_bytes = math.prod(layout.chunk_shape) * metadata.data_type.to_native_dtype().itemsize
    max_chunk = chunk_bytes + BLOSC_HEADER + CRC_BYTES
    index_size = 16 * n_chunks + CRC_BYTES
    total = 0
    for key in sorted(k for k in keys if k in sizes):
        size = sizes[key]
        total += size
        if size < index_size or size > index_size + n_chunks * max_chunk:
            raise CorruptShardError(
                shard, f"{key} has {size} bytes, impossible for {n_chunks} chunk(s) of {chunk_bytes} bytes"
            )
        if sliced:
            start = size - index_size if layout.index_at_end else 0
            raw = fs.cat_file(f"{root}/{key}", start=start, end=start + index_size)
            index = np.frombuffer(raw[: 16 * n_chunks], dtype="<u8").reshape(-1, 2)
            used = index[~((index[:, 0] == np.uint64(2**64 - 1)) & (index[:, 1] == np.uint64(2**64 - 1)))]
            lo, hi = (0, size - index_size) if layout.index_at_end else (index_size, size)
            bad = (used[:, 1] > max_chunk) | (used[:, 0] < lo) | (used[:, 0] > hi) | (used[:, 1] > hi - np.minimum(used[:, 0], hi))
            if bad.any():
                off, nb = (int(v) for v in used[int(np.argmax(bad))])
                raise CorruptShardError(
                    shard, f"the shard index of {key} points outside its data (offset {off}, {nb} bytes; "
                    f"data spans bytes [{lo}, {hi}), a chunk at most {max_chunk})"
                )
    return total
