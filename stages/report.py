"""``kd report``: a training run's metrics as PNG plots and a ``report.md`` that embeds them.

Inputs, both in the run folder that ``kd train --out RUN_DIR`` wrote:

- ``metrics.jsonl``: one JSON object a line. ``"kind": "train"`` lines (one per
  optimizer step) carry ``step``, ``loss`` and its parts ``loss_<name>``, ``lr``,
  ``grad_norm``, ``tokens_per_s``, ``step_s``, ``data_wait_s``, ``staleness``
  (null when the data has no on-policy rounds) and ``time`` (unix seconds);
  ``"kind": "eval"`` lines carry the held-out ``kl``, ``top1``, ``ce`` over the
  cache's top-k + tail buckets, at ``step`` and ``time``.
- ``eval_*.json``: results of ``kd eval --out RUN_DIR`` (exact full-vocabulary
  KL on fresh student / teacher samples, ``kd.stages.eval``), each with the
  ``student_step`` it measured.

Outputs (``RUN_DIR/report/`` unless ``--out``): ``loss.png`` (loss and parts vs
step), ``heldout.png`` (held-out KL, top-1, CE vs step, and KL vs wall-clock
time since the first record, which includes any pause between a crash and its
resume), ``throughput.png`` (tokens/s and step time), ``optimizer.png`` (learning
rate, gradient norm), ``staleness.png`` (only when some step has one),
``eval.png`` (the ``eval_*.json`` numbers vs student step), and ``report.md``
with a summary table (first vs last evaluation). A plot is skipped when its data
is absent, and the report says so. The two kinds of held-out numbers are kept
apart: the training eval's bucketed KL is a lower bound of the exact KL.

Plots use matplotlib's object API on an Agg canvas (no pyplot, no global
backend switch); matplotlib is the optional extra ``plot``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kd.storage.errors import ConfigError, KdError

METRICS_FILE = "metrics.jsonl"
EVAL_GLOB = "eval_*.json"
REPORT_FILE = "report.md"
NOT_LOSS_PARTS = ("loss_positions", "loss_importance_weight")  # loss_* keys that are not losses
STYLE = {
    "font.size": 12, "axes.titlesize": 14, "axes.labelsize": 12, "xtick.labelsize": 11,
    "ytick.labelsize": 11, "legend.fontsize": 10, "figure.titlesize": 15, "axes.grid": True,
    "grid.alpha": 0.3, "lines.linewidth": 1.8, "savefig.dpi": 110,
}


class ReportError(KdError):
    """The run folder holds nothing to report, or a metrics file cannot be read."""


@dataclass(frozen=True)
class ReportConfig:
    """Every option of ``kd report``: one field per argument, validated in ``validate``."""

    run_dir: str
    """Run folder written by kd train --out: metrics.jsonl, and any eval_*.json from kd eval --out."""
    out: str | None = None
    """Folder for the PNG plots and report.md; default: RUN_DIR/report."""

    def validate(self) -> None:
        problems = []
        if not self.run_dir.strip():
            problems.append("RUN_DIR: is required (the folder given to kd train --out)")
        elif not Path(self.run_dir).expanduser().is_dir():
            problems.append(f"RUN_DIR: {self.run_dir} is not a folder (pass the folder given to kd train --out)")
        if self.out is not None and not self.out.strip():
            problems.append("--out: must name a folder")
        if problems:
            raise ConfigError("invalid report options:\n  " + "\n  ".join(problems))

    def out_dir(self) -> Path:
        return Path(self.out).expanduser() if self.out else Path(self.run_dir).expanduser() / "report"


# ---------------------------------------------------------------- reading
def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl, in file order; bad lines name their number."""
    train, evals = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ReportError(f"{path}, line {number}: not valid JSON ({err}); "
                              "fix or delete that line (a crash can leave a partial last line)") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ReportError(f"{path}, line {number}: expected an object with an integer 'step'")
        if record.get("kind") == "train":
            train.append(record)
        elif record.get("kind") == "eval":
            evals.append(record)
    return train, evals


def read_eval_results(run_dir: Path) -> list[tuple[str, dict]]:
    """(file name, result) of every kd eval result in ``run_dir``, by student step then name."""
    found = []
    for path in sorted(run_dir.glob(EVAL_GLOB)):
        try:
            result = json.loads(path.read_text())
        except ValueError as err:
            raise ReportError(f"{path}: not valid JSON ({err}); rerun kd eval --out or delete it") from None
        if isinstance(result, dict) and result.get("kind") == "kd-eval":
            found.append((path.name, result))
    return sorted(found, key=lambda item: (item[1].get("student_step") or 0, item[0]))


# ---------------------------------------------------------------- plotting
def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise KdError("kd report draws its plots with matplotlib, which is not installed here. "
                      "Install the 'plot' extra (pip install 'kd[plot]') or matplotlib itself.") from None
    return matplotlib, Figure, FigureCanvasAgg


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) where ``key`` holds a finite number."""
    pairs = [(r["step"], float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _smooth(values: list[float]) -> list[float] | None:
    """Centered moving average over ~1/25 of the points; None when there are too few to bother."""
    window = len(values) // 25
    if window < 2:
        return None
    half = window // 2
    return [statistics.fmean(values[max(0, i - half): i + half + 1]) for i in range(len(values))]


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds > 3 * 3600:
        return "hours", 3600.0
    if seconds > 120:
        return "minutes", 60.0
    return "seconds", 1.0


def _plot_line(ax, steps, values, label, color=None, smooth_noise=True):
    """Few points: markers. Many: the raw line faint and a moving average on top (noise only)."""
    smooth = _smooth(values) if smooth_noise else None
    if smooth is None:
        ax.plot(steps, values, label=label, color=color, marker="o" if len(values) <= 30 else None,
                markersize=4)
    else:
        (raw,) = ax.plot(steps, values, alpha=0.25, color=color, linewidth=1)
        ax.plot(steps, smooth, label=f"{label}, moving average", color=raw.get_color(), linewidth=2.2)


class _Plotter:
    def __init__(self, out_dir: Path):
        self.matplotlib, self.Figure, self.Canvas = _import_matplotlib()
        self.out_dir = out_dir

    def figure(self, rows: int, cols: int, title: str):
        fig = self.Figure(figsize=(6.4 * cols, 4.4 * rows + 0.6), layout="constrained")
        self.Canvas(fig)
        axes = fig.subplots(rows, cols, squeeze=False)
        fig.suptitle(title, fontweight="bold")
        return fig, [ax for row in axes for ax in row]

    def save(self, fig, name: str) -> Path:
        path = self.out_dir / name
        fig.savefig(path, format="png")
        return path


def plot_losses(p: _Plotter, train: list[dict]) -> Path | None:
    parts = sorted({k for r in train for k in r if k.startswith("loss_") and k not in NOT_LOSS_PARTS})
    steps, total = _series(train, "loss")
    if not steps:
        return None
    fig, (ax,) = p.figure(1, 1, "Training loss and its parts")
    _plot_line(ax, steps, total, "loss (total)")
    for key in parts:
        s, v = _series(train, key)
        if s and v != total:
            _plot_line(ax, s, v, key.removeprefix("loss_").replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per loss position")
    ax.set_title("per-position mean over the step's micro-batches", fontsize=11)
    ax.legend(loc="best")
    return p.save(fig, "loss.png")


def plot_heldout(p: _Plotter, evals: list[dict], t0: float | None) -> Path | None:
    if not evals:
        return None
    fig, axes = p.figure(2, 2, "Held-out metrics logged by kd train (cache top-k + tail buckets)")
    for ax, key, label in ((axes[0], "kl", "KL(teacher || student), nats/token"),
                           (axes[2], "top1", "top-1 agreement"), (axes[3], "ce", "CE on cached targets, nats")):
        steps, values = _series(evals, key)
        ax.plot(steps, values, marker="o", markersize=5, color="C0" if key == "kl" else "C2")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(',')[0]} vs step", fontsize=12)
    ax = axes[1]
    timed = [(r["time"], r["kl"]) for r in evals if isinstance(r.get("time"), (int, float))
             and isinstance(r.get("kl"), (int, float))]
    if timed and t0 is not None:
        seconds = [t - t0 for t, _ in timed]
        unit, scale = _time_unit(max(seconds))
        ax.plot([x / scale for x in seconds], [v for _, v in timed], marker="o", markersize=5, color="C1")
        ax.set_xlabel(f"wall-clock {unit} since the first record")
        ax.set_ylabel("KL(teacher || student), nats/token")
        ax.set_title("KL vs wall-clock time", fontsize=12)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no timestamps in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    return p.save(fig, "heldout.png")


def plot_throughput(p: _Plotter, train: list[dict]) -> Path | None:
    steps, tok_s = _series(train, "tokens_per_s")
    if not steps:
        return None
    fig, (ax, ax2) = p.figure(1, 2, "Training throughput")
    _plot_line(ax, steps, tok_s, "tokens/s")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens per second (all processes)")
    ax.set_title("tokens per second", fontsize=12)
    ax.set_ylim(bottom=0)
    ax.legend(loc="best")
    for key, label in (("step_s", "step time"), ("data_wait_s", "waiting for data")):
        s, v = _series(train, key)
        if s:
            _plot_line(ax2, s, v, label)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("seconds")
    ax2.set_title("seconds per step", fontsize=12)
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="best")
    return p.save(fig, "throughput.png")


def plot_optimizer(p: _Plotter, train: list[dict]) -> Path | None:
    lr_steps, lr = _series(train, "lr")
    gn_steps, gn = _series(train, "grad_norm")
    if not lr_steps and not gn_steps:
        return None
    fig, (ax, ax2) = p.figure(1, 2, "Optimizer")
    ax.plot(lr_steps, lr, color="C4")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate (warmup + cosine)", fontsize=12)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if gn_steps:
        _plot_line(ax2, gn_steps, gn, "gradient norm (before clipping)", color="C3")
        ax2.legend(loc="best")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("global L2 norm")
    ax2.set_title("gradient norm", fontsize=12)
    return p.save(fig, "optimizer.png")


def plot_staleness(p: _Plotter, train: list[dict]) -> Path | None:
    steps, stale = _series(train, "staleness")
    if not steps:
        return None
    fig, (ax,) = p.figure(1, 1, "Staleness of the training data")
    _plot_line(ax, steps, stale, "staleness", color="C5", smooth_noise=False)  # a sawtooth, not noise
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("steps since the sampling student")
    ax.set_title("step - mean student_step of the step's on-policy sequences", fontsize=11)
    ax.set_ylim(bottom=0)
    ax.legend(loc="best")
    return p.save(fig, "staleness.png")


def plot_eval_results(p: _Plotter, results: list[tuple[str, dict]]) -> Path | None:
    if not results:
        return None
    fig, axes = p.figure(1, 3, "kd eval: fresh samples, exact full-vocabulary metrics")
    steps = [r.get("student_step") or 0 for _, r in results]
    panels = ((axes[0], "kl", "KL(teacher || student), nats/token"),
              (axes[1], "top1", "top-1 agreement"),
              (axes[2], "student_ppl", "student perplexity"))
    for ax, key, label in panels:
        for source, marker in (("student_samples", "o"), ("teacher_samples", "s")):
            pts = [(s, r[source][key]) for s, (_, r) in zip(steps, results)
                   if isinstance(r.get(source), dict) and isinstance(r[source].get(key), (int, float))]
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker=marker, markersize=6,
                        label=f"on {source.replace('_', ' ')}")
        ax.set_xlabel("student step")
        ax.set_ylabel(label)
        ax.set_title(label.split(",")[0], fontsize=12)
        if key == "student_ppl":
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    return p.save(fig, "eval.png")


# ---------------------------------------------------------------- report.md
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _duration(seconds: float) -> str:
    unit, scale = _time_unit(seconds)
    return f"{seconds / scale:.1f} {unit}"


def _change(first, last) -> str:
    if not isinstance(first, (int, float)) or not isinstance(last, (int, float)):
        return "-"
    delta = last - first
    rel = f" ({delta / abs(first):+.1%})" if first else ""
    return f"{delta:+.4f}{rel}"


def _run_config(run_dir: Path) -> dict:
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def write_markdown(path: Path, run_dir: Path, train: list[dict], evals: list[dict],
                   results: list[tuple[str, dict]], plots: dict[str, Path | None]) -> None:
    from kd import __version__

    config = _run_config(run_dir)
    lines = [f"# kd run report: {run_dir.name}", "",
             f"Run folder `{run_dir}`; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by kd {__version__}.", ""]
    if config:
        keys = ("student", "cache", "loss", "topk_mode", "steps", "lr", "batch_tokens", "grad_accum", "seed")
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{config[k]}` |" for k in keys if k in config]
        lines.append("")

    lines += ["## Held-out metrics from training (first vs last evaluation)", ""]
    if evals:
        first, last = evals[0], evals[-1]
        lines += [(f"Logged by `kd train` on the cache's held-out prompts, over the top-k + tail buckets "
                   f"({len(evals)} evaluations, {first.get('positions', '?')} positions each)."), "",
                  f"| metric | step {first['step']} | step {last['step']} | change |", "|---|---|---|---|"]
        for key, label in (("kl", "KL(teacher ‖ student), nats/token"), ("top1", "top-1 agreement"),
                           ("ce", "CE on cached targets, nats/token")):
            lines.append(f"| {label} | {_fmt(first.get(key))} | {_fmt(last.get(key))} | "
                         f"{_change(first.get(key), last.get(key))} |")
    else:
        lines.append("No eval lines in metrics.jsonl (run kd train with --eval-every > 0).")
    lines.append("")

    lines += ["## kd eval results (`eval_*.json`)", ""]
    if results:
        lines += ["Fresh samples, exact KL over the full vocabulary (`kd eval`).", "",
                  ("| file | student step | prompts | KL on student samples | KL on teacher samples | "
                   "top-1 (student / teacher samples) | student ppl on teacher samples |"),
                  "|---|---|---|---|---|---|---|"]
        for name, r in results:
            ss, ts = r.get("student_samples") or {}, r.get("teacher_samples") or {}
            lines.append(f"| `{name}` | {r.get('student_step', '-')} | {r.get('prompts', '-')} | "
                         f"{_fmt(ss.get('kl'))} | {_fmt(ts.get('kl'))} | "
                         f"{_fmt(ss.get('top1'))} / {_fmt(ts.get('top1'))} | {_fmt(ts.get('student_ppl'), 2)} |")
    else:
        lines.append("None in the run folder (`kd eval --student RUN_DIR --out RUN_DIR` writes one).")
    lines.append("")

    lines += ["## Training", ""]
    if train:
        tail = [r["loss"] for r in train[-10:] if isinstance(r.get("loss"), (int, float))]
        tok_s = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), (int, float))]
        tokens = sum(r.get("tokens", 0) or 0 for r in train)
        times = [r["time"] for r in train + evals if isinstance(r.get("time"), (int, float))]
        rows = [("steps logged", f"{len(train)} (last step {train[-1]['step']})"),
                ("loss, first step", _fmt(train[0].get("loss"))),
                (f"loss, mean of the last {len(tail)} steps", _fmt(statistics.fmean(tail)) if tail else "-"),
                ("tokens", f"{tokens:,}"),
                ("tokens/s (median over steps)", f"{statistics.median(tok_s):,.0f}" if tok_s else "-"),
                ("wall-clock, first to last record", _duration(max(times) - min(times)) if times else "-")]
        lines += ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    else:
        lines.append("No train lines in metrics.jsonl.")
    lines.append("")

    lines += ["## Plots", ""]
    captions = {"loss": "Training loss and its parts", "heldout": "Held-out metrics logged during training",
                "eval": "kd eval results", "throughput": "Throughput", "optimizer": "Learning rate and gradient norm",
                "staleness": "Staleness of the on-policy data"}
    for key, caption in captions.items():
        plot = plots.get(key)
        if plot is not None:
            rel = Path(plot).relative_to(path.parent) if Path(plot).is_relative_to(path.parent) else Path(plot)
            lines += [f"### {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
        else:
            lines += [f"### {caption}", "", "_Not drawn: no such data in this run._", ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


# ---------------------------------------------------------------- kd report
def run(config: ReportConfig) -> dict:
    """Read the run folder, draw the plots, write report.md; return {"report", "plots", "out_dir"}."""
    config.validate()
    run_dir = Path(config.run_dir).expanduser()
    metrics = run_dir / METRICS_FILE
    train, evals = read_metrics(metrics) if metrics.is_file() else ([], [])
    results = read_eval_results(run_dir)
    if not train and not evals and not results:
        what = "an empty metrics.jsonl" if metrics.is_file() else "no metrics.jsonl"
        raise ReportError(
            f"{run_dir} has {what} and no eval_*.json: nothing to report. Pass the folder given to "
            "kd train --out (it logs metrics.jsonl from its first step), or write an evaluation into it "
            "with kd eval --student RUN_DIR --out RUN_DIR.")
    plotter = _Plotter(config.out_dir())
    config.out_dir().mkdir(parents=True, exist_ok=True)
    times = [r["time"] for r in train + evals if isinstance(r.get("time"), (int, float))]
    with plotter.matplotlib.rc_context(STYLE):
        plots = {
            "loss": plot_losses(plotter, train),
            "heldout": plot_heldout(plotter, evals, min(times) if times else None),
            "eval": plot_eval_results(plotter, results),
            "throughput": plot_throughput(plotter, train),
            "optimizer": plot_optimizer(plotter, train),
            "staleness": plot_staleness(plotter, train),
        }
    report = config.out_dir() / REPORT_FILE
    write_markdown(report, run_dir, train, evals, results, plots)
    return {"report": str(report), "plots": [str(p) for p in plots.values() if p is not None],
            "out_dir": str(config.out_dir())}
