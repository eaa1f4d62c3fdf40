"""The effect experiment (when does DA close the vanilla -> oracle gap?) at its --quick size, the shipped starts,
and the live RS hinge."""
import json
import math
import os

import pytest
import torch

import dada_min as dm


def test_effect_experiment_quick(tmp_path):
    out = str(tmp_path / "effect")
    cfg = dm.make_config("tiny", **dm.exp_effect.quick)
    res = dm.exp_effect(cfg, out, quick=True, log=lambda s: None)
    saved = json.load(open(os.path.join(out, "effect.json")))
    assert set(saved["domains"]) == set(dm.TASKS["denoise"]["real"]) == set(res["domains"])
    for d in saved["domains"].values():
        s, runs = d["summary"], d["runs"]
        assert set(s) == {"vanilla", "da", "da_live", "no_contrast", "only_real", "oracle"}
        assert s["vanilla"]["gap_closed"]["mean"] == 0.0 and s["oracle"]["gap_closed"]["mean"] == 1.0
        gap = (runs["da"][0]["real_psnr"] - runs["vanilla"][0]["real_psnr"]) / (
            runs["oracle"][0]["real_psnr"] - runs["vanilla"][0]["real_psnr"])
        assert math.isclose(s["da"]["gap_closed"]["mean"], gap, rel_tol=1e-9, abs_tol=1e-12)
        # the RS rows log their hinge; the others do not have one
        for v in ("da", "da_live"):
            assert 0.0 <= s[v]["hinge_active_frac"]["mean"] <= 1.0
            assert set(runs[v][0]["gap_by_gamma"]) == {str(g) for g in dm.GAP_LEVELS}
        assert "hinge_active_frac" not in s["no_contrast"] and "diag" not in s["vanilla"]
        assert all(-1 <= r["diag"] <= 1 for r in runs["only_real"])
        assert d["prediction"]["start_real_hf"]["mean"] > 0
    assert os.path.getsize(os.path.join(out, "effect.png")) > 1000
    assert "| da_live |" in dm.effect_table(saved)


@pytest.mark.parametrize("sigma_max", sorted(dm.STARTS))
def test_shipped_start_loads_matches_its_command_and_denoises(sigma_max):
    """The committed start is what `--make-start` writes: its config is start_config's, it loads into the
    cpu-demo restorer, and it is a converged denoiser (far above the noisy input on synthetic test data)."""
    blob = torch.load(dm.start_path(sigma_max), map_location="cpu", weights_only=True)
    assert blob["config"] == json.loads(json.dumps(dm.dataclasses.asdict(dm.start_config(sigma_max))))
    assert os.path.getsize(dm.start_path(sigma_max)) < 2e6
    cfg = dm.make_config(sigma_max=sigma_max, real_noise={15.0: "white", 75.0: "camera"}[sigma_max],
                         n_syn=1, n_real=1, n_test=32)
    assert cfg.start == "shipped"
    G0 = dm.init_state(cfg, torch.device("cpu")).G_ema
    data = dm.make_data(cfg)
    noisy = dm.psnr(data.test_syn_noisy.clamp(0, 1), data.test_syn_clean).mean().item()
    assert dm.evaluate_pools(G0, data)["syn_psnr"] > noisy + 3.0


def test_start_scratch_is_the_identity_and_bad_starts_are_named(tmp_path):
    cfg = dm.make_config(start="scratch", n_syn=1, n_real=1, n_test=2)
    G = dm.init_state(cfg, torch.device("cpu")).G
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(dm.restore(G, x), x)                        # zero residual head: y_hat = x
    with pytest.raises(ValueError, match="start"):
        dm.make_config(start=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="start"):
        dm.make_config("tiny", start="shipped")                    # no shipped start of the tiny sizes
    with pytest.raises(ValueError, match="r_width"):               # a start of other sizes names them
        tiny = dm.train(dm.make_config("tiny", steps=1), out=str(tmp_path / "t"), log=lambda s: None)
        dm.init_state(dm.make_config(start=str(tmp_path / "t" / "checkpoint.pt")), torch.device("cpu"))
    assert tiny.step == 1


def test_x0_hinge_is_per_sample_in_image_units():
    eps = torch.zeros(2, 3, 4, 4)
    pos, neg = torch.full_like(eps, 0.1), torch.full_like(eps, 0.2)   # noise MSE 0.01 and 0.04 per sample
    gamma = torch.tensor([0.5, 0.9])                                 # (1 - g) / g = 1 and 1/9
    want = (max(0.0, (0.01 - 0.04) * 1 + 0.02) + max(0.0, (0.01 - 0.04) / 9 + 0.02)) / 2
    assert math.isclose(dm.x0_hinge(eps, pos, neg, gamma, 0.02).item(), want, rel_tol=1e-5)
    # the batch hinge of the same errors is off at this margin: the x0 one is still on for the noisy sample
    assert dm.triplet_hinge(eps, pos, neg, 0.02).item() == 0.0


@pytest.mark.parametrize("hinge", ["x0", "auto"])
def test_live_hinges_train_and_log_the_rs_term(hinge, tmp_path):
    cfg = dm.make_config("tiny", hinge=hinge, margin=0.01, steps=6, eval_every=3)
    state = dm.train(cfg, out=str(tmp_path / hinge), log=lambda s: None)
    h = state.history
    assert len(h["hinge_active_frac"]) == len(h["eval_step"]) == 2
    assert all(0 <= a <= 1 for a in h["hinge_active_frac"]) and all(math.isfinite(g) for g in h["neg_pos_gap"])
    if hinge == "auto":                                              # the running margin survives a resume
        assert state.gap_mean is not None
        blob = torch.load(str(tmp_path / hinge / "checkpoint.pt"), weights_only=True)
        assert torch.equal(blob["gap_mean"], state.gap_mean)
