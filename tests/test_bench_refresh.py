"""The arithmetic behind BENCHMARKS.md's refresh-vs-TRL table (benchmarks/bench_refresh.py)."""

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("bench_refresh")


def _curve(points):
    return [{"step": s, "kl": kl, "top1": 0.0, "train_s": t} for s, t, kl in points]


def test_peer_kl_is_read_at_or_after_the_arms_wall_clock(bench):
    trl = _curve([(0, 0.0, 3.0), (16, 60.0, 1.5), (32, 130.0, 1.2), (48, 200.0, 1.1)])
    assert bench._kl_not_before(trl, 130.0) == (1.2, 130.0)
    assert bench._kl_not_before(trl, 130.5) == (1.1, 200.0)  # never an earlier, higher point
    assert bench._kl_not_before(trl, 0.0) == (1.5, 60.0)  # never the step-0 evaluation
    assert bench._kl_not_before(trl, 201.0) is None


def test_peer_table_counts_the_base_cache_for_kd_only(bench):
    base = {"gen_s": 20.0}
    arm = {"variant": "16x8", "train_wall_s": 80.0, "trained_completion_tokens": 3000,
           "curve": _curve([(0, 0.0, 3.0), (48, 80.0, 1.0)])}
    trl = {"variant": "trl", "train_wall_s": 300.0, "trained_completion_tokens": 3000,
           "curve": _curve([(0, 0.0, 3.0), (16, 90.0, 1.4), (48, 300.0, 1.05)])}
    lines = bench.peer_table([arm, trl], base)
    row = next(line for line in lines if line.startswith("| 16x8 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # wall 80 + 20 (base cache) = 100 s -> 30 tok/s; TRL 3000 / 300 = 10 tok/s
    assert cells[1:5] == ["3000", "100", "30.0", "3.00x"]
    assert cells[5] == "1.000"
    assert cells[6] == "1.050 (300)"  # TRL's first evaluation at or after 100 s
    trl_row = next(line for line in lines if line.startswith("| trl "))
    assert "| 300 | 10.0 | 1.00x |" in trl_row


def test_eval_samples_repeat_prompts_with_distinct_seeds(bench, pair, one_thread, tmp_path):
    """--eval-samples S evaluates every held-out prompt S times, each completion with its own seed."""
    from kd.stages import models

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"prompt": "a b"}\n{"prompt": "c d e"}\n{"prompt": "f"}\n')
    tok = models.load_tokenizer(pair.teacher)
    teacher = models.load_model(pair.teacher, device="cpu", dtype="float32")
    student = models.load_model(pair.student, device="cpu", dtype="float32")
    one = bench.HeldoutEval(teacher, tok, heldout, n=2, max_new_tokens=6, seed=3)
    two = bench.HeldoutEval(teacher, tok, heldout, n=2, max_new_tokens=6, seed=3, samples=2)
    assert len(one.prompts) == 2 and two.prompts == [one.prompts[0]] * 2 + [one.prompts[1]] * 2
    assert len(set(two.seeds)) == 4
    m1, m2 = one(student), two(student)
    assert m2["student_tokens"] > m1["student_tokens"] and m2["positions"] > m1["positions"] > 0
    assert 0 < m1["kl"] < 50 and 0 < m2["kl"] < 50 and 0 <= m2["top1"] <= 1
    assert 0 < m2["kl_se"] < m2["kl"]


def test_ratio_se_matches_a_bootstrap(bench):
    """The delta-method standard error of sum(k)/sum(n) agrees with resampling the sequences."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = rng.integers(5, 65, 300)
    k = n * rng.gamma(4.0, 0.25, 300)  # per-position KL around 1, varying by sequence
    se = bench.ratio_se(list(zip(k.tolist(), n.tolist())))
    idx = rng.integers(0, 300, (4000, 300))
    boot = k[idx].sum(1) / n[idx].sum(1)
    assert se == pytest.approx(boot.std(), rel=0.1)
    assert bench.ratio_se([(1.0, 3)]) is None
    assert bench.ratio_se([(2.0, 2), (4.0, 4)]) == 0.0  # every sequence at the same per-position KL


def test_pooled_final_kl_weights_by_positions(bench):
    a = {"kl": 1.0, "kl_se": 0.03, "top1": 0.2, "positions": 100}
    b = {"kl": 2.0, "kl_se": 0.04, "top1": 0.5, "positions": 300}
    p = bench.pooled([a, b])
    assert p["kl"] == pytest.approx(1.75) and p["top1"] == pytest.approx(0.425)
    assert p["kl_se"] == pytest.approx(((0.03 * 100) ** 2 + (0.04 * 300) ** 2) ** 0.5 / 400)
    assert p["positions"] == 400 and p["evaluations"] == 2
    assert bench.pooled([a, {**b, "kl_se": None}])["kl_se"] is None  # an old evaluation without one
    # the report reads the pooled value where there is one
    assert bench.final_point({"curve": [a], "final_eval": p}) is p
    assert bench.final_point({"curve": [b, a]}) is a


def test_final_student_of_a_run_never_made_is_a_clear_error(bench, tmp_path):
    with pytest.raises(SystemExit, match="16x8: no final checkpoint under .*run-16x8; run the arm first"):
        bench.final_student_dir(tmp_path, "16x8")
    assert bench.final_student_dir(tmp_path, "trl") == tmp_path / "run-trl" / "final"
