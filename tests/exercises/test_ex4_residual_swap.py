"""Grades exercise 4: residual_swap(x_syn, r_syn, x_real, r_real) and triplet_hinge(eps, eps_pos, eps_neg, margin)."""
import pytest
import torch

import dada_min as dm

pytestmark = pytest.mark.ex4
REF_SWAP, REF_HINGE = dm.residual_swap, dm.triplet_hinge
GUARDED = [(dm, "residual_swap"), (dm, "triplet_hinge")]   # conftest.own_work: calling these fails in a test


def test_residual_swap_matches_reference(sol):
    g = torch.Generator().manual_seed(0)
    xs, rs, xr, rr = (torch.randn(3, 3, 6, 5, generator=g) for _ in range(4))
    got, ref = sol.residual_swap(xs, rs, xr, rr), REF_SWAP(xs, rs, xr, rr)
    assert isinstance(got, tuple) and len(got) == 2
    torch.testing.assert_close(got[0], ref[0], msg="first negative: x_syn with the REAL residual")
    torch.testing.assert_close(got[1], ref[1], msg="second negative: x_real with the SYNTHETIC residual")


def test_residual_swap_keeps_the_graph(sol):
    xs, xr = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    rs, rr = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)
    n1, n2 = sol.residual_swap(xs, rs, xr, rr)
    (n1.sum() + 2 * n2.sum()).backward()
    assert rr.grad is not None and rs.grad is not None, "do not detach the residuals: RS trains G too"
    torch.testing.assert_close(rr.grad, torch.ones_like(rr))
    torch.testing.assert_close(rs.grad, torch.full_like(rs, 2.0))


@pytest.mark.parametrize("seed", range(4))
def test_hinge_matches_reference(sol, seed):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(4, 3, 6, 6, generator=g)
    pos = eps + 0.3 * torch.randn(eps.shape, generator=g)
    neg = eps + (0.2 + 0.2 * seed) * torch.randn(eps.shape, generator=g)
    margin = [0.1, 0.05, 1.0, 0.0][seed]
    got = sol.triplet_hinge(eps, pos, neg, margin)
    assert got.dim() == 0, "one hinge per batch: a scalar"
    torch.testing.assert_close(got, REF_HINGE(eps, pos, neg, margin))


def test_hinge_is_per_batch_not_per_sample(sol):
    eps = torch.zeros(2, 1, 1, 1)
    pos = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)     # sample 0 perfect, sample 1 off by 1
    neg = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)     # the other way round
    # batch MSEs are equal (0.5 each): hinge = margin. A per-sample hinge would give (0.1 + 1.1) / 2 = 0.6
    torch.testing.assert_close(sol.triplet_hinge(eps, pos, neg, 0.1), torch.tensor(0.1))


def test_hinge_default_margin_zero_region_and_gradients(sol):
    eps = torch.randn(4, 3, 4, 4)
    pos = (eps + 0.1 * torch.randn_like(eps)).requires_grad_()
    neg = (eps + 0.1 * torch.randn_like(eps)).requires_grad_()
    h = sol.triplet_hinge(eps, pos, neg)                  # default margin 0.1 is active here
    torch.testing.assert_close(h, REF_HINGE(eps, pos, neg, 0.1))
    h.backward()
    assert pos.grad.abs().sum() > 0 and neg.grad.abs().sum() > 0, "the hinge trains both passes"
    far = eps + 10
    assert sol.triplet_hinge(eps, eps, far, 0.1).item() == 0.0, "zero once the negative is far enough"
