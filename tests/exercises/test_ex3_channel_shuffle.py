"""Grades exercise 3: channel_shuffle(c_syn, c_real, enabled)."""
import pytest
import torch

import dada_min as dm

pytestmark = pytest.mark.ex3
REF = dm.channel_shuffle
GUARDED = [(dm, "channel_shuffle")]   # conftest.own_work: calling these fails in a test


def conditions(B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 5, 4, generator=g), torch.rand(B, 3, 5, 4, generator=g)


@pytest.mark.parametrize("B", [1, 7, 64])
def test_matches_reference_with_the_same_seed(sol, B):
    a, b = conditions(B, B)
    torch.manual_seed(B)
    r1, r2, rs = REF(a, b)
    torch.manual_seed(B)
    c1, c2, sw = sol.channel_shuffle(a, b)
    assert sw.shape == (B,) and sw.dtype == torch.bool, "swapped must be a (B,) bool tensor"
    assert torch.equal(sw, rs), "draw the coins with one torch.rand(B) < 0.5"
    torch.testing.assert_close(c1, r1)
    torch.testing.assert_close(c2, r2)


def test_swaps_exactly_the_flagged_samples(sol):
    a, b = conditions(200, 1)
    torch.manual_seed(3)
    c1, c2, sw = sol.channel_shuffle(a, b)
    assert 60 < int(sw.sum()) < 140, "each sample is swapped with probability 1/2"
    assert torch.equal(c1[sw], b[sw]) and torch.equal(c2[sw], a[sw])
    assert torch.equal(c1[~sw], a[~sw]) and torch.equal(c2[~sw], b[~sw])


def test_redrawn_on_every_call(sol):
    a, b = conditions(64, 2)
    torch.manual_seed(4)
    masks = [sol.channel_shuffle(a, b)[2] for _ in range(3)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_disabled_is_the_identity(sol):
    a, b = conditions(9, 5)
    c1, c2, sw = sol.channel_shuffle(a, b, enabled=False)
    assert torch.equal(c1, a) and torch.equal(c2, b)
    assert sw.shape == (9,) and sw.dtype == torch.bool and not sw.any()


def test_gradients_reach_both_inputs(sol):
    a, b = (t.requires_grad_() for t in conditions(16, 6))
    c1, c2, _ = sol.channel_shuffle(a, b)
    (c1 * 1.0 + c2 * 2.0).sum().backward()
    # every element of a and of b lands in exactly one slot: its gradient is 1 (slot 1) or 2 (slot 2)
    assert set(a.grad.unique().tolist()) <= {1.0, 2.0} and set(b.grad.unique().tolist()) <= {1.0, 2.0}
