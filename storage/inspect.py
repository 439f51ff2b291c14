"""`kd cache info`: a summary of a cache from its header and commit records alone.

Reads no array data, so it is instant on a local disk and cheap on object stores.
``bytes/token`` is the total stored bytes divided by the number of predicted
completion positions (the tokens that carry teacher data); prompt tokens ride along.
"""

from __future__ import annotations

from collections import Counter

from kd.storage.cache import LogitCache


def cache_summary(url: str) -> dict:
    cache = LogitCache.open(url)
    records = cache.committed_shards()
    fp = cache.fingerprint
    total_bytes = sum(cache.object_bytes(r) for r in records)
    positions = sum(r.num_positions for r in records)
    rounds, sources, steps = Counter(), Counter(), Counter()
    students = set()
    for r in records:
        prov = r.provenance
        rounds[str(prov.get("round", "?"))] += r.num_sequences
        sources[str(prov.get("source", "?"))] += r.num_sequences
        steps[str(prov.get("student_step", "-"))] += r.num_sequences
        if prov.get("student"):
            students.add(str(prov["student"]))
    return {
        "url": url,
        "format_version": cache.header.format_version,
        "teacher": fp.teacher.to_dict(),
        "tokenizer": fp.tokenizer.to_dict(),
        "k": fp.k,
        "codec": fp.codec.to_dict(),
        "shards": len(records),
        "sequences": sum(r.num_sequences for r in records),
        "tokens": sum(r.num_tokens for r in records),
        "positions": positions,
        "bytes": total_bytes,
        "bytes_per_token": (total_bytes / positions) if positions else None,
        "sequences_by_round": dict(sorted(rounds.items())),
        "sequences_by_source": dict(sorted(sources.items())),
        "sequences_by_student_step": dict(sorted(steps.items())),
        "students": sorted(students),
    }


def format_summary(s: dict) -> str:
    def row(label, value):
        return f"  {label:<22} {value}"

    bpt = f"{s['bytes_per_token']:.1f}" if s["bytes_per_token"] is not None else "-"
    codec = ", ".join(f"{k}={v}" for k, v in s["codec"].items())
    lines = [
        f"kd logit cache  {s['url']}",
        row("format version", s["format_version"]),
        row("teacher", f"{s['teacher']['name']}  (weights {s['teacher']['weights_sha256'][:12]})"),
        row("tokenizer", f"{s['tokenizer']['name'] or '?'}  vocab {s['tokenizer']['vocab_size']}  ({s['tokenizer']['sha256'][:12]})"),
        row("k", s["k"]),
        row("codec", codec),
        row("shards", s["shards"]),
        row("sequences", f"{s['sequences']:,}"),
        row("tokens (all)", f"{s['tokens']:,}"),
        row("tokens (completion)", f"{s['positions']:,}"),
        row("stored bytes", f"{s['bytes']:,}"),
        row("bytes/token", f"{bpt}  (per completion token)"),
        row("by round", _counts(s["sequences_by_round"])),
        row("by source", _counts(s["sequences_by_source"])),
        row("by student step", _counts(s["sequences_by_student_step"])),
    ]
    if s["students"]:
        lines.append(row("students", ", ".join(s["students"])))
    return "\n".join(lines)


def _counts(d: dict) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in d.items()) or "-"
