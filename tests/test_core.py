"""Fast CPU checks of every part of dada_min against properties or independent references."""
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dada_min as dm


# --- config and CLI ---------------------------------------------------------------------------------------
def test_presets_validate():
    for name in dm.PRESETS:
        cfg = dm.make_config(name)
        assert cfg.patch_size <= cfg.image_size


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="method"):
        dm.make_config(method="magic")
    with pytest.raises(ValueError, match="unknown config field"):
        dm.make_config(not_a_field=1)
    with pytest.raises(ValueError, match="t_max"):
        dm.make_config(t_max=1000)


NAN, INF = float("nan"), float("inf")
BAD_NUMBERS = [("lr", -1.0), ("lr", 0.0), ("lr", NAN), ("lr", INF), ("steps", 0), ("batch_size", 0),
               ("image_size", 0), ("patch_size", 0), ("n_test", 0), ("r_depth", 0), ("d_res_blocks", 0),
               ("margin", NAN), ("margin", -0.1), ("alpha_max", -1.0), ("alpha_max", INF), ("ramp_frac", 0.0),
               ("ramp_frac", 1.5), ("ema_decay", 1.0), ("ema_decay", -0.1), ("sigma_max", INF), ("sigma_max", -1.0),
               ("d_dropout", 1.0), ("d_dropout", NAN), ("beta_start", 0.0), ("beta_end", 1.0), ("beta_end", 1e-7),
               ("eval_every", -1), ("log_every", 0), ("T", 1), ("d_mults", (0, 1)), ("steps", 2.5), ("seed", NAN)]


@pytest.mark.parametrize("name,value", BAD_NUMBERS)
def test_bad_numbers_are_named_by_config_and_cli(name, value, capsys):
    with pytest.raises(ValueError, match=f"^config: {name}="):
        dm.make_config("tiny", **{name: value})
    if name in ("steps", "seed"):                          # the CLI parses these as integers: argparse refuses
        return
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    with pytest.raises(SystemExit) as e:
        dm.main(["--preset", "tiny", f"--{name}", text])
    assert e.value.code == 2
    assert f"error: config: {name}=" in capsys.readouterr().err


def test_cli_rejects_unknown_flag(capsys):
    with pytest.raises(SystemExit) as e:
        dm.main(["--stepz", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--stepz" in err and "--steps" in err          # names the bad flag and suggests the right one


def test_cli_parses_config_fields():
    args = dm.build_parser().parse_args(["--preset", "tiny", "--d_mults", "1,2,4", "--d_attn", "true",
                                         "--lr", "0.01", "--method", "vanilla"])
    cfg = dm.parse_config(args)
    assert cfg.d_mults == (1, 2, 4) and cfg.d_attn is True and cfg.lr == 0.01 and cfg.method == "vanilla"


# --- data -------------------------------------------------------------------------------------------------
def test_data_is_deterministic_and_pools_are_disjoint(tiny_cfg):
    a, b = dm.make_data(tiny_cfg), dm.make_data(tiny_cfg)
    for k in vars(a):
        torch.testing.assert_close(getattr(a, k), getattr(b, k))
    assert a.syn_clean.shape == (tiny_cfg.n_syn, 3, tiny_cfg.image_size, tiny_cfg.image_size)
    assert 0 <= a.syn_clean.min() and a.syn_clean.max() <= 1
    # the real-like pool is made from different clean images than the synthetic one
    d = (a.syn_clean[:, None] - a.real_clean[None]).abs().flatten(2).mean(2)
    assert d.min() > 0.01


def test_dihedral_gives_eight_distinct_transforms():
    x = torch.arange(16.).view(1, 1, 4, 4)
    outs = {tuple(dm.dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8


def test_random_crops_keep_pairs_aligned():
    torch.manual_seed(0)
    pool = torch.rand(5, 3, 20, 20)
    both = dm.random_crops(torch.cat([pool, pool * 2], 1), 32, 8)
    torch.testing.assert_close(both[:, 3:], both[:, :3] * 2)
    assert both.shape == (32, 6, 8, 8)


def test_camera_noise_is_correlated_and_vanishes_without_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.full((8, 3, 32, 32), 0.5)
    torch.testing.assert_close(dm.camera_noise(y, g, shot=(1e-12, 2e-12), read=(1e-12, 2e-12)), y,
                               atol=1e-4, rtol=0)
    n_cam = dm.camera_noise(y, g) - y
    n_awgn = dm.add_awgn(y, 50, g) - y

    def neighbour_corr(n):                      # horizontal neighbours, same channel
        a, b = n[..., :, :-1].flatten(), n[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    def channel_corr(n):
        return torch.corrcoef(torch.stack([n[:, 0].flatten(), n[:, 1].flatten()]))[0, 1].abs().item()
    assert neighbour_corr(n_cam) > 0.2 and abs(neighbour_corr(n_awgn)) < 0.05
    assert channel_corr(n_cam) > 0.1


def test_awgn_sigma_range():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(400, 3, 64, 64)
    sig = (dm.add_awgn(y, 50, g) - y).flatten(1).std(1) * 255
    assert sig.max() < 51.5 and sig.min() < 5 and abs(sig.mean().item() - 25) < 3


# --- networks ---------------------------------------------------------------------------------------------
def test_networks_keep_shapes(tiny_cfg):
    G, D = dm.make_networks(dm.make_config("tiny", r_depth=3, d_mults=(1, 2, 2), d_res_blocks=2, d_attn=True))
    x = torch.rand(2, 3, 16, 16)
    assert G(x).shape == x.shape
    assert D(torch.rand(2, 9, 16, 16), torch.rand(2)).shape == (2, 3, 16, 16)


def test_restore_accepts_odd_sizes_and_clamps():
    G = dm.RestorerUNet(4, 3)
    x = torch.rand(1, 3, 37, 23)
    y = dm.restore(G, x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1


# --- noise schedule ---------------------------------------------------------------------------------------
def test_schedule_buffers_monotone_and_paper_values():
    s = dm.NoiseSchedule()
    ac = s.alphas_cumprod
    assert ac.dtype == torch.float32 and s.betas.dtype == torch.float32
    assert (ac > 0).all() and (ac <= 1).all() and (ac[1:] < ac[:-1]).all()
    assert abs(ac[99].item() - 0.9516) < 1e-3 and abs(ac[999].item() - 0.00662) < 1e-4
    assert "alphas_cumprod" in dict(s.named_buffers())


def test_q_sample_limits():
    y0, eps = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(dm.NoiseSchedule.q_sample(y0, torch.ones(4), eps), y0)
    torch.testing.assert_close(dm.NoiseSchedule.q_sample(y0, torch.zeros(4), eps), eps)
    big = dm.NoiseSchedule.q_sample(torch.zeros(64, 3, 32, 32), torch.full((64,), 1e-6), torch.randn(64, 3, 32, 32))
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


def test_sample_gamma_respects_t_range():
    s = dm.NoiseSchedule()
    torch.manual_seed(0)
    g = s.sample_gamma(4000, 900, 999)
    assert g.min() >= s.alphas_cumprod[999] and g.max() <= s.alphas_cumprod[899]
    g = s.sample_gamma(4000)
    assert g.min() >= s.alphas_cumprod[999] and g.max() <= s.alphas_cumprod[0]


# --- the two tricks and the losses ------------------------------------------------------------------------
def test_channel_shuffle_swaps_exactly_the_masked_samples():
    torch.manual_seed(0)
    a, b = torch.rand(64, 3, 4, 4), torch.rand(64, 3, 4, 4)
    c1, c2, sw = dm.channel_shuffle(a, b)
    assert 10 < sw.sum() < 54                                     # about half
    torch.testing.assert_close(c1[sw], b[sw]) ; torch.testing.assert_close(c2[sw], a[sw])
    torch.testing.assert_close(c1[~sw], a[~sw]) ; torch.testing.assert_close(c2[~sw], b[~sw])
    c1, c2, sw = dm.channel_shuffle(a, b, enabled=False)
    assert not sw.any() and c1 is a and c2 is b
    _, _, sw2 = dm.channel_shuffle(a, b)
    assert not torch.equal(sw, sw2)                               # redrawn on every call


def test_residual_swap_builds_negatives_from_swapped_residuals():
    xs, rs, xr, rr = (torch.rand(2, 3, 4, 4) for _ in range(4))
    ns, nr = dm.residual_swap(xs, rs, xr, rr)
    torch.testing.assert_close(ns, xs + rr)
    torch.testing.assert_close(nr, xr + rs)


def test_triplet_hinge_matches_hand_computation():
    eps = torch.tensor([0., 1., 2., 3.])
    pos = torch.tensor([0.1, 1., 2., 3.])                         # mse 0.0025
    neg = torch.tensor([0., 1.2, 2., 3.])                         # mse 0.01
    assert math.isclose(dm.triplet_hinge(eps, pos, neg, 0.1).item(), 0.0025 - 0.01 + 0.1, rel_tol=1e-5)
    assert dm.triplet_hinge(eps, pos, neg + 10, 0.1).item() == 0.0


def test_diffusion_loss_uses_same_noise_for_both_passes_and_averages():
    torch.manual_seed(0)
    D, s = dm.ConditionalDenoiser(8, (1, 2)), dm.NoiseSchedule()
    y0, cs, cr, n1, n2 = (torch.rand(4, 3, 8, 8) for _ in range(5))
    gamma, eps = torch.rand(4), torch.randn(4, 3, 8, 8)
    loss, parts = dm.diffusion_loss(D, s, y0, cs, cr, (n1, n2), shuffle=False, gamma=gamma, eps=eps)
    y_t = s.q_sample(y0, gamma, eps)
    pos = D(torch.cat([y_t, cs, cr], 1), gamma)
    neg = D(torch.cat([y_t, n1, n2], 1), gamma)
    mse_pos, mse_neg = F.mse_loss(pos, eps), F.mse_loss(neg, eps)
    expected = (mse_pos + F.relu(mse_pos - mse_neg + 0.1)) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["mse_neg"], mse_neg)


def test_diffusion_gradient_reaches_restorer_through_both_conditions():
    torch.manual_seed(0)
    G, D, s = dm.RestorerUNet(4, 2), dm.ConditionalDenoiser(8, (1, 2)), dm.NoiseSchedule()
    xs, xr, ys = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    rs, rr = G(xs), G(xr)
    ys_hat, yr_hat = xs + rs, xr + rr
    loss, _ = dm.diffusion_loss(D, s, ys, ys_hat, yr_hat, dm.residual_swap(xs, rs, xr, rr))
    g_syn, g_real = torch.autograd.grad(loss, [ys_hat, yr_hat], retain_graph=True)
    assert g_syn.abs().sum() > 0 and g_real.abs().sum() > 0
    # and through the real branch alone into G's weights
    rr_only = G(xr)
    loss2, _ = dm.diffusion_loss(D, s, ys, ys_hat.detach(), xr + rr_only)
    grads = torch.autograd.grad(loss2, list(G.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


def test_alpha_ramp_values():
    assert dm.alpha_ramp(0, 300) == 0.0
    assert math.isclose(dm.alpha_ramp(30, 300), 0.2 * (2 / (1 + math.exp(-0.5)) - 1), rel_tol=1e-9)
    assert abs(dm.alpha_ramp(30, 300) - 0.049) < 1e-3
    assert abs(dm.alpha_ramp(300, 300) - 0.1973) < 1e-4 and dm.alpha_ramp(10**6, 300) == dm.alpha_ramp(300, 300)


def test_charbonnier():
    assert math.isclose(dm.charbonnier(torch.zeros(3), torch.zeros(3)).item(), 1e-3, rel_tol=1e-4)
    assert math.isclose(dm.charbonnier(torch.ones(3), torch.zeros(3)).item(), math.sqrt(1 + 1e-6), rel_tol=1e-6)


# --- training ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(dm.METHODS))
def test_every_method_trains(method, tiny_data):
    cfg = dm.make_config("tiny", method=method, steps=3, eval_every=0, log_every=1)
    state = dm.train(cfg, tiny_data, log=lambda s: None)
    assert state.step == 3 and len(state.history["real_psnr"]) == 1
    if dm.METHODS[method][0]:
        assert -1 <= state.history["diag_cos"][0] <= 1


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_data):
    cfg = dm.make_config("tiny", method="da", lr=1e-3)
    state = dm.init_state(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    xs, ys = dm.syn_batch(tiny_data, cfg)
    xr = dm.real_batch(tiny_data, cfg)

    def total():
        torch.manual_seed(1)                      # same gamma, eps and shuffles each time
        r_s, r_r = state.G(xs), state.G(xr)
        ld, _ = dm.diffusion_loss(state.D, state.schedule, ys, xs + r_s, xr + r_r,
                                  dm.residual_swap(xs, r_s, xr, r_r))
        return dm.charbonnier(xs + r_s, ys) + 0.2 * ld
    before = total().item()
    for _ in range(30):
        state.opt.zero_grad()
        total().backward()
        state.opt.step()
    assert total().item() < 0.8 * before


def nan_from_call(fn, n):
    """fn, but returning NaN from its n-th call on (counted from 1)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        out = fn(*args, **kwargs)
        return out * float("nan") if len(calls) >= n else out
    return wrapped


@pytest.mark.parametrize("inject", ["loss", "gradient", "score"])
def test_a_diverging_run_stops_and_keeps_the_last_finite_checkpoint(inject, tmp_path, tiny_data, monkeypatch):
    """Something turns NaN at step 8 (or in the evaluation at step 10) of 20; evaluations at 5, 10, 15, 20."""
    cfg = dm.make_config("tiny", method="vanilla", steps=20, eval_every=5, log_every=10)
    out, G = str(tmp_path / "run"), None
    if inject == "loss":                                   # vanilla: one charbonnier call per step
        monkeypatch.setattr(dm, "charbonnier", nan_from_call(dm.charbonnier, 8))
    elif inject == "gradient":                             # a finite loss with NaN gradients
        torch.manual_seed(cfg.seed)
        G = dm.RestorerUNet(cfg.r_width, cfg.r_depth)
        G.last.bias.register_hook(nan_from_call(lambda g: g, 8))
    else:                                                  # finite training, a NaN score from the second evaluation
        evaluate_pools, calls = dm.evaluate_pools, []

        def nan_score(G, data):
            calls.append(1)
            return {**evaluate_pools(G, data), **({"real_psnr": float("nan")} if len(calls) >= 2 else {})}
        monkeypatch.setattr(dm, "evaluate_pools", nan_score)
    saved = []                                             # the files on disk after each evaluation

    def on_eval(state):
        saved.append({f: open(os.path.join(out, f), "rb").read() for f in ("checkpoint.pt", "history.json")})
    with pytest.raises(dm.TrainingDiverged) as e:
        dm.train(cfg, tiny_data, out=out, log=lambda s: None, G=G, on_eval=on_eval)
    msg = str(e.value)
    expected = {"loss": "at step 8: loss_res=nan", "gradient": "at step 8: grad_norm=nan",
                "score": "evaluation at step 10: synthetic PSNR"}[inject]
    assert expected in msg and "lr=0.001" in msg and "kept from step 5" in msg and "\n" not in msg
    assert inject != "gradient" or "loss_res" not in msg  # the loss of step 8 was finite
    assert len(saved) == 1                                 # no evaluation after the bad step saved anything
    for f, content in saved[0].items():                    # bit-identical to the files of step 5
        assert open(os.path.join(out, f), "rb").read() == content, f
    blob = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert blob["step"] == 5 and json.load(open(os.path.join(out, "history.json")))["eval_step"] == [5]
    assert all(torch.isfinite(v).all() for k in ("restorer", "restorer_ema") for v in blob[k].values())


def test_a_diverging_cli_run_exits_non_zero_with_one_error_line(tmp_path):
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "dada_min.py", "--preset", "tiny", "--method", "vanilla", "--steps", "10",
                        "--log_every", "5", "--eval_every", "0", "--lr", "1000", "--device", "cpu", "--out", out],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("dada_min.py: error: training diverged at step") and "lr=1000" in err
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))                # a NaN checkpoint is never saved


def test_restore_does_not_use_the_denoiser(tiny_data):
    state = dm.train(dm.make_config("tiny", steps=2), tiny_data, log=lambda s: None)
    x = tiny_data.test_real_noisy
    before = dm.restore(state.G_ema, x)
    with torch.no_grad():
        for p in state.D.parameters():
            p.fill_(float("nan"))
    torch.testing.assert_close(dm.restore(state.G_ema, x), before)


def test_mechanism_diagnostic_is_a_cosine(tiny_data):
    cfg = dm.make_config("tiny")
    state = dm.init_state(cfg, torch.device("cpu"))
    xs, ys = dm.syn_batch(tiny_data, cfg)
    xr, yr = dm.real_pairs_batch(tiny_data, cfg)
    c = dm.mechanism_diagnostic(state, xs, ys, xr, yr)
    assert -1 <= c <= 1
    c_hi = dm.mechanism_diagnostic(state, xs, ys, xr, yr, gamma=torch.tensor([0.95]))
    assert -1 <= c_hi <= 1


# --- metrics ----------------------------------------------------------------------------------------------
def test_psnr_known_values():
    y = torch.zeros(2, 3, 8, 8)
    x = y + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
    torch.testing.assert_close(dm.psnr(x, y), torch.tensor([20.0, 40.0]))
    yc = dm.rgb_to_y(torch.ones(1, 3, 1, 1))
    assert abs(yc.item() - 235 / 255) < 1e-4


def _ssim_numpy(x, y):
    """Independent reference: explicit loop over every valid 11x11 window (Wang et al. 2004)."""
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[c, i:i + 11, j:j + 11], y[c, i:i + 11, j:j + 11]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                c1, c2 = 0.01 ** 2, 0.03 ** 2
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_independent_reference():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 3, 20, 18, generator=g, dtype=torch.float64)
    x = (y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert abs(dm.ssim(x, y).item() - _ssim_numpy(x[0].numpy(), y[0].numpy())) < 1e-8
    assert abs(dm.ssim(y, y).item() - 1) < 1e-12


# --- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_resume(tmp_path, tiny_data):
    cfg = dm.make_config("tiny", steps=6, eval_every=3)
    full = dm.train(cfg, tiny_data, log=lambda s: None)
    out = str(tmp_path / "run")
    dm.train(dm.make_config("tiny", steps=3, eval_every=3), tiny_data, out=out, log=lambda s: None)
    assert os.path.exists(os.path.join(out, "checkpoint.pt")) and not any(".tmp" in f for f in os.listdir(out))
    resumed = dm.train(cfg, tiny_data, out=out, resume=True, log=lambda s: None)
    assert resumed.step == 6
    assert json.load(open(os.path.join(out, "history.json")))["eval_step"] == [3, 6]
    G, loaded_cfg = dm.load_restorer(os.path.join(out, "checkpoint.pt"))
    assert loaded_cfg.steps == 6 and isinstance(loaded_cfg.d_mults, tuple)
    for k, v in resumed.G_ema.state_dict().items():
        torch.testing.assert_close(G.state_dict()[k], v)
    assert full.step == 6


def test_resume_takes_the_new_lr_and_refuses_another_run(tmp_path, tiny_data):
    out = str(tmp_path / "run")
    dm.train(dm.make_config("tiny", steps=2, eval_every=2), tiny_data, out=out, log=lambda s: None)
    longer = dm.train(dm.make_config("tiny", steps=4, eval_every=2, lr=5e-4), tiny_data, out=out, resume=True,
                      log=lambda s: None)
    assert longer.step == 4 and all(g["lr"] == 5e-4 for g in longer.opt.param_groups)
    assert dm.read_checkpoint(os.path.join(out, "checkpoint.pt"))["config"]["lr"] == 5e-4
    with pytest.raises(ValueError, match=r"cannot resume .*checkpoint.pt.*method='da'.*method='vanilla'"):
        dm.train(dm.make_config("tiny", steps=6, method="vanilla"), tiny_data, out=out, resume=True,
                 log=lambda s: None)
    with pytest.raises(ValueError, match="seed=0.*seed=1"):
        dm.train(dm.make_config("tiny", steps=6, seed=1), tiny_data, out=out, resume=True, log=lambda s: None)


def test_cli_resume_with_other_settings_is_an_argparse_error(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert dm.main(["--preset", "tiny", "--steps", "2", "--eval_every", "2", "--out", out]) == 0
    with pytest.raises(SystemExit) as e:
        dm.main(["--preset", "tiny", "--steps", "4", "--r_width", "4", "--out", out, "--resume"])
    assert e.value.code == 2 and "r_width=8" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/dada_min_pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")   # the file is a plain pickle, on purpose
def test_malicious_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"restorer": _Evil(), "config": {}}, f)
    with pytest.raises(ValueError, match="evil.pt"):
        dm.read_checkpoint(str(path))
    assert not os.path.exists("/tmp/dada_min_pwned")


def test_missing_checkpoint_names_the_file():
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        dm.read_checkpoint("nope.pt")


# --- the demo ---------------------------------------------------------------------------------------------
def test_demo_end_to_end_tiny(tmp_path):
    out = str(tmp_path / "demo")
    r = dm.demo(dm.make_config("tiny", device="cpu"), out, log=lambda s: None)
    saved = json.load(open(os.path.join(out, "results.json")))
    for key in ("seconds", "device", "machine", "config", "identity", "vanilla", "da", "oracle", "da_gain_real_db",
                "gap_closed"):
        assert key in saved
    for m in ("vanilla", "da", "oracle"):
        assert set(saved[m]) >= {"real_psnr", "syn_psnr", "real_ssim", "syn_ssim"}
    assert math.isclose(saved["da_gain_real_db"], saved["da"]["real_psnr"] - saved["vanilla"]["real_psnr"], abs_tol=1e-9)
    # tiny sizes have no shipped start: the three runs start from the identity map, i.e. at the input's scores
    assert saved["start"]["start"] == "scratch"
    assert math.isclose(saved["start"]["real_psnr"], saved["identity"]["real_psnr"], abs_tol=0.05)
    assert 0 <= saved["da"]["hinge_active_frac"] <= 1 and saved["vanilla"]["hinge_active_frac"] is None
    assert os.path.getsize(os.path.join(out, "demo.png")) > 1000
    assert r["device"] == "cpu"


def test_networks_norms_and_init_follow_the_official_code():
    """GroupNorm(32, c) at the official widths, never fewer than 2 channels per group at dada-min's small ones
    (gcd(32, 16) groups would be InstanceNorm); in both networks Kaiming-normal weights (fan_in, std sqrt(2/fan_in),
    mean 0) and zero biases in every conv and linear layer, the restorer's head included."""
    for width in (16, 64):
        D = dm.ConditionalDenoiser(width, (1, 2), 1)
        norms = [m for m in D.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(m.num_channels // m.num_groups >= 2 for m in norms)
        assert all(m.num_groups == 32 for m in norms if m.num_channels >= 64)
        for net in (D, dm.RestorerUNet(width, 3, zero_head=False)):
            layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            assert layers
            for m in layers:
                assert torch.count_nonzero(m.bias) == 0
                fan_in = m.weight[0].numel()
                if m.weight.numel() >= 4096:                       # enough weights for a tight std estimate
                    assert abs(m.weight.std().item() / math.sqrt(2 / fan_in) - 1) < 0.1
                    assert abs(m.weight.mean().item()) < 0.1 * math.sqrt(2 / fan_in)
    assert dm.make_config("paper").r_zero_head is False                # the paper preset: Kaiming in the head too
    G = dm.RESTORERS["unet"](dm.make_config("paper"))
    assert G.last.weight.abs().sum() > 0 and torch.count_nonzero(G.last.bias) == 0
    G = dm.RESTORERS["unet"](dm.make_config())                      # the small presets: a zero head, Kaiming before
    assert torch.count_nonzero(G.last.weight) == 0 and G.down[0][0].weight.std() > 0.5 * math.sqrt(2 / 27)


def test_ema_follows_the_config_and_the_paper_preset_scores_the_raw_restorer(tiny_data):
    """Warm-up (small presets): decay min(ema_decay, (1+s)/(10+s)); constant (the official code): ema_decay from step
    one. eval_ema=False (the paper preset, as the official validation) scores and restores the raw G."""
    assert dm.make_config("paper").ema_warmup is False and dm.make_config("paper").eval_ema is False
    assert dm.make_config().ema_warmup and dm.make_config().eval_ema
    for warmup in (True, False):
        cfg = dm.make_config("tiny", method="vanilla", ema_decay=0.9, ema_warmup=warmup, steps=1)
        state = dm.init_state(cfg, torch.device("cpu"))
        before = [p.clone() for p in state.G_ema.parameters()]
        dm.train_step(state, tiny_data)
        d = min(0.9, 1 / 10) if warmup else 0.9                     # step 0: (1 + 0) / (10 + 0)
        for b, e, g in zip(before, state.G_ema.parameters(), state.G.parameters()):
            torch.testing.assert_close(e, d * b + (1 - d) * g)
    cfg = dm.make_config("tiny", method="vanilla", eval_ema=False, steps=3, eval_every=3)
    state = dm.train(cfg, tiny_data, log=lambda s: None)
    assert state.G_eval is state.G
    assert dm.evaluate_pools(state.G, tiny_data)["real_psnr"] == state.history["real_psnr"][-1]


def test_checkpoints_restore_with_the_restorer_their_run_scored(tmp_path, tiny_data):
    for eval_ema in (True, False):
        out = str(tmp_path / str(eval_ema))
        state = dm.train(dm.make_config("tiny", method="vanilla", eval_ema=eval_ema, steps=4), tiny_data, out=out,
                         log=lambda s: None)
        G, _ = dm.load_restorer(os.path.join(out, "checkpoint.pt"))
        scored = state.G_ema if eval_ema else state.G
        for a, b in zip(G.parameters(), scored.parameters()):
            assert torch.equal(a, b)
        assert not all(torch.equal(a, b) for a, b in zip(state.G.parameters(), state.G_ema.parameters()))


def test_one_denoiser_call_for_positives_and_negatives_is_the_two_calls_of_the_official_code():
    """diffusion_loss runs eps_theta once on the 2B positives and negatives; the official code calls it twice."""
    torch.manual_seed(0)
    D = dm.ConditionalDenoiser(16, (1, 2), 1, attn=True)
    schedule = dm.NoiseSchedule()
    y0, cs, cr, n1, n2, eps = (torch.rand(4, 3, 16, 16) for _ in range(6))
    gamma = schedule.sample_gamma(4)
    torch.manual_seed(1)
    loss, parts = dm.diffusion_loss(D, schedule, y0, cs, cr, (n1, n2), shuffle=True, gamma=gamma, eps=eps)
    torch.manual_seed(1)                                            # the same two swap masks
    c1, c2, _ = dm.channel_shuffle(cs, cr)
    m1, m2, _ = dm.channel_shuffle(n1, n2)
    y_t = schedule.q_sample(y0, gamma, eps)
    pos, neg = (D(torch.cat([y_t, a, b], 1), gamma) for a, b in ((c1, c2), (m1, m2)))   # two calls
    mse_pos, mse_neg = F.mse_loss(pos, eps), F.mse_loss(neg, eps)
    torch.testing.assert_close(parts["mse"], mse_pos)
    torch.testing.assert_close(parts["mse_neg"], mse_neg)
    torch.testing.assert_close(loss, (mse_pos + F.relu(mse_pos - mse_neg + 0.1)) / 2)


def test_help_explains_every_config_field_with_its_preset_default(capsys):
    comments = dm.field_comments()
    assert set(comments) == {f.name for f in dm.dataclasses.fields(dm.Config)}
    assert all(len(c) > 10 for c in comments.values())
    assert "checkpoint.pt PATH" in comments["start"]                # a continuation line is kept
    for preset, lr, start in (("cpu-demo", "0.001", "shipped"), ("paper", "0.0001", "scratch")):
        with pytest.raises(SystemExit):
            dm.main(["--preset", preset, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"Adam learning rate, constant, shared by G and eps_theta (paper: 1e-4) [{preset}: {lr}]" in text
        assert f"else scratch [{preset}: auto -> {start}]" in text  # an auto field shows what it resolves to
        assert "decay of the EMA of G's weights" in text and "default from the preset" not in text


# --- tasks, the shipped starts, the RS term's log, the harness boundary ---------------------------------

@pytest.mark.parametrize("task", ["derain", "deblur"])
def test_tasks_are_in_range_deterministic_and_have_a_gap(task):
    y = dm.dead_leaves(4, 32, torch.Generator().manual_seed(0))
    syn = dm.TASKS[task]["synthetic"]
    (name, real), = dm.TASKS[task]["real"].items()
    xs = syn(y, torch.Generator().manual_seed(1))
    xr = real(y, torch.Generator().manual_seed(1))
    for x in (xs, xr):
        assert x.shape == y.shape and 0 <= x.min() and x.max() <= 1
        assert (x - y).abs().mean() > 0.01                                          # it degrades
    torch.testing.assert_close(syn(y, torch.Generator().manual_seed(1)), xs)
    torch.testing.assert_close(real(y, torch.Generator().manual_seed(1)), xr)
    assert (xs - xr).abs().mean() > 0.02                                            # the two domains differ
    assert dm.make_config(task=task).real_noise == name                             # auto: the task's domain


def test_real_like_rain_has_haze_and_synthetic_rain_has_none():
    y = torch.full((8, 3, 32, 32), 0.2)
    xs = dm.TASKS["derain"]["synthetic"](y, torch.Generator().manual_seed(0))
    xr = dm.TASKS["derain"]["real"]["layered"](y, torch.Generator().manual_seed(0))
    streak_free = (xs - y).abs().flatten(1).median(1).values                        # most pixels untouched
    assert streak_free.max() < 1e-6
    assert ((xr - y).flatten(1).median(1).values > 0.02).all()                      # a veil everywhere


def test_blur_kernels_are_normalised():
    g = torch.Generator().manual_seed(0)
    for k in (dm.shake_kernels(16, g), dm.gaussian_kernels(torch.full((4,), 1.2), 11)):
        assert (k >= 0).all()
        torch.testing.assert_close(k.sum((1, 2, 3)), torch.ones(len(k)))
    y = torch.full((16, 3, 20, 20), 0.4)                                            # a flat image stays flat
    torch.testing.assert_close(dm.blur(y, dm.shake_kernels(16, g)), y)


def test_default_real_domain_is_white_with_its_paired_synthetic_range():
    cfg = dm.make_config()
    assert (cfg.real_noise, cfg.sigma_max) == ("white", 15.0)
    assert dm.make_config(real_noise="camera").sigma_max == 75.0          # the paper's range
    assert dm.make_config(real_noise="camera", sigma_max=50).sigma_max == 50.0   # an explicit value wins
    with pytest.raises(ValueError, match="real_noise"):
        dm.make_config(task="derain", real_noise="camera")


def test_no_command_still_trains_on_builtin_data(capsys):
    assert dm.main(["--preset", "tiny", "--steps", "2", "--device", "cpu", "--method", "vanilla"]) == 0
    assert "real_psnr" in capsys.readouterr().out


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


@pytest.mark.parametrize("world, sigma_max", sorted(dm.STARTS))
def test_shipped_start_loads_and_denoises(world, sigma_max):
    """The committed start loads into the cpu-demo restorer, is small, and is a converged denoiser (far above
    the noisy input on synthetic test data of its world). tests/test_experiments.py checks how it was made."""
    blob = dm.read_checkpoint(dm.start_path(world, sigma_max))
    assert (blob["config"]["world"], blob["config"]["sigma_max"], blob["config"]["method"]) == (world, sigma_max,
                                                                                                  "vanilla")
    assert os.path.getsize(dm.start_path(world, sigma_max)) < 2e6
    cfg = dm.make_config(world=world, sigma_max=sigma_max, real_noise={15.0: "white", 75.0: "camera"}[sigma_max],
                         n_syn=1, n_real=1, n_test=32)
    assert cfg.start == "shipped"
    G0 = dm.init_state(cfg, torch.device("cpu")).G_ema
    data = dm.make_data(cfg)
    noisy = dm.psnr(data.test_syn_noisy.clamp(0, 1), data.test_syn_clean).mean().item()
    assert dm.evaluate_pools(G0, data)["syn_psnr"] > noisy + 2.5                # measured: +2.6 (15), +4.4 (75)


def test_start_scratch_is_the_identity_or_the_official_initialisation_and_bad_starts_are_named(tmp_path):
    cfg = dm.make_config(start="scratch", n_syn=1, n_real=1, n_test=2)
    G = dm.init_state(cfg, torch.device("cpu")).G
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(dm.restore(G, x), x)                        # zero residual head: y_hat = x
    cfg = dm.make_config(start="scratch", n_syn=1, n_real=1, n_test=2, r_zero_head=False)
    G = dm.init_state(cfg, torch.device("cpu")).G
    torch.manual_seed(cfg.seed)
    fresh, _ = dm.make_networks(cfg)                               # seeded Kaiming initialisation, nothing loaded
    assert all(torch.equal(a, b) for a, b in zip(G.parameters(), fresh.parameters()))
    assert not torch.equal(dm.restore(G, x), x)                    # a random residual: G is not the identity
    with pytest.raises(ValueError, match="start"):
        dm.make_config(start=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="start"):
        dm.make_config("tiny", start="shipped")                    # no shipped start of the tiny sizes
    with pytest.raises(ValueError, match="r_width"):               # a start of other sizes names them
        tiny = dm.train(dm.make_config("tiny", steps=1), out=str(tmp_path / "t"), log=lambda s: None)
        dm.init_state(dm.make_config(start=str(tmp_path / "t" / "checkpoint.pt")), torch.device("cpu"))
    assert tiny.step == 1


def test_da_logs_the_rs_term_per_evaluation(tmp_path):
    cfg = dm.make_config("tiny", margin=0.01, steps=6, eval_every=3)
    h = dm.train(cfg, out=str(tmp_path / "da"), log=lambda s: None).history
    assert len(h["hinge_active_frac"]) == len(h["eval_step"]) == 2
    assert all(0 <= a <= 1 for a in h["hinge_active_frac"]) and all(math.isfinite(g) for g in h["neg_pos_gap"])


def test_a_new_restorer_is_one_registry_entry_and_reloads_from_its_checkpoint(tmp_path, tiny_data, monkeypatch):
    class Tiny(torch.nn.Module):
        depth = 1

        def __init__(self, width):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x)
    monkeypatch.setitem(dm.RESTORERS, "tiny_conv", lambda cfg: Tiny(cfg.r_width))
    cfg = dm.make_config("tiny", device="cpu", restorer="tiny_conv", method="da", steps=2, eval_every=2)
    assert cfg.start == "scratch"                                  # no shipped start for another architecture
    state = dm.train(cfg, tiny_data, out=str(tmp_path), log=lambda *a: None)
    G, saved = dm.load_restorer(str(tmp_path / "checkpoint.pt"))
    assert isinstance(G, Tiny) and saved.restorer == "tiny_conv"
    torch.testing.assert_close(G.conv.weight, state.G_ema.conv.weight)
    with pytest.raises(ValueError, match="restorer"):
        dm.make_config(restorer="nope")


def test_synthetic_degradations_take_their_own_parameters():
    y = dm.dead_leaves(2, 16, torch.Generator().manual_seed(0))
    for task, params in (("denoise", ("sigma_max",)), ("derain", ()), ("deblur", ())):
        assert dm.TASKS[task]["params"] == params
        cfg = dm.make_config("tiny", task=task)
        want = dm.TASKS[task]["synthetic"](y, gen=torch.Generator().manual_seed(1),
                                           **{k: getattr(cfg, k) for k in params})
        torch.testing.assert_close(dm.degrade_synthetic(cfg, y, torch.Generator().manual_seed(1)), want)


def test_dada_min_never_imports_the_harness_and_its_help_names_the_harness(capsys):
    code = "import sys, dada_min; print(sorted(m for m in ('folders', 'experiments', 'baselines', 'bench') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(dm.__file__))
    assert r.stdout.strip() == "[]", r.stderr
    with pytest.raises(SystemExit):
        dm.main(["--help"])
    out = capsys.readouterr().out
    assert all(m in out for m in ("folders.py", "experiments.py", "bench.py"))


def test_the_docs_numbers_of_the_networks_match_the_code():
    """The parameter counts and attention heads that README.md and docs/ state are the code's."""
    root = os.path.dirname(dm.__file__)
    read = lambda p: open(os.path.join(root, p), encoding="utf-8").read()           # noqa: E731
    G, D = dm.make_networks(dm.make_config())                                       # the cpu-demo sizes
    g, d = dm.n_params(G) / 1e6, dm.n_params(D) / 1e6
    assert f"restorer ≈ {g:.2f} M parameters, denoiser ≈ {d:.2f} M" in read("docs/deviations.md")
    assert f"at {d:.1f} M parameters" in read("README.md")
    assert "16 heads at 512 channels" in read("docs/gpu.md")
    assert dm.AttnBlock(512).heads == 16 and dm.AttnBlock(512).qkv.out_channels // 3 // 16 == 32


def test_identity_metrics_score_the_inputs(tiny_data):
    m = dm.identity_metrics(tiny_data)
    assert set(m) == {"syn_psnr", "syn_ssim", "real_psnr", "real_ssim"}
    assert m["real_psnr"] == dm.psnr(tiny_data.test_real_noisy, tiny_data.test_real_clean).mean().item()
    assert m["syn_ssim"] == dm.ssim(tiny_data.test_syn_noisy.clamp(0, 1), tiny_data.test_syn_clean).mean().item()


# --- the clean worlds and the correlated domain ---------------------------------------------------------------
def test_worlds_are_deterministic_in_range_and_the_config_picks_one():
    for name, clean in dm.WORLDS.items():
        x = clean(4, 32, torch.Generator().manual_seed(0))
        assert x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
        torch.testing.assert_close(clean(4, 32, torch.Generator().manual_seed(0)), x)
    sharp, natural = (dm.WORLDS[w](16, 48, torch.Generator().manual_seed(0)) for w in ("dead-leaves", "natural"))
    assert natural.std() < sharp.std()                                    # natural local contrast: below the sharp one
    data = dm.make_data(dm.make_config("tiny", world="dead-leaves"))
    torch.testing.assert_close(data.syn_clean, dm.dead_leaves(80, 32, torch.Generator().manual_seed(0))[:32])
    assert dm.make_config().world == "phone"
    phone = dm.phone_leaves(16, 48, torch.Generator().manual_seed(0))
    import folders                                                        # the statistics live there
    hf = lambda x: folders.clean_stats(x)["hf"]                           # noqa: E731
    assert hf(phone) < 0.3 * hf(natural) and phone.std() > 0.1              # smooth at the pixel scale, not flat
    with pytest.raises(ValueError, match="world='mars' is not one of"):
        dm.make_config(world="mars")


def test_correlated_noise_sits_inside_the_synthetic_range_and_is_correlated():
    y = torch.full((16, 3, 48, 48), 0.5)
    x = dm.TASKS["denoise"]["real"]["correlated"](y, torch.Generator().manual_seed(0))
    n = x - y
    sigma = n.std((1, 2, 3)) * 255
    assert 4 < sigma.min() and sigma.max() < 16                           # per image in U[5, 15]/255
    corr = (n[..., 1:] * n[..., :-1]).mean() / (n ** 2).mean()             # neighbour correlation
    assert corr > 0.5                                                      # white noise: ~0
    cfg = dm.make_config(real_noise="correlated")
    assert cfg.sigma_max == 15.0 and cfg.start == "shipped"
