"""Grades exercise 1: q_sample(y0, gamma, eps) and sample_gamma(alphas_cumprod, n, t_min, t_max)."""
import pytest
import torch

import dada_min as dm

pytestmark = pytest.mark.ex1
REF_Q = dm.NoiseSchedule.q_sample                        # saved before the guard hides them
REF_GAMMA = dm.NoiseSchedule.sample_gamma
GUARDED = [(dm.NoiseSchedule, "q_sample"),                # conftest.own_work: calling these
           (dm.NoiseSchedule, "sample_gamma")]            # fails while a test runs


@pytest.mark.parametrize("seed", range(3))
def test_q_sample_matches_reference(sol, seed):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = (int(v) for v in torch.randint(1, 7, (4,), generator=g))
    y0, eps = torch.rand(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    gamma = torch.rand(B, generator=g)
    out = sol.q_sample(y0, gamma, eps)
    assert out.shape == y0.shape, "q_sample must keep the shape of y0"
    torch.testing.assert_close(out, REF_Q(y0, gamma, eps))


def test_q_sample_limits_and_per_image_gamma(sol):
    y0, eps = torch.rand(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(sol.q_sample(y0, torch.ones(3), eps), y0, msg="gamma = 1 must return y0")
    torch.testing.assert_close(sol.q_sample(y0, torch.zeros(3), eps), eps, msg="gamma = 0 must return eps")
    out = sol.q_sample(y0, torch.tensor([1.0, 0.0, 0.25]), eps)         # each image has its own gamma
    torch.testing.assert_close(out[0], y0[0])
    torch.testing.assert_close(out[1], eps[1])
    torch.testing.assert_close(out[2], 0.5 * y0[2] + 0.75 ** 0.5 * eps[2])


def test_q_sample_keeps_dtype_and_gradient(sol):
    y0 = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    gamma = torch.tensor([0.3, 0.9])                     # float32 gamma, float64 images
    out = sol.q_sample(y0, gamma, eps)
    assert out.dtype == torch.float64, "the output must have y0's dtype"
    out.sum().backward()
    torch.testing.assert_close(y0.grad, gamma.double().sqrt().view(-1, 1, 1, 1).expand_as(y0))


@pytest.mark.parametrize("t_range", [(1, None), (900, 999), (1, 100), (500, 500)])
def test_sample_gamma_matches_reference_with_the_same_seed(sol, t_range):
    s = dm.NoiseSchedule()
    torch.manual_seed(7)
    ref = REF_GAMMA(s, 257, *t_range)
    torch.manual_seed(7)
    got = sol.sample_gamma(s.alphas_cumprod, 257, *t_range)
    assert got.shape == (257,) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, msg="draw t with torch.randint first, then one torch.rand(n)")


def test_sample_gamma_stays_between_neighbouring_levels(sol):
    s = dm.NoiseSchedule(T=50, beta_start=1e-3, beta_end=0.2)
    ac = s.alphas_cumprod
    torch.manual_seed(0)
    g = sol.sample_gamma(ac, 4000, 10, 20)
    assert (g >= ac[20]).all() and (g <= ac[9]).all(), "gamma must lie in [abar[t_max], abar[t_min - 1]]"
    g = sol.sample_gamma(ac, 4000)                       # default t_max = T - 1
    assert (g >= ac[49]).all() and (g <= ac[0]).all()
    assert (g < ac[40]).any() and (g > ac[5]).any(), "the default range must cover t = 1 .. T-1"
    assert len(torch.unique(g)) > 3900, "gamma is continuous, not one of T values"
