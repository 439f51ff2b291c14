"""The entropy instrument behind BENCHMARKS.md's codec floors (benchmarks/codec_bounds.py)."""

import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bounds(benchmark_module):
    return benchmark_module("codec_bounds")


def test_log2_choose_is_exact(bounds):
    for n, r in [(10, 3), (49152, 64), (64, 64), (5, 0)]:
        assert bounds.log2_choose(n, r) == pytest.approx(math.log2(math.comb(n, r)), rel=1e-9, abs=1e-9)


def test_entropies(bounds):
    rng = np.random.default_rng(0)
    uniform = np.repeat(np.arange(8), 1000)
    assert bounds.entropy_bits(uniform) == pytest.approx(3.0)
    assert bounds.entropy_bits(np.zeros(50, np.int64)) == 0.0
    context = rng.integers(0, 4, 4000)
    assert bounds.conditional_entropy_bits(context * 3, context) == pytest.approx(0.0, abs=1e-12)
    noise = rng.integers(0, 2, 4000)
    # a context independent of the symbol leaves about its whole entropy
    assert bounds.conditional_entropy_bits(noise, context) == pytest.approx(1.0, abs=0.01)


def test_context_bits_repeat_vs_fresh(bounds):
    k, vocab = 4, 64
    freq = np.full(vocab, 1 / vocab)
    start = np.array([True, False, False])
    repeated = np.array([[1, 2, 3, 4]] * 3)
    fresh = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    first_row = math.log2(k + 1) + k * math.log2(vocab) - math.log2(math.factorial(k))
    # a row equal to the previous one costs only "how many recur" (all k of k seen ids)
    assert bounds.context_id_bits(repeated, freq, start, 1) == pytest.approx(
        (first_row + 2 * math.log2(k + 1)) / 3)
    # rows with new ids pay the unigram set cost over the ids not seen before
    later = math.log2(k + 1) + k * math.log2((vocab - k) / vocab * vocab) - math.log2(math.factorial(k))
    assert bounds.context_id_bits(fresh, freq, start, 1) == pytest.approx((first_row + 2 * later) / 3)
