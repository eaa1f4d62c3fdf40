"""Grades exercise 8: mechanism_diagnostic(state, x_syn, y_syn, x_real, y_real, gamma, draws)."""
import math

import pytest
import torch

import dada_min as dm

pytestmark = pytest.mark.ex8
REF = dm.mechanism_diagnostic
GUARDED = [(dm, "mechanism_diagnostic")]   # conftest.own_work: calling these fails in a test


@pytest.fixture(scope="module")
def data():
    return dm.make_data(dm.make_config("tiny", n_syn=8, n_real=8, n_test=2))


def setup(data, method, seed=0, dropout=0.0):
    """A state whose G is not the identity, and one fixed diagnostic batch (with real ground truth)."""
    cfg = dm.make_config("tiny", method=method, n_syn=8, n_real=8, n_test=2, batch_size=3, d_dropout=dropout)
    state = dm.init_state(cfg, torch.device("cpu"))
    torch.manual_seed(seed)
    torch.nn.init.normal_(state.G.last.weight, std=0.05)
    batch = (*dm.syn_batch(data, cfg), *dm.real_pairs_batch(data, cfg))
    return state, batch


@pytest.mark.parametrize("method", ["da", "no_contrast", "no_shuffle"])
def test_matches_reference_with_the_same_seed(sol, data, method):
    state, batch = setup(data, method)
    torch.manual_seed(5)
    ref = REF(state, *batch, draws=3)
    torch.manual_seed(5)
    got = sol.mechanism_diagnostic(state, *batch, draws=3)
    assert isinstance(got, float), "return a Python float (.item())"
    assert -1 <= got <= 1
    assert math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-5), \
        f"{method}: got {got:.6f}, reference {ref:.6f} (the method's CS and RS settings come from dm.METHODS)"


def test_fixed_gamma(sol, data):
    state, batch = setup(data, "da", seed=1)
    gamma = torch.tensor([0.9])                            # one level for every sample, shape (1,)
    torch.manual_seed(6)
    ref = REF(state, *batch, gamma=gamma, draws=2)
    torch.manual_seed(6)
    got = sol.mechanism_diagnostic(state, *batch, gamma=gamma, draws=2)
    assert math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-5)


def test_no_side_effects_and_eval_mode(sol, data):
    """Dropout on: the value only matches if eps_theta runs in eval mode; its mode is restored after; no
    parameter is left with a gradient, and G's weights are untouched."""
    state, batch = setup(data, "da", seed=2, dropout=0.5)
    before = [p.detach().clone() for p in state.G.parameters()]
    for training in (True, False):
        state.D.train(training)
        torch.manual_seed(7)
        ref = REF(state, *batch, draws=2)
        torch.manual_seed(7)
        got = sol.mechanism_diagnostic(state, *batch, draws=2)
        assert state.D.training == training, "put eps_theta back in the mode it was in"
        assert math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-5), "measure with eps_theta.eval() (no dropout)"
    params = list(state.G.parameters()) + list(state.D.parameters())
    assert all(p.grad is None for p in params), "use torch.autograd.grad(loss, r): leave no .grad behind"
    assert all(torch.equal(a, p) for a, p in zip(before, state.G.parameters()))
