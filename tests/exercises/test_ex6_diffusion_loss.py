"""Grades exercise 6: diffusion_loss(denoiser, schedule, y0, cond_syn, cond_real, neg, shuffle, margin, t_range,
gamma, eps)."""
import pytest
import torch

import dada_min as dm

pytestmark = pytest.mark.ex6
REF = dm.diffusion_loss
GUARDED = [(dm, "diffusion_loss")]   # conftest.own_work: calling these fails in a test


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return dm.ConditionalDenoiser(8, (1, 2)), dm.NoiseSchedule()


def batch(seed, B=4):
    g = torch.Generator().manual_seed(seed)
    y0, cs, cr, n1, n2 = (torch.rand(B, 3, 8, 8, generator=g) for _ in range(5))
    return y0, cs, cr, (n1, n2), torch.rand(B, generator=g), torch.randn(B, 3, 8, 8, generator=g)


def check_parts(parts, ref_parts):
    assert isinstance(parts, dict) and set(parts) == set(ref_parts), f"parts must have keys {sorted(ref_parts)}"
    for k, v in ref_parts.items():
        assert not parts[k].requires_grad, f"parts[{k!r}] must be detached"
        torch.testing.assert_close(parts[k], v)


def test_eq1_with_given_gamma_and_eps(sol, nets):
    D, s = nets
    y0, cs, cr, _, gamma, eps = batch(1)
    loss, parts = sol.diffusion_loss(D, s, y0, cs, cr, shuffle=False, gamma=gamma, eps=eps)
    ref, ref_parts = REF(D, s, y0, cs, cr, shuffle=False, gamma=gamma, eps=eps)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, ref, msg="Eq. (1): MSE(eps_theta(cat[y_t, c1, c2], gamma), eps)")
    check_parts(parts, ref_parts)


def test_with_negatives_same_noise_and_average(sol, nets):
    D, s = nets
    y0, cs, cr, neg, gamma, eps = batch(2)
    loss, parts = sol.diffusion_loss(D, s, y0, cs, cr, neg, shuffle=False, margin=0.3, gamma=gamma, eps=eps)
    ref, ref_parts = REF(D, s, y0, cs, cr, neg, shuffle=False, margin=0.3, gamma=gamma, eps=eps)
    torch.testing.assert_close(loss, ref, msg="with negatives: (MSE + hinge) / 2, both passes on the same y_t")
    check_parts(parts, ref_parts)


@pytest.mark.parametrize("t_range", [(1, None), (900, 999)])
def test_all_random_draws_match_reference_with_the_same_seed(sol, nets, t_range):
    D, s = nets
    y0, cs, cr, neg, _, _ = batch(3)
    torch.manual_seed(11)
    ref, ref_parts = REF(D, s, y0, cs, cr, neg, True, 0.1, t_range)
    torch.manual_seed(11)
    loss, parts = sol.diffusion_loss(D, s, y0, cs, cr, neg, True, 0.1, t_range)
    torch.testing.assert_close(loss, ref, msg="draw in this order: gamma, eps, the positive swap, the negative swap")
    check_parts(parts, ref_parts)


def test_conditions_are_shuffled(sol, nets):
    """With shuffle=True some samples see (c_real, c_syn): the loss then differs from the unshuffled one."""
    D, s = nets
    y0, cs, cr, _, gamma, eps = batch(4, B=16)
    plain, _ = REF(D, s, y0, cs, cr, shuffle=False, gamma=gamma, eps=eps)
    torch.manual_seed(5)
    shuffled, _ = sol.diffusion_loss(D, s, y0, cs, cr, shuffle=True, gamma=gamma, eps=eps)
    assert not torch.allclose(shuffled, plain)


def test_gradient_reaches_every_condition(sol, nets):
    D, s = nets
    y0, cs, cr, (n1, n2), gamma, eps = batch(5)
    leaves = [t.clone().requires_grad_() for t in (cs, cr, n1, n2)]
    torch.manual_seed(0)                                  # margin 1: the hinge is active, negatives matter
    loss, _ = sol.diffusion_loss(D, s, y0, leaves[0], leaves[1], (leaves[2], leaves[3]), True, 1.0,
                                 gamma=gamma, eps=eps)
    grads = torch.autograd.grad(loss, leaves)
    names = ["cond_syn", "cond_real", "neg[0]", "neg[1]"]
    for n, g in zip(names, grads):
        assert g.abs().sum() > 0, f"no gradient reaches {n}: do not detach the conditions"
