"""bitnet_dist.schedule against the formulas written out independently here (not imported)."""
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_dist import schedule
from bitnet_dist.config import OptimConfig
from bitnet_dist.presets import PRECISION_PRESETS

TWO = OptimConfig(schedule="two_stage", lr=1.8e-3, lr_stage2=1.2e-3, min_lr=0.0, warmup_steps=10,
                  weight_decay=0.1, weight_decay_stage2=0.0)


def test_two_stage_known_points():
    T = 100
    lr = lambda s: schedule.lr_at(s, TWO, T)  # noqa: E731
    assert lr(0) == pytest.approx(1.8e-3 / 10)
    assert lr(9) == pytest.approx(1.8e-3)  # end of warm-up reaches P1
    assert lr(10) == pytest.approx(1.8e-3)  # stage 1 starts at P1 ...
    assert lr(30) == pytest.approx(1.8e-3 * 70 / 90)  # ... on the line to 0 at T
    assert lr(49) == pytest.approx(1.8e-3 * 51 / 90)
    assert lr(50) == pytest.approx(1.2e-3 * 50 / 90)  # midpoint: drops onto the P2 line (P2 at W, 0 at T)
    assert lr(75) == pytest.approx(1.2e-3 * 25 / 90)
    assert lr(99) == pytest.approx(1.2e-3 / 90)
    assert lr(50) < lr(49) and lr(50) / (1.8e-3 * 50 / 90) == pytest.approx(1.2 / 1.8)  # a drop by P2/P1
    assert [schedule.weight_decay_at(s, TWO, T) for s in (0, 49, 50, 99)] == [0.1, 0.1, 0.0, 0.0]


@settings(max_examples=200, deadline=None)
@given(T=st.integers(4, 5000), data=st.data())
def test_two_stage_formula(T, data):
    W = data.draw(st.integers(0, T // 2 - 1))
    s = data.draw(st.integers(0, T - 1))
    p1, p2, lo = 3e-3, 1e-3, 1e-5
    o = replace(TWO, warmup_steps=W, lr=p1, lr_stage2=p2, min_lr=lo)
    M = T // 2
    if s < W:
        want = p1 * (s + 1) / W
    elif s < M:
        want = lo + (p1 - lo) * (T - s) / (T - W)
    else:
        want = lo + (p2 - lo) * (T - s) / (T - W)
    assert schedule.lr_at(s, o, T) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert schedule.weight_decay_at(s, o, T) == (0.1 if s < M else 0.0)


@settings(max_examples=100, deadline=None)
@given(T=st.integers(2, 5000), data=st.data())
def test_cosine_and_constant(T, data):
    W = data.draw(st.integers(0, T - 1))
    s = data.draw(st.integers(0, T - 1))
    cos = replace(TWO, schedule="cosine", warmup_steps=W, min_lr=1e-4)
    const = replace(TWO, schedule="constant", warmup_steps=W)
    if s < W:
        assert schedule.lr_at(s, cos, T) == pytest.approx(1.8e-3 * (s + 1) / W)
        assert schedule.lr_at(s, const, T) == pytest.approx(1.8e-3 * (s + 1) / W)
    else:
        want = 1e-4 + (1.8e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W)))
        assert schedule.lr_at(s, cos, T) == pytest.approx(want)
        assert schedule.lr_at(s, const, T) == 1.8e-3
    assert schedule.weight_decay_at(s, cos, T) == 0.1 and schedule.weight_decay_at(s, const, T) == 0.1


def test_act_bits_schedule():
    p = PRECISION_PRESETS["v2_a8_to_a4"]  # 8 bits for the first 95% of the tokens
    assert schedule.switch_step(p, 200) == 190
    bits = [schedule.act_bits_at(s, p, 200) for s in range(200)]
    assert bits == [8] * 190 + [4] * 10
    assert schedule.switch_step(p, 20) == 19
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 steps at 8 bits
    assert schedule.switch_step(replace(p, switch_fraction=0.29), 100) == 29
    # fraction 1.0, or too few steps to reach the switch: no switch inside the run
    assert schedule.switch_step(replace(p, switch_fraction=1.0), 100) is None
    for name in ("v2_a8", "v2_a4", "b158", "bf16", "v2_a4_no_hadamard"):
        q = PRECISION_PRESETS[name]
        assert schedule.switch_step(q, 100) is None
        assert {schedule.act_bits_at(s, q, 100) for s in range(100)} == {q.act_bits}


@settings(max_examples=100, deadline=None)
@given(T=st.integers(1, 10000), f=st.floats(0.01, 1.0))
def test_switch_fraction_of_tokens(T, f):
    p = replace(PRECISION_PRESETS["v2_a8_to_a4"], switch_fraction=f)
    s = schedule.switch_step(p, T)
    n8 = sum(schedule.act_bits_at(i, p, T) == 8 for i in range(T)) if T <= 2000 else (T if s is None else s)
    # at most a fraction f of the (equal-sized) steps at 8 bits, and less than one step short of it
    assert n8 <= f * T + 1e-6 and (n8 > f * T - 1 - 1e-6 or n8 == T)
