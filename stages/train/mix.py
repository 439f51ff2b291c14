"""``MixLoader``: every micro-batch holds a fraction lambda of on-policy data and the rest replay.

Two ``CacheLoader`` streams over one cache, each with its own shard set and its
own share of the padded-token budget ``B`` (``LoaderConfig.max_tokens_per_batch``):

    on_policy   the shards of the freshest refresh round     budget round(lambda * B)
    replay      everything else the run may train on         budget B - round(lambda * B)

``next()`` takes one batch from each stream with a budget and joins them
(``batch.concat_batches``: on-policy sequences first). Which shards go where is
decided by the caller (``kd.stages.train.refresh.select_mix``); this module only
mixes. Rules that keep one code path for every setting:

- A stream with no shards gives its budget to the other, so offline KD (no
  rounds: replay only, budget B) reads exactly the batches a plain
  ``CacheLoader`` would, and fully on-policy training (lambda = 1) reads only the
  freshest round.
- lambda = 0 puts every shard into replay (no on-policy stream).
- A stream whose shard set changes starts a new epoch at once
  (``CacheLoader.refresh``); a stream whose budget changes is rebuilt.

The mix by token budget is what the loss sees: the loss is a mean over loss
positions, so each stream's share of the loss is about its share of the tokens.
Each sub-batch is packed by length as ``CacheLoader`` packs, so the sequence
counts per stream follow the budgets when the lengths are similar.

Exact resume: ``state_dict`` holds, per stream, its shard list, budget and
``CacheLoader`` position; ``load_state_dict`` rebuilds the streams from it, so a
resumed run reads the same batches as an uninterrupted one. A plain
``CacheLoader`` state (checkpoints written before the mix existed) loads as the
replay stream.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

from kd.stages.train.batch import TrainBatch, concat_batches
from kd.stages.train.loader import STATE_FORMAT as LOADER_STATE_FORMAT
from kd.stages.train.loader import CacheLoader, LoaderConfig, LoaderStats
from kd.storage.cache import LogitCache
from kd.storage.errors import ConfigError

STREAMS = ("on_policy", "replay")
STATE_FORMAT = "kd-mix-state"
STATE_VERSION = 1


def split_budget(batch_tokens: int, fraction: float, has_on_policy: bool, has_replay: bool) -> dict[str, int]:
    """Padded-token budget of each stream: lambda * B and the rest; an empty stream gives its share away."""
    if not has_replay:
        return {"on_policy": batch_tokens if has_on_policy else 0, "replay": 0}
    on = round(fraction * batch_tokens) if has_on_policy else 0
    return {"on_policy": on, "replay": batch_tokens - on}


class MixLoader:
    """An endless, resumable stream of mixed ``TrainBatch``es (see the module docstring)."""

    def __init__(self, cache: LogitCache, config: LoaderConfig, fraction: float, *,
                 rank: int = 0, world_size: int = 1):
        if not (0.0 <= fraction <= 1.0):
            raise ConfigError(f"on_policy_fraction: must be in [0, 1], got {fraction!r}")
        self.cache, self.config, self.fraction = cache, config, float(fraction)
        self.rank, self.world_size = rank, world_size
        self.stats = LoaderStats()
        self._streams: dict[str, CacheLoader] = {}
        self._shards: dict[str, list[str]] = {name: [] for name in STREAMS}
        self._budgets: dict[str, int] = {name: 0 for name in STREAMS}

    # ------------------------------------------------------------ shard sets
    @property
    def shards(self) -> dict[str, list[str]]:
        """The shards each stream reads now (a stream with no budget reads none)."""
        return {name: list(names) for name, names in self._shards.items()}

    @property
    def budgets(self) -> dict[str, int]:
        return dict(self._budgets)

    def set_shards(self, on_policy: list[str], replay: list[str]) -> bool:
        """Point the streams at these shards; return True when anything changed.

        Raises ConfigError when a stream's budget is smaller than one of its sequences.
        """
        on_policy, replay = sorted(set(on_policy)), sorted(set(replay) - set(on_policy))
        if self.fraction == 0.0:
            on_policy, replay = [], sorted(set(replay) | set(on_policy))
        budgets = split_budget(self.config.max_tokens_per_batch, self.fraction, bool(on_policy), bool(replay))
        wanted = {"on_policy": on_policy if budgets["on_policy"] else [],
                  "replay": replay if budgets["replay"] else []}
        changed = False
        for name in STREAMS:
            loader = self._streams.get(name)
            if budgets[name] == 0:
                if loader is not None:
                    loader.close()
                    del self._streams[name]
                    changed = True
                continue
            if loader is None or loader.config.max_tokens_per_batch != budgets[name]:
                if loader is not None:
                    loader.close()
                self._streams[name] = self._make(name, budgets[name], wanted[name])
                changed = True
            else:
                diff = loader.refresh(wanted[name])
                changed |= bool(diff.added or diff.removed)
        self._shards, self._budgets = wanted, budgets
        return changed

    def _make(self, name: str, budget: int, names: list[str]) -> CacheLoader:
        wanted = set(names)
        try:
            return CacheLoader(self.cache, replace(self.config, max_tokens_per_batch=budget), rank=self.rank,
                               world_size=self.world_size, shard_filter=lambda record: record.name in wanted)
        except ConfigError as err:
            raise ConfigError(
                f"the {name} stream gets {budget} of --batch-tokens {self.config.max_tokens_per_batch} "
                f"(--on-policy-fraction {self.fraction}), too small for its sequences: {err}. Raise "
                "--batch-tokens, or lower --max-new-tokens of the refresh."
            ) from None

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[TrainBatch]:
        return self

    def __next__(self) -> TrainBatch:
        if not self._streams:
            raise ConfigError(
                f"nothing to train on: no shard of {self.cache.url} is in the mix (the cache is empty, or "
                "every round is beyond --max-staleness). Generate data first (kd generate)."
            )
        t = time.perf_counter()
        batch = concat_batches([next(self._streams[name]) for name in STREAMS if name in self._streams])
        self.stats.wait_s += time.perf_counter() - t
        self.stats.batches += 1
        self.stats.tokens += batch.num_tokens
        self.stats.loss_positions += batch.num_loss_positions
        return batch

    def close(self) -> None:
        for loader in self._streams.values():
            loader.close()
        self._streams.clear()

    def __enter__(self) -> MixLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Per stream: shards, budget and the position of its next batch."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "fraction": self.fraction,
            "batch_tokens": self.config.max_tokens_per_batch,
            "streams": {name: {"shards": list(self._shards[name]), "budget": self._budgets[name],
                               "loader": self._streams[name].state_dict() if name in self._streams else None}
                        for name in STREAMS},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (the same fraction and batch budget are required)."""
        if isinstance(state, dict) and state.get("format") == LOADER_STATE_FORMAT:  # before the mix existed
            state = {"format": STATE_FORMAT, "version": STATE_VERSION, "fraction": self.fraction,
                     "batch_tokens": self.config.max_tokens_per_batch,
                     "streams": {"on_policy": {"shards": [], "budget": 0, "loader": None},
                                 "replay": {"shards": state["shards"], "loader": state,
                                            "budget": self.config.max_tokens_per_batch}}}
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a mix-loader state (expected format {STATE_FORMAT!r})")
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"mix-loader state version {state.get('version')!r} is not {STATE_VERSION}")
        diffs = [f"{key}: checkpoint {state[key]!r}, now {now!r}"
                 for key, now in (("fraction", self.fraction), ("batch_tokens", self.config.max_tokens_per_batch))
                 if state[key] != now]
        if diffs:
            raise ConfigError("cannot resume the data mix exactly: " + "; ".join(diffs))
        self.close()
        for name in STREAMS:
            saved = state["streams"][name]
            self._shards[name], self._budgets[name] = list(saved["shards"]), int(saved["budget"])
            if saved["budget"] > 0:
                loader = self._make(name, saved["budget"], saved["shards"])
                loader.load_state_dict(saved["loader"])
                self._streams[name] = loader
