"""Grades exercise 7: da_step(G, D, schedule, opt, x_syn, y_syn, x_real, alpha, margin, t_range), compared with
one step of dada_min.train_step on the same batches and random draws."""
import math

import pytest
import torch

import dada_min as dm

pytestmark = pytest.mark.ex7
REF = dm.train_step
STEP = 5                                                  # mid-ramp: alpha > 0, so the diffusion loss counts
GUARDED = [(dm, "train_step")]   # conftest.own_work: calling these fails in a test


@pytest.fixture(scope="module")
def setup():
    cfg = dm.make_config("tiny", n_syn=8, n_real=8, n_test=2, batch_size=3, steps=20, device="cpu")
    return cfg, dm.make_data(cfg)


def fresh_state(cfg, opt="sgd"):
    """A TrainState at step STEP whose G is not the identity (a fresh G's zero head would hide mistakes)
    and whose parameters hold stale gradients (a step must clear them first)."""
    state = dm.init_state(cfg, torch.device("cpu"))
    torch.manual_seed(1)
    torch.nn.init.normal_(state.G.last.weight, std=0.05)
    params = list(state.G.parameters()) + list(state.D.parameters())
    if opt == "sgd":                                      # plain SGD: the update is lr * gradient, exactly
        state.opt = torch.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    state.step = STEP
    return state


def student_step(sol, state, data, cfg, seed):
    """The batches train_step would draw, then the student's step on them."""
    torch.manual_seed(seed)
    x_syn, y_syn = dm.syn_batch(data, cfg)
    x_real = dm.real_batch(data, cfg)
    alpha = dm.alpha_ramp(STEP, cfg.ramp_frac * cfg.steps, cfg.alpha_max)
    return sol.da_step(state.G, state.D, state.schedule, state.opt, x_syn, y_syn, x_real, alpha,
                       cfg.margin, (cfg.t_min, cfg.t_max))


@pytest.mark.parametrize("seed", [0, 1])
def test_one_step_matches_train_step(sol, setup, seed):
    cfg, data = setup
    ref, mine = fresh_state(cfg), fresh_state(cfg)
    torch.manual_seed(seed)
    parts = REF(ref, data)
    out = student_step(sol, mine, data, cfg, seed)
    assert isinstance(out, dict) and {"loss", "loss_res", "loss_dif"} <= set(out), \
        "return a dict with 'loss', 'loss_res' and 'loss_dif'"
    assert math.isclose(float(out["loss_res"]), float(parts["loss_res"]), rel_tol=1e-5), "L_Res differs"
    assert math.isclose(float(out["loss_dif"]), float(parts["loss_dif"]), rel_tol=1e-5), "L_noise differs"
    assert math.isclose(float(out["loss"]), float(parts["loss_res"]) + parts["alpha"] * float(parts["loss_dif"]),
                        rel_tol=1e-5), "loss = L_Res + alpha * L_noise"
    for name, a, b in (("G", mine.G, ref.G), ("eps_theta", mine.D, ref.D)):
        for (pn, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6,
                                       msg=f"{name}.{pn} after the step differs from train_step's")


def test_both_networks_move_and_alpha_zero_freezes_the_denoiser(sol, setup):
    cfg, data = setup
    state = fresh_state(cfg, opt="adam")
    g0 = [p.detach().clone() for p in state.G.parameters()]
    d0 = [p.detach().clone() for p in state.D.parameters()]
    student_step(sol, state, data, cfg, 2)
    assert any(not torch.equal(a, p) for a, p in zip(g0, state.G.parameters())), "G was not updated"
    assert any(not torch.equal(a, p) for a, p in zip(d0, state.D.parameters())), "eps_theta was not updated"
    # alpha = 0: eps_theta gets no gradient, so an SGD step must leave it exactly where it was
    state = fresh_state(cfg)
    d0 = [p.detach().clone() for p in state.D.parameters()]
    torch.manual_seed(3)
    x_syn, y_syn = dm.syn_batch(data, cfg)
    sol.da_step(state.G, state.D, state.schedule, state.opt, x_syn, y_syn, dm.real_batch(data, cfg), 0.0)
    assert all(torch.equal(a, p) for a, p in zip(d0, state.D.parameters())), \
        "with alpha = 0 eps_theta must not move: clear old gradients (opt.zero_grad) before backward"
