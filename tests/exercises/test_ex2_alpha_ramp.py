"""Grades exercise 2: alpha_ramp(step, total_ramp_steps, alpha_max)."""
import math
import numbers
import random

import pytest

import dada_min as dm

pytestmark = pytest.mark.ex2
REF = dm.alpha_ramp
GUARDED = [(dm, "alpha_ramp")]   # conftest.own_work: calling these fails in a test


def test_matches_reference_on_random_arguments(sol):
    rng = random.Random(0)
    for _ in range(300):
        total = rng.choice([1, 7, 100, 600, 12345])
        step = rng.randint(0, 2 * total)
        a_max = rng.choice([0.2, 1.0, rng.uniform(0.01, 3)])
        got = sol.alpha_ramp(step, total, a_max)
        assert isinstance(got, numbers.Real), f"alpha_ramp must return a number, got {type(got).__name__}"
        assert math.isclose(got, REF(step, total, a_max), rel_tol=1e-9, abs_tol=1e-12), (step, total, a_max)


def test_default_alpha_max_and_known_values(sol):
    assert sol.alpha_ramp(0, 300) == 0.0
    assert math.isclose(sol.alpha_ramp(150, 300), 0.2 * (2 / (1 + math.exp(-2.5)) - 1), rel_tol=1e-9)
    assert math.isclose(sol.alpha_ramp(300, 300), 0.2 * (2 / (1 + math.exp(-5)) - 1), rel_tol=1e-9)


def test_monotone_then_constant(sol):
    vals = [sol.alpha_ramp(s, 50, 0.2) for s in range(120)]
    assert all(b >= a for a, b in zip(vals, vals[1:])), "the ramp never goes down"
    assert len(set(vals[50:])) == 1, "after total_ramp_steps the weight stays constant"
    assert 0.98 * 0.2 < vals[-1] < 0.2


def test_zero_length_ramp_does_not_divide_by_zero(sol):
    assert math.isclose(sol.alpha_ramp(0, 0, 0.2), REF(0, 0, 0.2), rel_tol=1e-9)
    assert math.isclose(sol.alpha_ramp(5, 0, 0.2), REF(5, 0, 0.2), rel_tol=1e-9)
