"""Prompt rows in, token ids out: the input side of ``kd generate``.

A prompt source is a ``datasets`` split: a local jsonl / json / parquet / csv
file, a folder of them, or a dataset name already in the local Hugging Face
cache (kd never downloads: the hub is switched offline unless you set
``HF_HUB_OFFLINE=0`` yourself). Each row holds either a plain prompt string or
a chat ``messages`` list ([{"role", "content"}, ...]).

Encoding (``PromptSource.encode``), per row:

- chat messages go through the tokenizer's chat template with the generation
  prompt added; a trailing assistant turn is the reference completion (used by
  ``--source dataset``, dropped otherwise);
- a plain prompt string is wrapped as one user message through the chat
  template when the tokenizer has one (``use_chat_template=False`` tokenizes the
  text as is, with the tokenizer's special tokens);
- a dataset completion is the text the template renders after the generation
  prompt (so it ends with the template's end-of-turn token), or the completion
  text plus EOS without a template;
- prompts longer than ``max_prompt_tokens`` are truncated on the left (the end
  of a prompt is what the completion continues) or skipped, and counted.

Rows are addressed by their index in the split, which is what shards and
``prompt_index`` record; every error names the row and the source.
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass, field
from pathlib import Path

from kd.storage.errors import KdError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
PROMPT_FIELDS = ("messages", "prompt")  # tried in this order when no field is named
COMPLETION_FIELDS = ("completion", "response")
LONG_PROMPT_POLICIES = ("truncate-left", "skip")


class PromptDataError(KdError):
    """The prompt data cannot be read or a row is unusable; the message names the file or row."""


@dataclass
class EncodedRow:
    row: int  # index of the row in the split
    prompt_ids: list[int]
    completion_ids: list[int] | None = None  # the dataset's own completion (source=dataset)


@dataclass
class EncodedRows:
    rows: list[EncodedRow] = field(default_factory=list)
    skipped_long: list[int] = field(default_factory=list)  # rows dropped for length
    truncated: list[int] = field(default_factory=list)  # rows whose prompt was cut on the left


def ensure_offline() -> None:
    """Make hub look-ups fail fast instead of hanging, unless the user opted in to the network."""
    if os.environ.get("HF_HUB_OFFLINE", "1").lower() in ("0", "false", "no", "off"):
        return
    import sys

    if "huggingface_hub" in sys.modules:  # imported before our env default took effect
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True


def check_utf8(path: Path) -> None:
    """Raise PromptDataError naming the file, line and byte offset of the first invalid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, newlines = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                bad = offset + err.start
                line = newlines + chunk[: err.start].count(b"\n") + 1
                raise PromptDataError(
                    f"{path} is not valid UTF-8 (line {line}, byte offset {bad}: {err.reason}). "
                    "Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
                ) from None
            offset += len(chunk)
            newlines += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise PromptDataError(f"{path} is not valid UTF-8 (truncated character at its end)") from None


SPLIT_COLUMN = "split"
"""A single file has one dataset split; a column of this name partitions its rows into splits."""


def _split_of_file(dataset, path: Path, split: str):
    """The rows of a single-file dataset that belong to ``split``.

    With a ``split`` column (e.g. the shipped data/prompts.jsonl: train / heldout),
    the split is the rows whose column equals it, in file order; without one the
    whole file is the split 'train'. Rows are then addressed by their index within
    the split, for generate, train and eval alike.
    """
    if SPLIT_COLUMN in dataset.column_names:
        values = dataset[SPLIT_COLUMN]
        rows = [i for i, v in enumerate(values) if v == split]
        if not rows:
            raise PromptDataError(
                f"{path}: no row has {SPLIT_COLUMN!r} == {split!r}; the values present are "
                f"{sorted({str(v) for v in values})}. Pass one of them with --split."
            )
        return dataset.select(rows) if len(rows) != len(dataset) else dataset
    if split != "train":
        raise PromptDataError(
            f"{path} is a single file without a {SPLIT_COLUMN!r} column, so it has only the split "
            f"'train' (got --split {split}). Add a {SPLIT_COLUMN!r} column to mark held-out rows."
        )
    return dataset


def open_dataset(data: str, split: str):
    """The ``datasets.Dataset`` for ``data`` (file, folder or cached hub name) and ``split``."""
    ensure_offline()
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    path = Path(data).expanduser()
    try:
        if path.is_file():
            builder = LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise PromptDataError(
                    f"{path}: unknown file type {path.suffix!r}; use one of {sorted(LOCAL_BUILDERS)}"
                )
            check_utf8(path)
            return _split_of_file(datasets.load_dataset(builder, data_files=str(path), split="train"), path, split)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES:
                    check_utf8(f)
            return datasets.load_dataset(str(path), split=split)
        if data.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_BUILDERS or not _looks_like_hub_name(data):
            raise PromptDataError(f"prompt data {data!r} does not exist (no such file or folder)")
        return datasets.load_dataset(data, split=split)
    except PromptDataError:
        raise
    except (ConnectionError, FileNotFoundError) as err:
        raise PromptDataError(
            f"prompt data {data!r} is neither a local file or folder nor a dataset in the local "
            f"Hugging Face cache ({err}). kd runs offline: pass a local path, or download it first "
            f"(`huggingface-cli download --repo-type dataset {data}`)."
        ) from None
    except ValueError as err:
        if "split" in str(err).lower():
            raise PromptDataError(f"prompt data {data!r} has no split {split!r}: {err}") from None
        raise PromptDataError(f"cannot read prompt data {data!r}: {err}") from None
    except Exception as err:  # datasets wraps parse errors in many types
        cause = err.__cause__ or err.__context__
        detail = f"{err}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
        raise PromptDataError(f"cannot read prompt data {data!r}: {detail}") from None


def _looks_like_hub_name(data: str) -> bool:
    parts = data.split("/")
    return len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)


class PromptSource:
    """Rows of one split, encoded on demand (one shard's row range at a time)."""

    def __init__(
        self,
        data: str,
        tokenizer,
        *,
        split: str = "train",
        prompt_field: str = "",
        completion_field: str = "",
        need_completion: bool = False,
        use_chat_template: bool = True,
        max_prompt_tokens: int = 1024,
        long_prompts: str = "truncate-left",
        dataset=None,
    ):
        self.data = data
        self.split = split
        self.dataset = dataset if dataset is not None else open_dataset(data, split)
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.long_prompts = long_prompts
        self.need_completion = need_completion
        has_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = use_chat_template and has_template
        self._has_template = has_template
        columns = list(self.dataset.column_names)
        # Unnamed: each row's prompt is its first non-null one of 'messages', 'prompt'.
        if prompt_field:
            self.prompt_fields = [self._pick(prompt_field, (), columns, "--prompt-field")]
        else:
            self.prompt_fields = [c for c in PROMPT_FIELDS if c in columns]
            if not self.prompt_fields:
                self._pick("", PROMPT_FIELDS, columns, "--prompt-field")  # raises, listing the columns
        self.completion_field = None
        if need_completion:
            if completion_field:
                self.completion_field = self._pick(completion_field, (), columns, "--completion-field")
            elif "messages" not in self.prompt_fields or any(c in columns for c in COMPLETION_FIELDS):
                self.completion_field = self._pick("", COMPLETION_FIELDS, columns, "--completion-field")
            # else: the completion is the assistant turn at the end of `messages`
        eos = tokenizer.eos_token_id
        self.eos_token_id = eos

    def _pick(self, name: str, candidates: tuple[str, ...], columns: list[str], flag: str) -> str:
        if name:
            if name not in columns:
                raise PromptDataError(f"{self.where}: no column {name!r} ({flag}); columns are {columns}")
            return name
        for c in candidates:
            if c in columns:
                return c
        raise PromptDataError(
            f"{self.where}: none of the columns {list(candidates)} is present; columns are {columns}. "
            f"Name the column with {flag}."
        )

    @property
    def prompt_field(self) -> str:
        return "|".join(self.prompt_fields)

    @property
    def where(self) -> str:
        return f"{self.data} (split {self.split})"

    @property
    def dataset_id(self) -> str:
        path = Path(self.data).expanduser()
        return str(path.resolve()) if path.exists() else self.data

    def __len__(self) -> int:
        return len(self.dataset)

    # ------------------------------------------------------------ encoding
    def encode(self, start: int, stop: int) -> EncodedRows:
        """Encode rows [start, stop) of the split."""
        out = EncodedRows()
        columns = self.dataset[start:stop]
        candidates = [columns[f] for f in self.prompt_fields]
        completions = columns[self.completion_field] if self.completion_field else None
        for j in range(stop - start):
            row = start + j
            field_name, value = next(
                ((f, c[j]) for f, c in zip(self.prompt_fields, candidates) if c[j] is not None),
                (self.prompt_field, None),
            )
            prompt_ids, completion_ids = self._encode_row(
                row, field_name, value, None if completions is None else completions[j]
            )
            if len(prompt_ids) > self.max_prompt_tokens:
                if self.long_prompts == "skip":
                    out.skipped_long.append(row)
                    continue
                prompt_ids = prompt_ids[-self.max_prompt_tokens :]
                out.truncated.append(row)
            out.rows.append(EncodedRow(row=row, prompt_ids=prompt_ids, completion_ids=completion_ids))
        return out

    def _encode_row(self, row: int, field_name: str, value, completion) -> tuple[list[int], list[int] | None]:
        where = f"{self.where}, row {row}"
        if value is None:
            raise PromptDataError(f"{where}: field {' or '.join(map(repr, self.prompt_fields))} is missing (null)")
        if isinstance(value, str):
            if not value.strip():
                raise PromptDataError(f"{where}: the prompt in {field_name!r} is empty")
            messages = [{"role": "user", "content": value}] if self.use_chat_template else None
            prompt_text = value
        elif isinstance(value, list):
            messages = _check_messages(value, where, field_name)
            if not self._has_template:
                raise PromptDataError(
                    f"{where}: chat messages need a tokenizer with a chat template, and this one has none"
                )
            prompt_text = None
        else:
            raise PromptDataError(
                f"{where}: field {field_name!r} must be a string or a list of chat messages, "
                f"got {type(value).__name__}"
            )
        reference = None  # the completion text, when the data has one
        if messages and messages[-1]["role"] == "assistant":
            reference = messages[-1]["content"]
            messages = messages[:-1]
            if not messages:
                raise PromptDataError(f"{where}: the messages hold only an assistant turn, no prompt")
        if self.completion_field:
            if completion is None or not isinstance(completion, str):
                raise PromptDataError(
                    f"{where}: field {self.completion_field!r} is missing or not a string ({completion!r})"
                )
            reference = completion
        if self.need_completion and (reference is None or not reference.strip()):
            raise PromptDataError(
                f"{where}: --source dataset needs a completion, but the row has "
                + ("an empty one" if reference is not None else "no assistant turn at the end of its messages")
            )

        tok = self.tokenizer
        if messages is not None:
            prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tok(prompt_text, add_special_tokens=True)["input_ids"]
        if not prompt_ids:
            raise PromptDataError(f"{where}: the prompt encodes to no tokens")
        if not self.need_completion:
            return list(prompt_ids), None
        completion_ids = self._encode_completion(messages, prompt_text, reference)
        if not completion_ids:
            raise PromptDataError(f"{where}: the completion encodes to no tokens")
        return list(prompt_ids), completion_ids

    def _encode_completion(self, messages, prompt_text: str, reference: str) -> list[int]:
        tok = self.tokenizer
        if messages is not None:
            full = tok.apply_chat_template(
                messages + [{"role": "assistant", "content": reference}], tokenize=False
            )
            if full.startswith(prompt_text):
                ids = list(tok(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
                if self.eos_token_id is not None and self.eos_token_id in ids:
                    ids = ids[: ids.index(self.eos_token_id) + 1]  # drop what the template adds after EOS
                return ids
        ids = list(tok(reference, add_special_tokens=False)["input_ids"])
        return ids + ([self.eos_token_id] if self.eos_token_id is not None else [])


def _check_messages(value: list, where: str, field_name: str) -> list[dict]:
    if not value:
        raise PromptDataError(f"{where}: the message list in {field_name!r} is empty")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PromptDataError(
                f"{where}: message {i} of {field_name!r} must be {{'role': str, 'content': str}}, got {m!r}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out if m["role"] != "assistant"):
        raise PromptDataError(f"{where}: the messages in {field_name!r} have no non-empty prompt turn")
    return out
