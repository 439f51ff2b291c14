"""``kd eval``: how close the student is to the teacher on held-out prompts, measured live.

For every evaluated prompt x (the rows of ``--data`` in ``--split``, the first
``--limit`` of them) completions are sampled with the generate stage's sampler
(``HfSampler``), one per prompt from each side:

- **student samples** y ~ q(. | x): the student's own outputs, the distribution
  on-policy distillation (GKD) trains on and the one users see;
- **teacher samples** y ~ p(. | x): what the teacher would write (the data of
  sequence-level KD).

Both models then score every prompt + completion with the generate stage's
scorer (``HfScorer.logprobs``: teacher forcing, fp32 head), and at each
completion position t (predicting y_t; the final EOS included) kd computes, over
the **full vocabulary** (exact: no top-k, no tail bucket):

    kl           KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v))    nats/token
    top1         1[argmax_v p_t(v) == argmax_v q_t(v)]
    student_nll  -log q_t(y_t)          student_ppl = exp(mean student_nll)
    teacher_nll  -log p_t(y_t)          teacher_ppl = exp(mean teacher_nll)

Every number is a mean over all completion positions of all sequences
(token-weighted, as the training loop's held-out eval). On teacher samples,
``student_ppl`` is the perplexity of the teacher's text under the student; on
student samples, ``teacher_nll`` says how plausible the student's text is to the
teacher.

How this differs from the held-out numbers ``kd train`` logs (the eval lines of
metrics.jsonl): those read cached sequences (sampled by an earlier student) and
compare over the cache's k + 1 buckets (top-k + tail). Merging outcomes into
buckets can only lower a KL (data-processing inequality), so the training eval's
KL is a lower bound of the exact KL on the same positions; the two are not
interchangeable and kd never mixes them in one plot.

Determinism: the sample of prompt row r is drawn from its own RNG seeded by
``eval_seed(seed, r)`` (r is the row's index in its split, so it does not
change with ``--limit``), which makes the numbers a function of (models, data,
options, seed) on one machine (the sampler's notes on batch size apply).
``--show N`` answers the first N prompts greedily with both models (no seed).

Vocabularies: student and teacher must share the tokenizer. When their heads
have different numbers of rows (embeddings padded to a multiple of 64 or 128),
both distributions are restricted to the shared first rows and renormalized.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kd.storage.errors import ConfigError, FingerprintMismatchError

SAMPLES = ("both", "student", "teacher", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "prompts.jsonl"
"""The prompts shipped with kd (``--data default``); 54 of the 351 rows are in split 'heldout'."""
RESULT_KIND = "kd-eval"
RESULT_VERSION = 1
LOGPROB_ELEMENTS = 1 << 25
"""(positions x vocabulary) fp32 log-probs held per model at once (128 MiB)."""


@dataclass(frozen=True)
class EvalConfig:
    """Every option of ``kd eval``: one field per flag, validated in ``validate``."""

    student: str
    """Student to evaluate: a checkpoint folder (RUN_DIR/checkpoints/step-N), a run folder (its
    latest checkpoint), any Hugging Face model folder, or 'default' (the untrained embedded student)."""
    teacher: str = "default"
    """Teacher model: a Hugging Face folder, a hub name already cached, or 'default' (the embedded one)."""
    data: str = "default"
    """Prompt data: 'default' (the prompts shipped with kd), a local .jsonl/.json/.parquet/.csv
    file, a folder of them, or a dataset name already in the local Hugging Face cache."""
    split: str = "heldout"
    """Which rows: those whose 'split' column equals this value (kd's shipped prompts mark 54 rows
    'heldout'); for data without a 'split' column, the dataset split of this name ('train' is
    the only split of a single file)."""
    limit: int | None = None
    """Evaluate at most this many prompts (the first ones of the split)."""
    samples: str = "both"
    """Whose completions to score: 'student', 'teacher', 'both', or 'none' (only the --show answers)."""
    prompt_field: str = ""
    """Column holding a plain prompt or a chat 'messages' list; default: 'messages', else 'prompt'."""
    chat_template: bool = True
    """Wrap plain prompts as one user message through the tokenizer's chat template (when it has one)."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this many tokens keep only their last max_prompt_tokens tokens."""
    temperature: float = 1.0
    """Sampling temperature of both models (0 = greedy). Scores are always at temperature 1."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    max_new_tokens: int = 128
    """Longest completion to sample (and to answer with --show), in tokens."""
    seed: int = 0
    """Base seed; prompt row r samples from its own RNG seeded from (seed, r)."""
    show: int = 0
    """Also answer the first N prompts greedily with the student and the teacher, side by side."""
    out: str | None = None
    """Also write the results as JSON: a .json file path, or a folder (e.g. the run folder, where
    kd report finds it) that gets eval_<student folder name>.json."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "auto"
    """Model weights dtype: 'auto' (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.
    Log-probs are computed in float32 either way."""
    batch_size: int = 16
    """Prompts sampled together in one batch."""
    score_batch_tokens: int = 8192
    """Scoring: padded tokens per forward pass (sequences are bucketed by length)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def validate(self) -> None:
        """Raise ConfigError listing every invalid option at once."""
        import math

        problems = []

        def need(ok: bool, flag: str, msg: str) -> None:
            if not ok:
                problems.append(f"--{flag.replace('_', '-')}: {msg}")

        need(bool(self.student.strip()), "student", "must name a checkpoint, run folder, model or 'default'")
        need(bool(self.teacher.strip()), "teacher", "must name a model or 'default'")
        need(bool(self.data.strip()), "data", "must name prompt data or 'default'")
        need(bool(self.split.strip()), "split", "must name a split, e.g. heldout")
        need(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")
        need(self.samples in SAMPLES, "samples", f"must be one of {list(SAMPLES)}, got {self.samples!r}")
        need(self.max_prompt_tokens >= 1, "max_prompt_tokens", f"must be >= 1, got {self.max_prompt_tokens}")
        need(self.temperature >= 0 and math.isfinite(self.temperature), "temperature",
             f"must be a finite number >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        need(0 <= self.seed < 2**63, "seed", f"must be in [0, 2^63), got {self.seed}")
        need(self.show >= 0, "show", f"must be >= 0, got {self.show}")
        need(self.samples != "none" or self.show > 0, "samples",
             "'none' scores nothing: pass --show N to see greedy answers, or score some samples")
        need(self.out is None or bool(self.out.strip()), "out", "must be a .json path or a folder")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.score_batch_tokens >= 1, "score_batch_tokens", f"must be >= 1, got {self.score_batch_tokens}")
        if problems:
            raise ConfigError("invalid eval options:\n  " + "\n  ".join(problems))


def eval_seed(seed: int, row: int) -> int:
    """The 63-bit sampling seed of prompt row ``row``: the same on every machine and Python."""
    digest = hashlib.sha256(f"kd-eval:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------- the maths
def position_sums(teacher_logprobs, student_logprobs, target_ids):
    """Sums over positions of (KL(p || q), top-1 agreement, -log q(target), -log p(target), count).

    teacher_logprobs, student_logprobs: (P, V) full-vocabulary log-softmax; target_ids: (P,).
    Returns a (5,) float64 tensor. A zero teacher probability contributes 0 to the KL (0 log 0 = 0).
    """
    import torch

    t, s = teacher_logprobs.float(), student_logprobs.float()
    p = t.exp()  # (P, V)
    kl = torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum(-1)  # (P,)
    agree = (t.argmax(-1) == s.argmax(-1)).double()  # (P,)
    targets = target_ids[:, None].long()
    student_nll = -s.gather(-1, targets).squeeze(-1)
    teacher_nll = -t.gather(-1, targets).squeeze(-1)
    count = torch.tensor(float(t.shape[0]), dtype=torch.float64, device=t.device)
    return torch.stack([kl.double().sum(), agree.sum(), student_nll.double().sum(),
                        teacher_nll.double().sum(), count])


def shared_vocabulary(teacher_logprobs, student_logprobs):
    """Both (P, V_t), (P, V_s) restricted to the first min(V_t, V_s) ids and renormalized."""
    import torch

    v = min(teacher_logprobs.shape[-1], student_logprobs.shape[-1])
    if teacher_logprobs.shape[-1] == student_logprobs.shape[-1]:
        return teacher_logprobs, student_logprobs
    return (torch.log_softmax(teacher_logprobs[:, :v], -1), torch.log_softmax(student_logprobs[:, :v], -1))


def compare(teacher_scorer, student_scorer, prompts: list[list[int]], completions: list[list[int]],
            vocab_size: int, on_group=None) -> dict:
    """Mean KL, top-1, NLLs and perplexities over every completion position (module docstring).

    ``teacher_scorer`` / ``student_scorer``: ``HfScorer``s (anything with ``logprobs``).
    Sequences go in groups holding at most ``LOGPROB_ELEMENTS`` log-probs per model.
    """
    import math

    import torch

    sums = None
    for group in _groups([len(c) for c in completions], max(1, LOGPROB_ELEMENTS // vocab_size)):
        seqs = [list(prompts[i]) + list(completions[i]) for i in group]
        starts = [len(prompts[i]) for i in group]
        t_lp = torch.cat(teacher_scorer.logprobs(seqs, starts))  # (P, V_t)
        s_lp = torch.cat(student_scorer.logprobs(seqs, starts)).to(t_lp.device)  # (P, V_s)
        t_lp, s_lp = shared_vocabulary(t_lp, s_lp)
        targets = torch.as_tensor([tok for i in group for tok in completions[i]], device=t_lp.device)
        part = position_sums(t_lp, s_lp, targets)
        sums = part if sums is None else sums + part
        if on_group is not None:
            on_group(len(group))
    kl, top1, student_nll, teacher_nll, n = sums.tolist()
    return {
        "kl": kl / n, "top1": top1 / n,
        "student_nll": student_nll / n, "student_ppl": math.exp(min(student_nll / n, 700.0)),
        "teacher_nll": teacher_nll / n, "teacher_ppl": math.exp(min(teacher_nll / n, 700.0)),
        "positions": int(n), "sequences": len(completions),
    }


def _groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices whose lengths sum to at most ``budget`` (at least one index each)."""
    groups, cur, total = [], [], 0
    for i, n in enumerate(lengths):
        if cur and total + n > budget:
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        groups.append(cur)
    return groups


# ---------------------------------------------------------------- inputs
def resolve_student(spec: str) -> Path:
    """A run folder means its latest checkpoint; anything else goes to ``models.resolve_model_path``."""
    from kd.stages import models
    from kd.stages.train import checkpoint as ckpt

    path = Path(spec).expanduser()
    if path.is_dir() and (path / ckpt.CHECKPOINTS_DIR).is_dir():
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise ConfigError(f"--student {spec}: the run folder has no checkpoint yet "
                              "(kd train writes checkpoints/step-N); pass a model folder or 'default'")
        return latest
    return models.resolve_model_path(spec, role="student")


def select_rows(data: str, split: str, limit: int | None):
    """(dataset of the chosen rows, their indices in the data) for ``--data`` / ``--split``."""
    from kd.stages.generate import prompts as prompts_mod

    dataset = prompts_mod.open_dataset(data, split)  # a split column partitions single files
    rows = list(range(len(dataset)))
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise prompts_mod.PromptDataError(f"{data} (split {split}) holds no rows")
    if rows != list(range(len(dataset))):
        dataset = dataset.select(rows)
    return dataset, rows


def _prompt_text(value) -> str:
    """A row's prompt for display: the string, or the last non-assistant message."""
    if isinstance(value, str):
        return value.strip()
    turns = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") != "assistant"]
    return turns[-1].strip() if turns else ""


# ---------------------------------------------------------------- kd eval
def run(config: EvalConfig) -> dict:
    """Validate ``config``, sample, score and compare; return the results (and write them to ``out``).

    Options, model paths, the shared tokenizer and the prompt data are all checked
    before any model is loaded.
    """
    config.validate()
    from kd.stages.generate import prompts as prompts_mod

    prompts_mod.ensure_offline()
    import torch
    import transformers
    from kd.stages import models
    from kd.stages.generate.backend import SamplingParams
    from kd.stages.generate.hf_backend import HfSampler, HfScorer
    from kd.stages.generate.run import eos_token_ids, student_step_of
    from tqdm import tqdm

    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    teacher_path = models.resolve_model_path(config.teacher, role="teacher")
    student_path = resolve_student(config.student)
    tokenizer = models.load_tokenizer(teacher_path)
    teacher_fp = models.tokenizer_fingerprint(tokenizer)
    student_fp = models.tokenizer_fingerprint(models.load_tokenizer(student_path))
    if teacher_fp.sha256 != student_fp.sha256:
        raise FingerprintMismatchError(
            f"the student ({student_path}) and the teacher ({teacher_path}) do not share a tokenizer "
            f"({student_fp.sha256[:12]} vs {teacher_fp.sha256[:12]}); a token-level KL needs one "
            "vocabulary. Evaluate a student built on the teacher's tokenizer.")
    data = str(DEFAULT_DATA) if config.data == "default" else config.data
    dataset, rows = select_rows(data, config.split, config.limit)
    source = prompts_mod.PromptSource(
        data, tokenizer, split=config.split, prompt_field=config.prompt_field,
        use_chat_template=config.chat_template, max_prompt_tokens=config.max_prompt_tokens,
        long_prompts="truncate-left", dataset=dataset)
    encoded = source.encode(0, len(dataset))
    prompt_ids = [r.prompt_ids for r in encoded.rows]
    data_rows = [rows[r.row] for r in encoded.rows]  # index in the data file: seeds and display

    device = models.default_device() if config.device == "auto" else config.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    dtype = models.parse_dtype(config.dtype, device)
    teacher = models.load_model(teacher_path, device=device, dtype=dtype)
    student = models.load_model(student_path, device=device, dtype=dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    samplers = {name: HfSampler(model, eos_token_ids=eos_token_ids(tokenizer, model), pad_token_id=pad,
                                batch_size=config.batch_size)
                for name, model in (("student", student), ("teacher", teacher))}
    scorer_opts = {"batch_size": max(config.batch_size, 64), "max_batch_tokens": config.score_batch_tokens,
                   "pad_token_id": pad}
    teacher_scorer, student_scorer = HfScorer(teacher, **scorer_opts), HfScorer(student, **scorer_opts)
    vocab = max(teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0])

    sources = {"both": ("student", "teacher"), "none": ()}.get(config.samples, (config.samples,))
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p,
                            max_new_tokens=config.max_new_tokens)
    seeds = [eval_seed(config.seed, r) for r in data_rows]
    eos = set(eos_token_ids(tokenizer, student)) | set(eos_token_ids(tokenizer, teacher))
    n_show = min(config.show, len(prompt_ids))
    chunk = 4 * config.batch_size
    bar = tqdm(total=len(prompt_ids) * 2 * len(sources) + 2 * n_show, disable=not config.progress,
               unit="prompt", dynamic_ncols=True)
    results = {}
    try:
        for name in sources:
            bar.set_description(f"{name} samples: sampling")
            completions = []
            for i in range(0, len(prompt_ids), chunk):  # chunks only feed the bar (per-row RNG)
                done = samplers[name].sample(prompt_ids[i : i + chunk], params, seeds[i : i + chunk])
                completions += [c.token_ids.tolist() for c in done]
                bar.update(len(done))
            bar.set_description(f"{name} samples: scoring")
            metrics = compare(teacher_scorer, student_scorer, prompt_ids, completions, vocab,
                              on_group=bar.update)
            lengths = [len(c) for c in completions]
            metrics.update(mean_completion_tokens=sum(lengths) / len(lengths),
                           stopped=sum(bool(c) and c[-1] in eos for c in completions) / len(completions))
            results[f"{name}_samples"] = metrics
        examples = []
        if n_show:
            bar.set_description("greedy answers (--show)")
            texts = [_prompt_text(next((row[f] for f in source.prompt_fields if row[f] is not None), ""))
                     for row in (dataset[r.row] for r in encoded.rows[:n_show])]
            examples = greedy_examples(samplers, tokenizer, prompt_ids[:n_show], config.max_new_tokens,
                                       [{"row": r, "prompt": t} for r, t in zip(data_rows, texts)])
            bar.update(2 * n_show)
    finally:
        bar.close()

    result = {
        "kind": RESULT_KIND, "version": RESULT_VERSION,
        "student": str(student_path), "student_step": student_step_of(student_path),
        "teacher": str(teacher_path), "data": source.dataset_id, "split": config.split,
        "prompts": len(prompt_ids), "prompts_truncated": len(encoded.truncated),
        "kl_over": "full vocabulary (exact)",
        **results,
        "examples": examples,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(time.time() - t0, 3),
        "config": asdict(config),
    }
    if config.out is not None:
        result["out"] = str(result_path(config.out, student_path))
        write_result(result, Path(result["out"]))
    return result


def greedy_examples(samplers: dict, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                    examples: list[dict]) -> list[dict]:
    """``examples`` (one per prompt) with the greedy answer of each sampler added under its name."""
    from kd.stages.generate.backend import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    out = [dict(e) for e in examples]
    for name, sampler in samplers.items():
        for example, answer in zip(out, sampler.sample(prompt_ids, greedy, [0] * len(prompt_ids))):
            example[name] = tokenizer.decode(answer.token_ids.tolist(), skip_special_tokens=True).strip()
    return out


def result_path(out: str, student_path: Path) -> Path:
    """``out`` itself when it ends in .json, else the file eval_<student folder name>.json in it."""
    target = Path(out).expanduser()
    return target if target.suffix == ".json" else target / f"eval_{Path(student_path).name}.json"


def write_result(result: dict, target: Path) -> None:
    """Write ``result`` as JSON to ``target`` atomically (temp file + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, target)


# ---------------------------------------------------------------- text output
_ROWS = (
    ("KL(teacher || student)", "kl", "{:.4f}", "nats/token, exact over the full vocabulary"),
    ("top-1 agreement", "top1", "{:.4f}", "argmax(teacher) == argmax(student)"),
    ("student NLL", "student_nll", "{:.4f}", "nats/token of the sampled text"),
    ("student perplexity", "student_ppl", "{:.2f}", ""),
    ("teacher NLL", "teacher_nll", "{:.4f}", "nats/token of the sampled text"),
    ("teacher perplexity", "teacher_ppl", "{:.2f}", ""),
    ("completion tokens (mean)", "mean_completion_tokens", "{:.1f}", ""),
    ("stopped with EOS", "stopped", "{:.2f}", "fraction; the rest hit --max-new-tokens"),
    ("positions", "positions", "{:d}", ""),
)


def format_results(result: dict, width: int | None = None) -> str:
    """The human-readable report of ``run``: a metrics table, then the --show answers side by side."""
    cfg = result["config"]
    step = f" (step {result['student_step']})" if result.get("student_step") else ""
    lines = [
        f"student   {result['student']}{step}",
        f"teacher   {result['teacher']}",
        (f"prompts   {result['prompts']} ({result['data']}, split {result['split']}); "
         f"temperature {cfg['temperature']}, top-p {cfg['top_p']}, up to {cfg['max_new_tokens']} new tokens, "
         f"seed {cfg['seed']}"),
        "",
    ]
    columns = [k for k in ("student_samples", "teacher_samples") if k in result]
    if columns:
        lines.append(f"{'':<26}" + "".join(f"{k.replace('_', ' '):>17}" for k in columns))
    for label, key, fmt, note in _ROWS if columns else ():
        cells = "".join(f"{fmt.format(result[c][key]):>17}" for c in columns)
        lines.append(f"{label:<26}{cells}   {note}".rstrip())
    if "teacher_samples" in result:
        lines.append("")
        lines.append("On teacher samples, 'student perplexity' is the teacher's text scored by the student.")
    if result.get("examples"):
        lines += [""] if lines[-1] else []
        lines.append(format_examples(result["examples"], width))
    if result.get("out"):
        lines.append("")
        lines.append(f"results written to {result['out']}")
    lines.append(f"({result['seconds']:.1f} s on {result['device']})")
    return "\n".join(lines)


def format_examples(examples: list[dict], width: int | None = None) -> str:
    """Greedy student and teacher answers in two columns under each prompt."""
    width = width or shutil.get_terminal_size((110, 24)).columns
    width = max(60, min(width, 180))
    col = (width - 3) // 2
    out = []
    for n, ex in enumerate(examples, 1):
        out.append(f"[{n}] {ex['prompt']}")
        left, right = (_wrap(ex[k], col) for k in ("student", "teacher"))
        out.append(f"{'student (greedy)':<{col}} | teacher (greedy)")
        out.append(f"{'-' * col} | {'-' * col}")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            out.append(f"{a:<{col}} | {b}".rstrip())
        out.append("")
    return "\n".join(out).rstrip()


def _wrap(text: str, width: int) -> list[str]:
    """Wrapped lines of ``text``; control characters (a random model's bytes) shown as U+FFFD."""
    text = "".join(c if c.isprintable() or c == "\n" else " " if c == "\t" else "\ufffd" for c in text)
    lines = []
    for paragraph in (text or "(empty)").splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=True) or [""]
    return lines
