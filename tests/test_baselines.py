"""baselines.py: the DANN and pixel-space DA baselines, plugged into dada_min's training loop."""
import pytest
import torch

import baselines
import dada_min as dm



def test_restorer_features_do_not_change_the_residual():
    torch.manual_seed(0)
    G = dm.RestorerUNet(8, 3)
    torch.nn.init.normal_(G.last.weight, std=0.1)             # a non-zero head, so the check is not trivial
    x = torch.rand(2, 3, 16, 16)
    r, feats = G(x, return_features=True)
    torch.testing.assert_close(r, G(x))
    assert feats.shape == (2, 8 * 2 ** 2, 4, 4)               # bottleneck: width * 2^(depth-1) channels, /4


def test_grad_reverse_is_identity_forward_and_negated_backward():
    x = torch.randn(5, requires_grad=True)
    y = baselines.GradReverse.apply(x, 0.3)
    torch.testing.assert_close(y, x)
    (y * torch.arange(5.)).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * torch.arange(5.))


@pytest.mark.parametrize("method", baselines.ADVERSARIAL)
def test_adversarial_baselines_reverse_only_the_restorers_gradient(method):
    cfg = dm.make_config("tiny", method=method)
    torch.manual_seed(0)
    G, critic = dm.RestorerUNet(cfg.r_width, cfg.r_depth), baselines.make_critic(cfg)
    torch.nn.init.normal_(G.last.weight, std=0.1)             # so that restored real images depend on G
    xs, ys, xr = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)

    def grads(lam):
        G.zero_grad(), critic.zero_grad()
        loss, parts = baselines.adversarial_loss(method, G, critic, xs, ys, xr, lam)
        loss.backward()
        assert set(parts) >= {"loss_res", "loss_adv"}
        return ([p.grad.clone() for p in G.parameters()], [p.grad.clone() for p in critic.parameters()])
    g0, c0 = grads(0.0)                                       # G sees only L_Res
    g_half, c_half = grads(0.5)
    g_plain, c_plain = grads(-1.0)                            # lam = -1: the critic's loss passes unreversed
    for a, b in zip(c0 + c_half, c_plain + c_plain):          # the critic always minimises its own loss
        torch.testing.assert_close(a, b)
    moved = 0.0
    for a0, ah, ap in zip(g0, g_half, g_plain):               # G gets -lam times the critic loss's gradient
        torch.testing.assert_close(ah - a0, -0.5 * (ap - a0), atol=1e-6, rtol=1e-4)
        moved += (ap - a0).abs().sum().item()
    assert moved > 0                                          # the adversarial term does reach G


def test_checkpoint_round_trip_keeps_the_critic(tmp_path, tiny_data):
    cfg = dm.make_config("tiny", method="dann", steps=2, eval_every=0)
    state = dm.train(cfg, tiny_data, log=lambda s: None)
    path = str(tmp_path / "c.pt")
    dm.save_checkpoint(path, state)
    fresh = dm.init_state(cfg, torch.device("cpu"))
    assert isinstance(fresh.D, torch.nn.Sequential)           # the critic took eps_theta's place (PLUGINS)
    dm.load_checkpoint(path, fresh)
    for a, b in zip(state.D.parameters(), fresh.D.parameters()):
        torch.testing.assert_close(a, b)
