"""bench/bench_handout_fonts.py stays runnable: one round of its measurement (no timing asserted), which also
checks that fonts parsed once give the same PDF as fonts parsed per document."""

from __future__ import annotations

from bench.bench_handout_fonts import measure


def test_one_round_measures_both_ways_and_they_agree() -> None:
    before, now, ratio, size = measure("ko", rounds=1)
    assert before > 0
    assert now > 0
    assert ratio > 0
    assert size > 10_000
