"""The paper's evidence in miniature: the baselines, the ablation rows, and each experiment's --quick run
(JSON structure, sane values, figures written)."""
import json
import math
import os

import pytest
import torch

import dada_min as dm


# --- the pieces the experiments add -----------------------------------------------------------------------
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
    y = dm.GradReverse.apply(x, 0.3)
    torch.testing.assert_close(y, x)
    (y * torch.arange(5.)).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * torch.arange(5.))


@pytest.mark.parametrize("method", dm.ADVERSARIAL)
def test_adversarial_baselines_reverse_only_the_restorers_gradient(method):
    cfg = dm.make_config("tiny", method=method)
    torch.manual_seed(0)
    G, critic = dm.RestorerUNet(cfg.r_width, cfg.r_depth), dm.make_critic(cfg)
    torch.nn.init.normal_(G.last.weight, std=0.1)             # so that restored real images depend on G
    xs, ys, xr = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)

    def grads(lam):
        G.zero_grad(), critic.zero_grad()
        loss, parts = dm.adversarial_loss(method, G, critic, xs, ys, xr, lam)
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


def test_condition_pair_readings_of_the_only_rows():
    a, b = torch.zeros(1), torch.ones(1)
    assert dm.condition_pair("both", a, b) == (a, b)
    assert dm.condition_pair("syn", a, b) == (a, a)
    assert dm.condition_pair("real", a, b) == (b, b)
    for method, entry in dm.METHODS.items():                  # every diffusion method names its conditions
        assert len(entry) == 5
        assert (entry[4] in ("both", "syn", "real")) == entry[0], method


def test_only_syn_sends_no_diffusion_gradient_to_real_outputs(tiny_data):
    cfg = dm.make_config("tiny", method="only_syn")
    state = dm.init_state(cfg, torch.device("cpu"))
    xs, ys = dm.syn_batch(tiny_data, cfg)
    xr, yr = dm.real_pairs_batch(tiny_data, cfg)
    assert dm.mechanism_diagnostic(state, xs, ys, xr, yr) == 0.0
    state_real = dm.init_state(dm.make_config("tiny", method="only_real"), torch.device("cpu"))
    assert dm.mechanism_diagnostic(state_real, xs, ys, xr, yr) != 0.0


def test_checkpoint_round_trip_keeps_the_critic(tmp_path, tiny_data):
    cfg = dm.make_config("tiny", method="dann", steps=2, eval_every=0)
    state = dm.train(cfg, tiny_data, log=lambda s: None)
    path = str(tmp_path / "c.pt")
    dm.save_checkpoint(path, state)
    fresh = dm.init_state(cfg, torch.device("cpu"))
    dm.load_checkpoint(path, fresh)
    for a, b in zip(state.critic.parameters(), fresh.critic.parameters()):
        torch.testing.assert_close(a, b)


def test_condition_errors_grow_with_condition_noise_for_an_ideal_denoiser():
    cfg = dm.make_config("tiny")
    sched = dm.NoiseSchedule(cfg.T, cfg.beta_start, cfg.beta_end)

    class Ideal(torch.nn.Module):                             # eps from y_t and the condition, if it were clean
        def forward(self, x, gamma):
            g = gamma.view(-1, 1, 1, 1)
            return (x[:, :3] - g.sqrt() * x[:, 3:]) / (1 - g).sqrt()

    class Blind(torch.nn.Module):                             # ignores the condition
        def forward(self, x, gamma):
            return x[:, :3] * 0.5
    y = torch.rand(4, 3, 16, 16)
    e = dm.condition_errors(Ideal(), sched, y, cfg, draws=2)
    assert len(e) == len(dm.SIGMAS) and e[0] < 1e-6
    assert all(b > a for a, b in zip(e, e[1:]))
    blind = dm.condition_errors(Blind(), sched, y, cfg, draws=2)
    assert max(blind) - min(blind) < 1e-9                     # same fixed draws at every sigma


def test_experiment_sizes_apply_to_cpu_demo_and_flags_win(monkeypatch):
    seen = {}

    def exp_probe(cfg, out, quick):
        seen["cfg"], seen["quick"] = cfg, quick
    monkeypatch.setattr(dm, "EXPERIMENTS", {})
    dm.experiment(size=dict(steps=123, batch_size=5), quick=dict(steps=3))(exp_probe)
    dm.main(["--experiment", "probe", "--out", "unused"])
    assert seen["cfg"].steps == 123 and seen["cfg"].batch_size == 5 and seen["cfg"].r_width == 16
    dm.main(["--experiment", "probe", "--steps", "7"])
    assert seen["cfg"].steps == 7 and seen["cfg"].batch_size == 5
    dm.main(["--experiment", "probe", "--quick"])
    assert seen["cfg"].steps == 3 and seen["cfg"].image_size == dm.PRESETS["tiny"]["image_size"] and seen["quick"]
    dm.main(["--experiment", "probe", "--preset", "gpu"])  # other presets are used as they are
    assert seen["cfg"].steps == dm.PRESETS["gpu"]["steps"]
    with pytest.raises(SystemExit):
        dm.main(["--experiment", "nope"])


# --- each experiment's --quick run ------------------------------------------------------------------------
def run_quick(name, tmp_path):
    out = str(tmp_path / name)
    assert dm.main(["--experiment", name, "--quick", "--device", "cpu", "--out", out]) == 0
    res = json.load(open(os.path.join(out, f"{name}.json")))
    assert res["experiment"] == name and res["seeds"] == [0] and res["cpu_seconds"] > 0
    assert res["config"]["image_size"] == dm.PRESETS["tiny"]["image_size"]
    assert all(isinstance(v, bool) for v in res["claims"].values())
    return out, res


def check_metrics(s):
    """A summarize() dict from one seed: PSNR and SSIM in sane ranges, no spread from a single seed."""
    for k in ("syn_psnr", "real_psnr"):
        assert 10 < s[k]["mean"] < 60 and s[k]["std"] is None and s[k]["values"] == [s[k]["mean"]]
    for k in ("syn_ssim", "real_ssim"):
        assert 0 < s[k]["mean"] <= 1


def test_compare_quick(tmp_path):
    out, res = run_quick("compare", tmp_path)
    assert list(res["methods"]) == ["vanilla", "dann", "pixel_da", "da", "oracle"]
    for m, s in res["methods"].items():
        check_metrics(s)
        assert math.isclose(s["real_gain_db"]["mean"],
                            s["real_psnr"]["mean"] - res["methods"]["vanilla"]["real_psnr"]["mean"], abs_tol=1e-9)
    assert res["methods"]["vanilla"]["real_gain_db"]["mean"] == 0
    assert res["claims"]["da_beats_vanilla"] == (res["methods"]["da"]["real_psnr"]["mean"]
                                                 > res["methods"]["vanilla"]["real_psnr"]["mean"])
    for png in ("compare.png", "compare_samples.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000


def test_ablation_quick(tmp_path):
    out, res = run_quick("ablation", tmp_path)
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == [label for label, _, _ in dm.ABLATION_ROWS]
    assert rows["(b) t in [1,100]"]["t_range"] == [1, 100] and rows["(c) t in [900,999]"]["t_range"] == [900, 999]
    assert rows["(d) full t"]["t_range"] == [1, 999]
    assert (rows["(d) full t"]["cs"], rows["(e) + CS"]["cs"], rows["(f) + CS + RS (ours)"]["rs"]) == (False, True, True)
    assert rows["only syn"]["conditions"] == "syn" and rows["only real"]["conditions"] == "real"
    for r in res["rows"]:
        check_metrics(r)
    assert os.path.getsize(os.path.join(out, "ablation.png")) > 1000


def test_condition_quick(tmp_path):
    out, res = run_quick("condition", tmp_path)
    assert res["sigmas"] == list(range(0, 81, 10)) and len(res["error"]) == 9
    for e in res["error"]:
        assert 0 < e["mean"] < 10 and e["std"] is None
    assert math.isclose(res["ratio_80_to_0"], res["error"][-1]["mean"] / res["error"][0]["mean"])
    assert set(res["claims"]) == {"monotone_increasing", "monotone_in_every_seed", "error_at_80_above_0"}
    assert os.path.getsize(os.path.join(out, "condition.png")) > 1000


def test_shortcut_quick(tmp_path):
    out, res = run_quick("shortcut", tmp_path)
    steps = res["steps"]
    assert steps == sorted(steps) and steps[-1] == 8 and len(steps) == 4     # eval every 2 of 8 steps
    for m in ("naive", "da"):
        s = res["methods"][m]
        assert len(s["syn_psnr"]) == len(s["real_psnr"]) == len(steps)
        assert all(10 < v["mean"] < 60 for v in s["real_psnr"] + s["syn_psnr"])
        assert s["real_drop_from_peak_db"]["mean"] >= 0 and s["real_peak_step"]["mean"] in steps
        assert len(res["per_seed"][m]) == 1
    for png in ("shortcut.png", "shortcut_samples.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
