"""The loader's promises: coverage, rank split, budget, determinism, exact resume, loss positions,
held-out split, corrupt shards and refresh.

Every test cache tags each sequence with a unique id in its first token (a prompt token,
never a target), so a batch row can be traced back to the stored sequence it came from.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import fields

import numpy as np
import pytest
import torch

from kd.stages.train.batch import TrainBatch
from kd.stages.train.loader import CacheLoader, LoaderConfig, heldout_mask
from kd.storage.cache import LogitCache
from kd.storage.errors import CacheError, ConfigError, CorruptShardError

VOCAB = 1000
K = 8


@pytest.fixture
def write_cache(tmp_path, make_batch, make_fingerprint):
    """write_cache(sizes, ...) -> url; sequence ids keep counting up across calls."""
    state = {"next_id": 0, "seed": 0}

    def write(sizes, samples_per_prompt=1, name="c", max_len=24, prefix="s"):
        url = str(tmp_path / name)
        cache = LogitCache.create(url, make_fingerprint(k=K, vocab_size=VOCAB))
        for s, n in enumerate(sizes):
            state["seed"] += 1
            batch = make_batch(
                np.random.default_rng(state["seed"]),
                num_sequences=n,
                k=K,
                vocab_size=VOCAB,
                max_len=max_len,
            )
            ids = np.arange(state["next_id"], state["next_id"] + n)
            state["next_id"] += n
            batch.token_ids[batch.seq_offsets[:-1]] = ids  # the id tag
            batch.prompt_index = (ids // samples_per_prompt).astype(np.int64)
            batch.sample_index = (ids % samples_per_prompt).astype(np.int32)
            cache.write_shard(
                f"{prefix}{len(cache.committed_shards()):02d}",
                batch,
                {"round": 0, "source": "teacher"},
            )
        return url

    return write


def stored_sequences(url: str) -> dict[int, dict]:
    """id -> the stored sequence's tokens, completion start, prompt and teacher rows."""
    out = {}
    cache = LogitCache.open(url)
    for record in cache.committed_shards():
        batch = cache.read_shard(record).read()
        po = batch.pos_offsets
        for i in range(batch.num_sequences):
            tokens = batch.sequence_tokens(i)
            rows = slice(po[i], po[i + 1])
            out[int(tokens[0])] = {
                "tokens": tokens.astype(np.int64),
                "completion_start": int(batch.completion_start[i]),
                "prompt": int(batch.prompt_index[i]),
                "topk_ids": batch.topk_ids[rows],
                "topk_logprobs": batch.topk_logprobs[rows],
                "tail_logprobs": batch.tail_logprobs[rows],
                "target_logprobs": batch.target_logprobs[rows],
                "behaviour_logprobs": batch.behaviour_logprobs[rows],
            }
    return out


def row_ids(batch: TrainBatch) -> list[int]:
    return batch.input_ids[:, :1].flatten().tolist()


def take(loader: CacheLoader, n: int) -> list[TrainBatch]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(a: list[TrainBatch], b: list[TrainBatch]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for f in fields(TrainBatch):
            u, v = getattr(x, f.name), getattr(y, f.name)
            if isinstance(u, torch.Tensor):
                assert u.dtype == v.dtype and u.shape == v.shape, (i, f.name)
                assert (
                    torch.equal(u.nan_to_num(1.0), v.nan_to_num(1.0))
                    if u.is_floating_point()
                    else torch.equal(u, v)
                ), (i, f.name)
            else:
                assert u == v, (i, f.name)


CFG = {"max_tokens_per_batch": 96, "pad_to_multiple_of": 4, "shuffle_window_shards": 2}


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("balance", ["split", "drop"])
def test_every_sequence_once_per_epoch_across_ranks(write_cache, world_size, balance):
    url = write_cache([9, 14, 3, 11, 20, 7, 12])
    expected = stored_sequences(url)
    config = LoaderConfig(**CFG, balance=balance, num_workers=0)  # no read-ahead: exact counts
    loaders = [CacheLoader(url, config, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in range(2):
        seen, counts = Counter(), []
        for loader in loaders:
            batches = list(loader.iter_epoch())
            counts.append(len(batches))
            assert loader.epoch == epoch + 1 and loader.batch_in_epoch == 0
            for b in batches:
                seen.update(row_ids(b))
        assert len(set(counts)) == 1, f"ranks got different batch counts {counts}"
        assert max(seen.values()) == 1, "a sequence was read twice (by one rank or two)"
        if balance == "split":
            assert set(seen) == set(expected)
        else:
            assert set(seen) <= set(expected) and len(seen) >= len(expected) - 3 * (world_size - 1)
    # ranks read disjoint ranges: each stored position is decoded once per epoch in all
    positions = sum(len(seq["target_logprobs"]) for seq in expected.values())
    decoded = sum(loader.stats.decoded_positions for loader in loaders)
    assert decoded == 2 * positions if balance == "split" else decoded <= 2 * positions


def test_batch_contents_match_the_stored_sequences(write_cache):
    url = write_cache([10, 8, 13])
    expected = stored_sequences(url)
    loader = CacheLoader(url, LoaderConfig(**CFG))
    for batch in loader.iter_epoch():
        assert batch.num_tokens == int(batch.attention_mask.sum())
        m = 0
        for row, sid in enumerate(row_ids(batch)):
            seq = expected[sid]
            n, c = len(seq["tokens"]), seq["completion_start"]
            assert torch.equal(batch.input_ids[row, :n], torch.from_numpy(seq["tokens"]))
            assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
            assert not batch.input_ids[row, n:].any()
            rows = slice(m, m + n - c)
            assert (batch.loss_rows[rows] == row).all()
            # row j is the distribution over token c + j, predicted at column c + j - 1
            assert torch.equal(batch.loss_cols[rows], torch.arange(c - 1, n - 1))
            assert torch.equal(batch.target_ids[rows], torch.from_numpy(seq["tokens"][c:]))
            for name in (
                "topk_ids",
                "topk_logprobs",
                "tail_logprobs",
                "target_logprobs",
                "behaviour_logprobs",
            ):
                got, want = getattr(batch, name)[rows].numpy(), seq[name]
                np.testing.assert_array_equal(got, want, err_msg=name)
            m += n - c
        assert m == batch.num_loss_positions
        assert torch.equal(batch.target_ids, batch.input_ids[batch.loss_rows, batch.loss_cols + 1])
        assert batch.topk_ids.dtype == torch.int64 and batch.topk_logprobs.dtype == torch.float32


@pytest.mark.parametrize("bucketing", [True, False])
def test_token_budget_and_sequence_cap_are_respected(write_cache, bucketing):
    url = write_cache([15, 15, 15], max_len=30)
    config = LoaderConfig(
        max_tokens_per_batch=100,
        pad_to_multiple_of=8,
        max_sequences_per_batch=5,
        length_bucketing=bucketing,
    )
    batches = list(CacheLoader(url, config).iter_epoch())
    for b in batches:
        rows, width = b.input_ids.shape
        assert rows * width <= 100 and width % 8 == 0 and rows <= 5
        assert width - int(b.attention_mask.sum(1).max()) < 8  # no more padding than the rounding
    assert sum(b.input_ids.shape[0] for b in batches) == 45


def test_bucketing_cuts_padding(write_cache):
    url = write_cache([30, 30], max_len=40)
    pad = {}
    for bucketing in (True, False):
        batches = list(
            CacheLoader(
                url,
                LoaderConfig(
                    max_tokens_per_batch=160, pad_to_multiple_of=1, length_bucketing=bucketing
                ),
            ).iter_epoch()
        )
        pad[bucketing] = sum(b.input_ids.numel() - b.num_tokens for b in batches)
    assert pad[True] < pad[False] / 2


def test_same_seed_same_batches_other_seed_other_order(write_cache):
    url = write_cache([9, 14, 3, 11])
    n = 2 * len(CacheLoader(url, LoaderConfig(**CFG)))  # two epochs
    a = take(CacheLoader(url, LoaderConfig(**CFG, seed=1)), n)
    b = take(CacheLoader(url, LoaderConfig(**CFG, seed=1, num_workers=0)), n)
    assert_same_batches(a, b)
    c = take(CacheLoader(url, LoaderConfig(**CFG, seed=2)), n)
    order = lambda batches: [i for x in batches for i in row_ids(x)]
    assert order(a) != order(c)
    half = len(order(a)) // 2
    assert order(a)[:half] != order(a)[half:], "two epochs in the same order"
    assert sorted(order(a)) == sorted(order(c))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_at", [0, 3, "epoch_end", "past_epoch"])
def test_resume_continues_bit_identically(write_cache, num_workers, stop_at):
    url = write_cache([9, 14, 3, 11, 6])
    config = LoaderConfig(**CFG, num_workers=num_workers, prefetch_batches=3)
    loader = CacheLoader(url, config, rank=1, world_size=2)
    per_epoch = len(loader)
    n = {"epoch_end": per_epoch, "past_epoch": per_epoch + 2}.get(stop_at, stop_at)
    take(loader, n)
    state = json.loads(json.dumps(loader.state_dict()))  # plain data: fits any checkpoint
    reference = take(loader, per_epoch + 3)  # crosses an epoch boundary
    loader.close()
    resumed = CacheLoader(url, config, rank=1, world_size=2)
    take(resumed, 2)  # a different position, which load_state_dict must override
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, per_epoch + 3), reference)
    resumed.close()


def test_resume_refuses_a_changed_plan_unless_told(write_cache):
    url = write_cache([9, 14])
    loader = CacheLoader(url, LoaderConfig(**CFG))
    take(loader, 2)
    state = loader.state_dict()
    other = CacheLoader(url, LoaderConfig(**{**CFG, "max_tokens_per_batch": 128, "seed": 5}))
    with pytest.raises(
        ConfigError, match=r"max_tokens_per_batch: checkpoint 96, now 128(.|\n)*seed"
    ):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert other.epoch == 0 and other.batch_in_epoch > 0
    with pytest.raises(ConfigError, match="not a loader state"):
        other.load_state_dict({"epoch": 0})


def test_heldout_split_is_disjoint_stable_and_keeps_prompts_together(write_cache):
    url = write_cache([12, 15, 9, 12], samples_per_prompt=3)
    prompt_of = {sid: s["prompt"] for sid, s in stored_sequences(url).items()}

    def ids(split, seed=0, world_size=1):
        out = set()
        for rank in range(world_size):
            config = LoaderConfig(**CFG, split=split, heldout_fraction=0.3, seed=seed)
            out |= {
                i
                for b in CacheLoader(url, config, rank=rank, world_size=world_size).iter_epoch()
                for i in row_ids(b)
            }
        return out

    train, heldout = ids("train"), ids("heldout")
    assert train and heldout and not train & heldout
    assert train | heldout == set(prompt_of)
    assert not {prompt_of[i] for i in train} & {prompt_of[i] for i in heldout}
    assert ids("heldout", seed=7, world_size=2) == heldout  # the split ignores seed and ranks
    frac = heldout_mask(np.arange(100_000), 0.3, 0).mean()
    assert abs(frac - 0.3) < 0.01
    assert not np.array_equal(
        heldout_mask(np.arange(1000), 0.3, 0), heldout_mask(np.arange(1000), 0.3, 1)
    )


def _flip_byte(path, offset=20):
    data = bytearray(path.read_bytes())
    data[min(offset, len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_topk_chunk(url, shard):
    from pathlib import Path

    chunk = next(
        p
        for p in (next((Path(url) / "shards").glob(f"{shard}.*")) / "topk_codes").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    _flip_byte(chunk)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_raises_naming_it(write_cache, num_workers):
    url = write_cache([8, 8, 8])
    _corrupt_topk_chunk(url, "s01")
    loader = CacheLoader(
        url, LoaderConfig(**{**CFG, "shuffle_window_shards": 1}, num_workers=num_workers)
    )
    with pytest.raises(CorruptShardError, match="'s01'"):
        for _ in range(2 * len(loader)):
            next(loader)


def test_corrupt_shard_is_skipped_with_one_warning_when_asked(write_cache, caplog):
    url = write_cache([8, 8, 8])
    good = {sid for sid in stored_sequences(url)}
    _corrupt_topk_chunk(url, "s01")
    config = LoaderConfig(**{**CFG, "shuffle_window_shards": 1}, skip_bad_shards=True)
    reference = CacheLoader(url, LoaderConfig(**{**CFG, "shuffle_window_shards": 1}))
    with caplog.at_level(logging.WARNING, logger="kd.stages.train.loader"):
        loader = CacheLoader(url, config)
        batches = [b for _ in range(2) for b in loader.iter_epoch()]
    seen = [i for b in batches for i in row_ids(b)]
    assert len(loader) == len(reference)  # batch counts stay put (lockstep)
    # one shard per window: the bad shard's batches come out empty rather than vanish
    assert any(b.input_ids.shape == (0, 0) and b.topk_ids.shape == (0, K) for b in batches)
    assert set(seen) == good - set(range(8, 16)) and len(seen) == 2 * 16
    warnings = [r for r in caplog.records if "s01" in r.getMessage()]
    assert len(warnings) == 1 and "corrupt" in warnings[0].getMessage()


def test_corrupt_sequence_arrays_fail_at_open_or_are_skipped(write_cache, caplog):
    from pathlib import Path

    url = write_cache([8, 8])
    chunk = next(
        p
        for p in (next((Path(url) / "shards").glob("s00.*")) / "seq_offsets").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    _flip_byte(chunk)
    with pytest.raises(CorruptShardError, match="'s00'"):
        CacheLoader(url, LoaderConfig(**CFG))
    with caplog.at_level(logging.WARNING, logger="kd.stages.train.loader"):
        loader = CacheLoader(url, LoaderConfig(**CFG, skip_bad_shards=True))
        seen = {i for b in loader.iter_epoch() for i in row_ids(b)}
    assert seen == set(range(8, 16))
    assert any("s00" in r.getMessage() for r in caplog.records)


def test_refresh_picks_up_newly_committed_shards(write_cache):
    url = write_cache([9, 7])
    loader = CacheLoader(url, LoaderConfig(**CFG))
    take(loader, 1)
    assert loader.refresh() == ([], [])  # nothing new: no-op
    assert (loader.epoch, loader.batch_in_epoch) == (0, 1)
    write_cache([6])  # committed while the loader runs; ids 16..21
    assert loader.shards == ["s00", "s01"]  # invisible until refresh
    changes = loader.refresh()
    assert changes.added == ["s02"] and not changes.removed
    assert (loader.epoch, loader.batch_in_epoch) == (1, 0)  # a new epoch over the new set
    seen = {i for b in loader.iter_epoch() for i in row_ids(b)}
    assert seen == set(range(22))
    state = loader.state_dict()
    assert state["shards"] == ["s00", "s01", "s02"]
    only_new = CacheLoader(url, LoaderConfig(**CFG), shard_filter=lambda r: r.name == "s02")
    assert {i for b in only_new.iter_epoch() for i in row_ids(b)} == set(range(16, 22))
    only_new.load_state_dict(state)  # the checkpoint's shard set wins over the filter
    assert only_new.shards == ["s00", "s01", "s02"]


def test_config_errors_list_every_problem():
    with pytest.raises(ConfigError) as err:
        LoaderConfig(
            max_tokens_per_batch=0,
            split="test",
            heldout_fraction=1.5,
            num_workers=-1,
            balance="pad",
        )
    message = str(err.value)
    for field in ("max_tokens_per_batch", "split", "heldout_fraction", "num_workers", "balance"):
        assert field in message
    with pytest.raises(ConfigError, match="heldout_fraction > 0"):
        LoaderConfig(split="heldout")
    with pytest.raises(ConfigError, match="unknown field"):
        LoaderConfig.from_dict({"batch_size": 4})
    assert LoaderConfig.from_dict(LoaderConfig(seed=3).to_dict()) == LoaderConfig(seed=3)


def test_clear_errors_for_bad_arguments_long_sequences_and_empty_caches(
    write_cache, tmp_path, make_fingerprint
):
    url = write_cache([5], max_len=40)
    with pytest.raises(ConfigError, match=r"rank: must be an integer in \[0, world_size=2\)"):
        CacheLoader(url, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="shard 's00'.*raise max_tokens_per_batch"):
        CacheLoader(url, LoaderConfig(max_tokens_per_batch=8, pad_to_multiple_of=1))
    empty = str(tmp_path / "empty")
    LogitCache.create(empty, make_fingerprint(k=K, vocab_size=VOCAB))
    with pytest.raises(CacheError, match="no train batches"):
        next(CacheLoader(empty))
    with pytest.raises(CacheError, match="need >= world_size"):
        len(CacheLoader(url, world_size=6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pin_memory_returns_pinned_tensors(write_cache):
    url = write_cache([6])
    batch = next(CacheLoader(url, LoaderConfig(**CFG, pin_memory=True)))
    assert batch.input_ids.is_pinned() and batch.topk_logprobs.is_pinned()
