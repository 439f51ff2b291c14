"""Kills tried and survived: kd generate and kd train (sync refresh) SIGKILLed at random filesystem changes.

The larger, randomized version of ``tests/test_faults.py`` (whose machinery it reuses: the
zygote of ``tests/fault_child.py`` forks real ``kd`` processes on tiny models). Per stage, one
uninterrupted reference run logs every change it makes to the filesystem, labelled by the kd
function making it; then ``--trials`` trials each draw a kill point, stratified over the
labels (every label gets its share, so the millisecond-wide commit and pointer windows are
hit as often as the long shard writes), half of the write kills torn (half of the bytes
written first), a quarter of the trials killed again during recovery (a chain of 2-3 kills).
Every trial then reruns the command to the end (``--resume`` when a checkpoint exists) and
checks what ``tests/test_faults.py`` checks: nothing partial visible after each kill, the cache
equal to the reference sequence by sequence, bit-identical final weights and losses, no
leftovers after the rerun and ``kd cache gc``.

    python benchmarks/bench_faults.py                      # 60 trials per stage, ~8 min on 2 cores
    python benchmarks/bench_faults.py --trials 200 --seed 1

Prints a table of kills tried / survived per stage and kill point (and the first failure of
each point that lost something); writes it with the machine into ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_suite():
    spec = importlib.util.spec_from_file_location("kd_test_faults", REPO / "tests" / "test_faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/kd-bench-faults")
    p.add_argument("--trials", type=int, default=60, help="kill trials per stage")
    p.add_argument("--stages", default="generate,train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gc", action="store_true", help="check leftovers without running kd cache gc")
    p.add_argument("--no-disk", action="store_true", help="skip the disk-full / read-only / racing-writer cases")
    args = p.parse_args(argv)

    suite = load_suite()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    zygote = suite.Zygote()
    try:
        world = suite.build_world(zygote, out / "world")
        use_gc = not args.no_gc and suite.gc_available()
        table: dict[tuple[str, str], dict] = defaultdict(lambda: {"tried": 0, "survived": 0, "torn": 0,
                                                                   "chained": 0, "failures": []})
        refs = {}
        for stage in args.stages.split(","):
            ref = refs[stage] = suite.reference(zygote, stage, world, out / f"ref-{stage}")
            labels = sorted({e["label"] for e in ref.events})
            print(f"{stage}: reference run made {len(ref.events)} filesystem changes, labels {labels}", flush=True)
            for n in range(args.trials):
                label = labels[n % len(labels)]
                kinds = sorted({e["kind"] for e in ref.events if e["label"] == label})
                kind = kinds[int(rng.integers(0, len(kinds)))]
                tear = kind == "write" and bool(rng.integers(0, 2))
                chain = [suite.pick(ref.events, label, rng, kind)]
                if rng.random() < 0.25:  # killed again while recovering
                    chain += rng.integers(1, max(2, len(ref.events) // 2), size=int(rng.integers(1, 3))).tolist()
                folder = out / f"{stage}-{n:04d}"
                trial = suite.kill_and_resume(zygote, ref, folder, chain, tear=tear, gc=use_gc)
                row = table[(stage, trial.label)]
                row["tried"] += trial.killed
                row["survived"] += trial.killed and not trial.failures
                row["torn"] += trial.torn
                row["chained"] += len(chain) > 1
                if trial.failures:
                    row["failures"].append(trial.failures)
                    print(f"  FAILED {stage} at {trial.label} ({trial.kind}, {chain}): {trial.failures}",
                          flush=True)
                else:
                    shutil.rmtree(folder, ignore_errors=True)
        cases = disk_cases(suite, zygote, world, refs, out / "disk") if not args.no_disk else []
    finally:
        zygote.close()

    print(f"\n| stage | kill point | kills tried | survived | torn writes | killed again in recovery |")
    print("|---|---|---:|---:|---:|---:|")
    total = [0, 0]
    for (stage, label), row in sorted(table.items()):
        print(f"| {stage} | {label} | {row['tried']} | {row['survived']} | {row['torn']} | {row['chained']} |")
        total[0] += row["tried"]
        total[1] += row["survived"]
    print(f"| all | | {total[0]} | {total[1]} | | |")
    if cases:
        print("\n| case | result | message the user gets |\n|---|---|---|")
        for case in cases:
            print(f"| {case['case']} | {case['result']} | {' / '.join(case['messages']) or '-'} |")
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "load_avg": os.getloadavg(), "seconds": round(time.time() - t0, 1)}
    print(f"\nmachine: {machine}; gc: {use_gc}; command: python benchmarks/bench_faults.py "
          f"--trials {args.trials} --seed {args.seed}")
    (out / "results.json").write_text(json.dumps({
        "args": vars(args), "machine": machine, "gc": use_gc,
        "rows": [{"stage": s, "label": lab, **row} for (s, lab), row in sorted(table.items())],
        "disk_cases": cases,
    }, indent=2))
    return 0 if total[0] == total[1] and all(c["result"] != "FAILED" for c in cases) else 1


DISK_CASES = {
    "full disk while generating": "test_full_disk_while_generating_keeps_committed_shards_and_the_rerun_completes",
    "full disk while checkpointing": "test_full_disk_while_checkpointing_is_one_clear_line_and_resume_is_exact",
    "read-only destinations": "test_read_only_destinations_are_refused_before_any_model_loads",
    "4 racing kd generate": "test_four_generate_processes_on_one_cache_lose_and_clobber_nothing",
}


def disk_cases(suite, zygote, world, refs, out: Path) -> list[dict]:
    """The disk-full, read-only and racing-writer tests of the suite, with the error lines users saw."""
    import _pytest.outcomes

    if set(refs) != {"generate", "train"}:
        return []
    results = []
    for case, name in DISK_CASES.items():
        folder = out / name
        folder.mkdir(parents=True)
        test = getattr(suite, name)
        args = {"zygote": zygote, "refs": refs, "world": world, "tmp_path": folder}
        try:
            test(**{k: v for k, v in args.items() if k in test.__code__.co_varnames[: test.__code__.co_argcount]})
            result = "ok"
        except _pytest.outcomes.Skipped as skip:
            result = f"skipped ({skip})"
        except Exception as err:  # noqa: BLE001 (reported in the table)
            result = "FAILED"
            print(f"  FAILED {case}: {type(err).__name__}: {str(err)[:1500]}", flush=True)
        messages = sorted({line.strip() for f in folder.rglob("*.out")
                           for line in f.read_text(errors="replace").splitlines() if line.startswith("error: ")})
        results.append({"case": case, "result": result, "messages": messages})
    return results


if __name__ == "__main__":
    sys.exit(main())
