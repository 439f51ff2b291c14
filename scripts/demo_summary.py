"""Print the headline numbers of scripts/demo.sh: the student before and after, and example answers."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path


def main(run: str, seconds: str) -> None:
    run_dir = Path(run)
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    print(f"kd demo finished in {int(seconds) // 60} min {int(seconds) % 60} s; run folder {run_dir}")
    print(f"report: {run_dir / 'train' / 'report' / 'report.md'}\n")
    print(f"{'held-out metric':<44} {'before':>10} {'after':>10}")
    for samples in ("student_samples", "teacher_samples"):
        for key, label in (("kl", "KL(teacher || student)"), ("top1", "top-1 agreement")):
            b, a = before.get(samples, {}).get(key), after.get(samples, {}).get(key)
            if b is not None and a is not None:
                print(f"{label + ' on ' + samples.replace('_', ' '):<44} {b:>10.4f} {a:>10.4f}")
    print()
    width = 100
    for ex_before, ex_after in zip(before.get("examples", []), after.get("examples", [])):
        print("prompt: " + ex_before["prompt"])
        for label, text in (("teacher", ex_before.get("teacher")), ("student before", ex_before.get("student")),
                            ("student after", ex_after.get("student"))):
            wrapped = textwrap.shorten(" ".join(str(text).split()), width=width - 18, placeholder=" ...")
            print(f"  {label:<15} {wrapped}")
        print()


if __name__ == "__main__":
    main(*sys.argv[1:3])
