"""experiments.py: the registry and its command line, the Fig. 1a helper, and each experiment's --quick run
(JSON structure, sane values, figures written). The baselines are tested in tests/test_baselines.py."""
import dataclasses
import json
import math
import os
import signal

import pytest
import torch
from PIL import Image

import dada_min as dm
import experiments


# --- the pieces the experiments add -----------------------------------------------------------------------


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
    e = experiments.condition_errors(Ideal(), sched, y, cfg, draws=2)
    assert len(e) == len(experiments.SIGMAS) and e[0] < 1e-6
    assert all(b > a for a, b in zip(e, e[1:]))
    blind = experiments.condition_errors(Blind(), sched, y, cfg, draws=2)
    assert max(blind) - min(blind) < 1e-9                     # same fixed draws at every sigma


def test_experiment_sizes_apply_to_cpu_demo_and_flags_win(monkeypatch):
    seen = {}

    def exp_probe(cfg, out, quick):
        seen["cfg"], seen["quick"] = cfg, quick
    monkeypatch.setattr(experiments, "EXPERIMENTS", {})
    experiments.experiment(size=dict(steps=123, batch_size=5), quick=dict(steps=3))(exp_probe)
    experiments.main(["probe", "--out", "unused"])
    assert seen["cfg"].steps == 123 and seen["cfg"].batch_size == 5 and seen["cfg"].r_width == 16
    experiments.main(["probe", "--steps", "7"])
    assert seen["cfg"].steps == 7 and seen["cfg"].batch_size == 5
    experiments.main(["probe", "--quick"])
    assert seen["cfg"].steps == 3 and seen["cfg"].image_size == dm.PRESETS["tiny"]["image_size"] and seen["quick"]
    experiments.main(["probe", "--preset", "gpu"])  # other presets are used as they are
    assert seen["cfg"].steps == dm.PRESETS["gpu"]["steps"]
    with pytest.raises(SystemExit):
        experiments.main(["nope"])


# --- each experiment's --quick run ------------------------------------------------------------------------
def run_quick(name, tmp_path):
    out = str(tmp_path / name)
    assert experiments.main([name, "--quick", "--device", "cpu", "--out", out]) == 0
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
    assert list(rows) == [label for label, _, _ in experiments.ABLATION_ROWS]
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


def test_task_figure(tmp_path):
    experiments.save_task_figure(str(tmp_path / "tasks.png"), size=32)
    assert Image.open(tmp_path / "tasks.png").size[0] > 200


def test_effect_experiment_quick(tmp_path):
    out = str(tmp_path / "effect")
    cfg = dm.make_config("tiny", **experiments.exp_effect.quick)
    res = experiments.exp_effect(cfg, out, quick=True, log=lambda s: None, domains=("white", "correlated"))
    saved = json.load(open(os.path.join(out, "effect.json")))
    assert list(saved["domains"]) == ["white", "correlated"] == list(res["domains"])
    for d in saved["domains"].values():
        s, runs = d["summary"], d["runs"]
        assert set(s) == set(experiments.EFFECT_ROWS) == {"vanilla", "da", "no_contrast", "only_real", "oracle"}
        assert s["vanilla"]["gap_closed"]["mean"] == 0.0 and s["oracle"]["gap_closed"]["mean"] == 1.0
        gap = (runs["da"][0]["real_psnr"] - runs["vanilla"][0]["real_psnr"]) / (
            runs["oracle"][0]["real_psnr"] - runs["vanilla"][0]["real_psnr"])
        assert math.isclose(s["da"]["gap_closed"]["mean"], gap, rel_tol=1e-9, abs_tol=1e-12)
        # the RS rows log their hinge; the others do not have one
        assert 0.0 <= s["da"]["hinge_active_frac"]["mean"] <= 1.0
        assert set(runs["da"][0]["gap_by_gamma"]) == {str(g) for g in experiments.GAP_LEVELS}
        assert "hinge_active_frac" not in s["no_contrast"] and "diag" not in s["vanilla"]
        assert all(-1 <= r["diag"] <= 1 for r in runs["only_real"])
        assert d["prediction"]["start_real_hf"]["mean"] > 0
        assert all(len(r["real_bands"]) == 4 and min(r["real_bands"]) >= 0 for r in runs["da"])
    assert os.path.getsize(os.path.join(out, "effect.png")) > 1000
    assert "| no_contrast |" in experiments.effect_table(saved)
    published = json.load(open(os.path.join(os.path.dirname(experiments.__file__), "docs", "effect", "effect.json")))
    assert "| da_live |" in experiments.effect_table(published)               # the published table, row for row


# --- the shipped starts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("world, sigma_max", sorted(dm.STARTS))
def test_shipped_start_is_what_make_start_writes(world, sigma_max):
    """The committed start's config is start_config's (fields added to Config later hold their defaults, as
    loading reads them; fields removed later held the one behaviour that remains)."""
    blob = dm.read_checkpoint(dm.start_path(world, sigma_max))
    want = json.loads(json.dumps(dataclasses.asdict(experiments.start_config(world, sigma_max))))
    newer, removed = set(want) - set(blob["config"]), set(blob["config"]) - set(want)
    assert {k: blob["config"][k] for k in removed} == {k: v for k, v in {"compile": False, "hinge": "batch"}.items()
                                                       if k in removed}
    assert {k: v for k, v in blob["config"].items() if k not in removed} == {
        k: v for k, v in want.items() if k not in newer}
    assert all(want[k] == getattr(dm.Config, k) for k in newer)
    assert dm.config_from_dict(blob["config"]) == experiments.start_config(world, sigma_max)


def test_make_start_writes_a_slim_loadable_start(tmp_path, capsys):
    path = str(tmp_path / "start.pt")
    small = dict(n_syn=8, n_real=8, n_test=4, steps=2, eval_every=0, log_every=2)
    state = experiments.make_start("natural", 15.0, path, log=lambda s: None, **small)
    blob = dm.read_checkpoint(path)
    assert "denoiser" not in blob and "optimizer" not in blob and blob["step"] == 2
    G, cfg = dm.load_restorer(path)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(dm.restore(G, x), dm.restore(state.G_ema.eval(), x))
    G2 = dm.load_start(dm.RestorerUNet(cfg.r_width, cfg.r_depth), path)             # what start=PATH reads
    torch.testing.assert_close(dm.restore(G2, x), dm.restore(G, x))
    with pytest.raises(SystemExit) as e:
        experiments.main(["--make-start", "--sigma_max", "20"])
    assert e.value.code == 2 and "no shipped start" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        experiments.main(["--make-start", "--world", "mars"])
    assert e.value.code == 2 and "--world mars" in capsys.readouterr().err


def test_high_frequency_tools():
    clean = dm.dead_leaves(4, 32, torch.Generator().manual_seed(0))
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    assert experiments.hf_ratio(clean, clean) == pytest.approx(1.0)
    assert experiments.hf_ratio(noisy, clean) > 1.3                            # noise is high-frequency energy
    assert torch.equal(experiments.shrink_hf(noisy, 0.0), noisy)
    assert experiments.hf_ratio(experiments.shrink_hf(noisy, 0.5), clean) < experiments.hf_ratio(noisy, clean)
    smooth = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(experiments.box5(smooth), smooth)              # a flat image has no high frequencies


# --- the check against the official code (CI has no checkout of it: the mapping is tested on dada_min's own nets) ---

def test_restorer_convs_are_listed_in_the_order_the_forward_pass_runs_them():
    """The official RestorationNet registers its convs in forward order; restorer_convs puts G's in the same order."""
    G = dm.RestorerUNet(8, 3)
    called = []
    for m in G.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: called.append(mod))
    G(torch.rand(1, 3, 16, 16))
    assert experiments.restorer_convs(G) == called and len(called) == len(set(called)) == 13


def test_denoiser_parameters_are_registered_in_the_official_order():
    """The mapping to the official UNet goes by parameter order: blocks in the order of the forward pass, and inside
    a residual block guided-diffusion's in_layers (norm, conv), emb_layers, out_layers (norm, conv), skip."""
    D = dm.ConditionalDenoiser(32, (1, 2), 2, attn=True)
    units = [D.gamma_mlp, D.inp, *D.down, *D.mid, *D.up, D.out]
    called = []
    for u in units:
        u.register_forward_hook(lambda mod, i, o: called.append(mod))
    D(torch.rand(1, 9, 16, 16), torch.rand(1))
    assert [m for m in called if list(m.parameters())] == [u for u in units if list(u.parameters())]
    owners = [n for n, _ in D.named_parameters()]
    assert owners == [f"{k}.{n}" for k, u in D.named_children() for n, _ in u.named_parameters()]
    block = [n for n, _ in D.down[0].named_parameters()]
    assert block == ["in_layers.0.weight", "in_layers.0.bias", "conv1.weight", "conv1.bias", "emb.1.weight",
                     "emb.1.bias", "norm2.weight", "norm2.bias", "out_layers.2.weight", "out_layers.2.bias"]
    assert [n for n, _ in D.up[0].named_parameters()][-2:] == ["skip.weight", "skip.bias"]


def test_official_layout_round_trips_and_the_head_major_qkv_is_the_legacy_attention():
    torch.manual_seed(0)
    D, D2 = (dm.ConditionalDenoiser(32, (1, 2), 1, attn=True) for _ in range(2))
    attn = next(m for m in D.modules() if isinstance(m, dm.AttnBlock))
    c, heads = attn.qkv.out_channels // 3, attn.heads
    assert heads == 2
    rows = experiments.qkv_rows(c, heads)
    # the official layout of every tensor: Conv1d shapes (no trailing 1) and head-major qkv rows
    official = [(n,
                 (t[rows] if "qkv" in n else t).reshape(t.shape[:2]) if "qkv" in n or "proj" in n else t)
                for n, t in D.named_parameters()]
    with torch.no_grad():
        for (na, ta), (nb, tb) in zip(D2.named_parameters(), official):
            ta.copy_(experiments.to_ours(nb, tb, ta, heads))
    x, g = torch.rand(2, 9, 16, 16), torch.rand(2)
    torch.testing.assert_close(D2(x, g), D(x, g), rtol=0, atol=0)
    # legacy (head-major) attention computed from the permuted projection equals dada_min's AttnBlock
    h = torch.rand(2, c, 4, 4)
    w = attn.qkv.weight[rows].flatten(1)                                            # (3c, c) head-major
    b = attn.qkv.bias[rows]
    qkv = torch.einsum("oc,bct->bot", w, attn.norm(h).flatten(2)) + b[:, None]      # (B, 3c, T)
    q, k, v = qkv.reshape(2 * heads, 3 * (c // heads), 16).split(c // heads, dim=1)
    a = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c // heads), -1)
    out = torch.einsum("bts,bcs->bct", a, v).reshape(2, c, 16)
    ref = h + attn.proj(out.reshape(2, c, 4, 4))
    torch.testing.assert_close(attn(h), ref, rtol=1e-5, atol=1e-5)


def test_check_official_names_a_folder_that_is_not_a_checkout(tmp_path, capsys):
    with pytest.raises(SystemExit):
        experiments.main(["--check-official", str(tmp_path)])
    assert "not a checkout of KangLiao929/Noise-DA" in capsys.readouterr().err


def test_scripted_draws_replace_and_restore_the_generators():
    with experiments.scripted_draws([torch.tensor([7])], [torch.tensor([0.25])]):
        assert torch.randint(1, 10, (1,)).item() == 7 and torch.rand(1).item() == 0.25
    assert torch.rand(3).shape == (3,) and torch.randint(0, 2, (2,)).shape == (2,)


# --- clean-image worlds ---------------------------------------------------------------------------------------

def test_clean_stats_see_edges_blur_and_the_spectrum_slope():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((4, 3, 32, 32), 0.5)
    st = experiments.clean_stats(flat + 1e-3 * torch.randn(flat.shape, generator=gen))
    assert st["edges"] == 0.0 and st["hf"] < 1e-5
    sharp = dm.dead_leaves(16, 48, gen)
    soft = experiments.defocus(sharp, 1.5)
    a, b = experiments.clean_stats(sharp), experiments.clean_stats(soft)
    assert b["hf"] < 0.3 * a["hf"] and b["edges"] < a["edges"] and b["slope"] < a["slope"]
    # white noise has a flat spectrum (slope 0); 1/f^2 noise made in Fourier space has slope -2
    assert abs(experiments.spectrum_slope(torch.randn(8, 3, 64, 64, generator=gen))) < 0.2
    f = torch.fft.fftfreq(64).abs()
    r = torch.sqrt(f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).clamp(min=1 / 64)
    pink = torch.fft.ifft2(torch.fft.fft2(torch.randn(8, 64, 64, generator=gen)) / r).real
    assert abs(experiments.spectrum_slope(pink[:, None].expand(-1, 3, -1, -1)) + 2) < 0.2


def test_worlds_quick_compares_with_a_photo_folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image
    for i in range(2):
        Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(photos / f"{i}.png")
    out = str(tmp_path / "w")
    assert experiments.main(["worlds", "--quick", "--out", out, "--photos", str(photos)]) == 0
    r = json.load(open(os.path.join(out, "worlds.json")))
    assert set(experiments.CLEAN_VARIANTS) < set(r["stats"]) and "photographs (photos)" in r["stats"]
    assert r["crop"] == 16 and os.path.getsize(os.path.join(out, "worlds.png")) > 1000
    data = dm.make_data(dm.make_config("tiny"), clean=experiments.CLEAN_VARIANTS["defocus 1.5 px"])   # a world as data
    assert data.syn_clean.shape == (32, 3, 32, 32)


def test_world_effect_quick(tmp_path):
    out, res = run_quick("world_effect", tmp_path)
    assert list(res["worlds"]) == list(experiments.CLEAN_VARIANTS)[:2]
    for w in res["worlds"].values():
        assert set(w) >= {"clean_stats", "vanilla", "da", "oracle", "da_gain_real_db", "gap_closed"}
        check_metrics(w["da"])
        gain = w["da"]["real_psnr"]["mean"] - w["vanilla"]["real_psnr"]["mean"]
        assert w["da_gain_real_db"]["mean"] == pytest.approx(gain)
    fake = {k: {"da_gain_real_db": {"mean": g}, "clean_stats": {"hf": hf}} for k, g, hf in (
        ("dead leaves (current)", -2.0, 0.012), ("60 discs", -1.5, 0.012), ("2x canvas, crop", -1.0, 0.010),
        ("defocus 1.5 px", 0.5, 0.0012))}
    assert all(experiments.world_claims(fake).values())                       # the claims can hold ...
    fake["defocus 1.5 px"]["da_gain_real_db"]["mean"] = -3.0                   # ... and fail
    assert not experiments.world_claims(fake)["H1: every world with hf <= 2x photographs' gains (mean > 0)"]


# --- the selected world, the octave-band errors and the regime map -------------------------------------------------
def test_natural_world_passes_the_selection_rule_and_is_its_choice():
    """docs/effect.md's rule: hf in [0.0005, 0.0025], edges <= 0.105, slope within 0.3 of -2.70."""
    st = experiments.clean_stats(dm.natural_leaves(256, 48, torch.Generator().manual_seed(0)), 32)
    assert 0.0005 <= st["hf"] <= 0.0025 and st["edges"] <= 0.084 * 1.25 and abs(st["slope"] + 2.70) <= 0.3
    assert st["hf"] == pytest.approx(0.00249, abs=2e-5) and st["slope"] == pytest.approx(-2.71, abs=0.01)
    sharp = experiments.clean_stats(dm.dead_leaves(64, 48, torch.Generator().manual_seed(0)), 32)
    assert sharp["hf"] > 0.0025                                                 # the old world fails the rule


def test_phone_world_passes_its_rule_and_is_its_choice():
    """docs/effect.md's phone rule: hf in [0.0001, 0.0004], edges in [0.0048, 0.021], slope in [-3.2, -2.0], luma
    std >= 0.04; phone_leaves' defaults are the grid's nearest qualifying candidate (distance 1.05)."""
    x = dm.phone_leaves(256, 48, torch.Generator().manual_seed(0))
    st = {**experiments.clean_stats(x, 32), "luma_std": float(experiments.luma(x).std((2, 3)).mean())}
    ok, dist = experiments.phone_rule(st)
    assert ok and dist == pytest.approx(1.05, abs=0.01) and st["hf"] == pytest.approx(0.00027, abs=1e-5)
    nat = experiments.clean_stats(dm.natural_leaves(64, 48, torch.Generator().manual_seed(0)), 32)
    assert not experiments.phone_rule({**nat, "luma_std": 0.1})[0]                 # too much texture for a phone
    assert not experiments.phone_rule({**st, "luma_std": 0.01})[0]                 # a flat image fails too
    assert experiments.phone_rule({"hf": 0.00021, "edges": 0.012, "slope": -2.69, "luma_std": 0.1})[1] < 1e-2


def test_phone_world_quick_measures_and_chooses(tmp_path):
    out = str(tmp_path / "phone")
    assert experiments.main(["phone_world", "--quick", "--out", out]) == 0
    res = json.load(open(os.path.join(out, "phone_world.json")))
    assert res["chosen"] == "phone_leaves n 100 r 14 c 1 lens 2 texture 0.02"
    assert not res["candidates"]["natural upsampled x3"]["qualifies"]             # edges: too few after upsampling
    assert os.path.getsize(os.path.join(out, "phone_world.png")) > 1000


def smooth_photos(folder, n=6, size=64, seed=0):
    """n smooth colour 'photographs' (random low-frequency fields), written as PNGs."""
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    low = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=gen), size=size, mode="bicubic")
    for i, img in enumerate(low.clamp(0, 1)):
        Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(os.path.join(folder, f"p{i}.png"))
    return str(folder)


def test_axis_folders_deal_photographs_to_pools(tmp_path):
    imgs = [torch.full((3, 64, 96), i / 10) for i in range(7)]                     # each photo its own grey
    counts = experiments.write_axis_folders(imgs, str(tmp_path / "f"), torch.Generator().manual_seed(0), quick=True)
    assert counts == {"clean": 3 * 6, "real": 2 * 6, "eval": 2 * 6}               # photos 0,3,6 / 1,4 / 2,5; 6 tiles each
    import folders
    ev = folders.folder_tiles(str(tmp_path / "f" / "eval"), 32, None, n=None, paired=True, log=lambda s: None)
    greys = {round(float(t[3:].mean()), 1) for t in ev}
    assert greys == {0.2, 0.5}                                                     # eval tiles come from photos 2, 5 only
    assert (ev[:, :3] - ev[:, 3:]).abs().mean() > 0.05                             # inputs carry the white noise


def test_axis_quick_puts_photos_and_worlds_on_one_axis(tmp_path):
    photos = smooth_photos(tmp_path / "smooth")
    out = str(tmp_path / "axis")
    lines = []
    cfg = dm.make_config("tiny", **experiments.exp_axis.quick)
    res = experiments.exp_axis(cfg, out, True, log=lines.append, photos=[photos])
    assert list(res["cells"]) == ["smooth x1", "smooth x2", *experiments.AXIS_WORLDS]
    for c in res["cells"].values():
        assert c["hf"] > 0 and math.isfinite(c["da"]["mean"]) and c["regime"] == experiments.regime(
            c["da_gain_real_db"]["mean"])
        assert c["da_gain_real_db"]["mean"] == pytest.approx(c["da"]["mean"] - c["vanilla"]["mean"])
    assert res["cells"]["smooth x2"]["hf"] < res["cells"]["smooth x1"]["hf"]      # upsampling smooths
    assert os.path.getsize(os.path.join(out, "axis.png")) > 1000 and "| smooth x1 |" in open(os.path.join(out, "axis.md")).read()
    lines.clear()
    again = experiments.exp_axis(cfg, out, True, log=lines.append, photos=[photos])
    assert "5 cell(s) kept" in lines[0] and again["cells"] == res["cells"]
    cells = {k: {"kind": "photographs", "hf": hf, "da_gain_real_db": {"mean": g}} for k, hf, g in (
        ("a", 1e-4, 2.0), ("b", 1e-3, 0.5), ("c", 3e-3, -1.0))}
    claims = experiments.axis_claims(cells)
    assert list(claims.values()) == [True, True] and "rank correlation -1.00" in list(claims)[0]
    cells["c"]["da_gain_real_db"]["mean"] = 3.0
    assert list(experiments.axis_claims(cells).values()) == [False, False]


def test_band_errors_see_each_scale():
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, 32, 32, generator=gen)
    noise = 0.1 * torch.randn(clean.shape, generator=gen)
    assert experiments.band_errors(clean + noise, clean + noise, clean) == pytest.approx([1.0] * 4)
    assert experiments.band_errors(clean, clean + noise, clean) == pytest.approx([0.0] * 4)
    smooth = clean + experiments.box5(noise)                                     # a low-pass: coarse noise stays
    b = experiments.band_errors(smooth, clean + noise, clean)
    assert b[0] < 0.02 < b[1] < b[2] < b[3] and b[3] > 0.5                      # measured 0.01 / 0.07 / 0.34 / 0.73
    assert experiments.hf_ratio(smooth, clean) < experiments.hf_ratio(clean + noise, clean)   # fine noise gone
    assert experiments.band_errors(clean[..., :30, :31], clean[..., :30, :31] + noise[..., :30, :31],
                                   clean[..., :30, :31]) == pytest.approx([0.0] * 4)   # odd sizes: whole octaves


def test_regime_map_quick_writes_the_table_and_keeps_cells(tmp_path):
    out = str(tmp_path / "map")
    cfg = dm.make_config("tiny", steps=2, eval_every=0, log_every=2)
    lines = []
    cells = [("natural", "white", None), ("dead-leaves", "white", None), ("phone", "camera", 15.0)]
    res = experiments.exp_regime_map(cfg, out, True, log=lines.append, cells=cells)
    assert list(res["cells"]) == ["natural | white", "dead-leaves | white", "phone | camera (σ ≤ 15)"]
    assert res["cells"]["phone | camera (σ ≤ 15)"]["sigma_max"] == 15.0
    for cell in res["cells"].values():
        assert cell["regime"] == experiments.regime(cell["da_gain_real_db"]["mean"])
        assert len(cell["bands"]["da"]) == 4 and all(b >= 0 for b in cell["bands"]["vanilla"])
        check_metrics(cell["oracle"])
    table = open(os.path.join(out, "regime_map.md")).read()
    assert table.count("\n| natural |") == 1 and "| dead-leaves | white |" in table
    assert os.path.getsize(os.path.join(out, "regime_map.png")) > 1000
    lines.clear()
    again = experiments.exp_regime_map(dataclasses.replace(cfg, world="phone"), out, True, log=lines.append,
                                       cells=cells)                           # a field each cell sets itself
    assert "3 cell(s) kept" in lines[0] and again["cells"] == res["cells"]    # a rerun trains nothing
    assert experiments.regime(0.31) == "helps" and experiments.regime(-0.31) == "destroys"
    assert experiments.regime(0.2) == "idles"


def test_regime_claims_follow_their_rules():
    def cell(gain, closed=0.5, syn=0.0, share=0.3, band=0.8):
        return {"da_gain_real_db": {"mean": gain}, "regime": experiments.regime(gain), "gap_closed": {"mean": closed},
                "da_syn_change_db": {"mean": syn}, "vanilla_share": {"mean": share},
                "bands": {"vanilla": [0.2, band, 0.9, 1.0]}}
    cells = {"natural | white": cell(1.0), "dead-leaves | white": cell(-2.0), "natural | camera": cell(0.1),
             "dead-leaves | camera": cell(-0.5), "natural | correlated": cell(0.5), "dead-leaves | correlated": cell(0.0)}
    assert all(experiments.regime_claims(cells).values())
    cells["natural | white"] = cell(1.0, syn=-0.6)                              # syn price too high: M1 fails
    cells["natural | correlated"] = cell(0.5, band=0.4)                          # fine at 2-4 px: M4 fails
    claims = experiments.regime_claims(cells)
    assert [k[:2] for k, ok in claims.items() if not ok] == ["M1", "M4"]


def test_kept_cells_follow_settings_not_code_versions(tmp_path):
    path = str(tmp_path / "r.json")
    cfg = json.loads(json.dumps(dataclasses.asdict(dm.make_config("tiny"))))
    old = {"config": {**cfg, "hinge": "batch"}, "seeds": [0], "cells": {"a": 1}}   # a field the code lost since
    del old["config"]["d_warmup"]                                                   # ... and one it gained since
    json.dump(old, open(path, "w"))
    now = lambda **kw: {"experiment": "x", "config": {**cfg, **kw}, "seeds": [0]}   # noqa: E731
    assert experiments.kept_cells(path, now(), lambda s: None) == {"a": 1}
    assert experiments.kept_cells(path, now(d_warmup=5), lambda s: None) == {}     # a new field set: other runs
    assert experiments.kept_cells(path, now(steps=3), lambda s: None) == {}        # other settings
    assert experiments.kept_cells(path, now(world="natural"), lambda s: None, ("world",)) == {"a": 1}   # per cell
    assert experiments.kept_cells(str(tmp_path / "none.json"), now(), lambda s: None) == {}


def test_ladder_quick_runs_every_rung_paired_with_its_vanilla(tmp_path, monkeypatch):
    photos = smooth_photos(tmp_path / "smooth")
    out = str(tmp_path / "ladder")
    cfg = dm.make_config("tiny", **experiments.exp_ladder.quick)
    train, calls, stop = dm.train, [], [5]

    def counted(c, data, log=print):                # Ctrl-C in the 5th training: start, vanilla, oracle, DA base, ...
        calls.append((c.method, c.steps))
        if len(calls) == stop[0]:
            raise KeyboardInterrupt
        return train(c, data, log=log)
    monkeypatch.setattr(dm, "train", counted)
    logs = []
    with pytest.raises(KeyboardInterrupt):                           # a stopped run reports its finished cells
        experiments.exp_ladder(cfg, out, True, log=logs.append, photos=[photos])
    table = open(os.path.join(out, "ladder.md")).read()
    assert "| smooth x1 | base |" in table and "warm-up" not in table and any("1 finished cell" in m for m in logs)
    assert calls[0] == ("vanilla", 5 * cfg.steps) and len(calls) == 5                   # the start came first
    calls.clear()
    stop[0] = None
    res = experiments.exp_ladder(cfg, out, True, log=logs.append, photos=[photos])   # the rerun keeps it and the start
    assert any("1 cell(s) kept" in m for m in logs) and any("3 run(s) kept" in m for m in logs)
    assert calls[0] == ("da", cfg.steps) and ("vanilla", 5 * cfg.steps) not in calls     # on from the stopped training
    assert len(calls) == 2 * (3 + 4) - 3     # per domain 3 DA, vanilla and oracle at 2 optimisers; 3 runs were kept
    assert list(res["cells"]) == [f"{d} | {r}" for d in ("smooth x1", "natural x white") for r in experiments.LADDER_QUICK]
    for c in res["cells"].values():
        assert c["da_gain_real_db"]["mean"] == pytest.approx(c["da"]["mean"] - c["vanilla"]["mean"])
        assert -1 <= c["diag"]["mean"] <= 1 and len(c["bands"]["da"]) == 4
    base, lr = (res["cells"][f"natural x white | {r}"] for r in ("base", "lr 1e-4, 4x steps"))
    assert base["vanilla"] != lr["vanilla"]                                  # the lr rung has its own vanilla
    assert res["cells"]["natural x white | warm-up 1000"]["vanilla"] == base["vanilla"]   # the others share the base's
    assert experiments.rung_config(cfg, {"lr": 1e-4, "steps_factor": 4}).steps == 4 * cfg.steps
    table = open(os.path.join(out, "ladder.md")).read()
    row = next(line for line in table.splitlines() if line.startswith("| smooth x1 | base |"))
    gain = res["cells"]["smooth x1 | base"]["da_gain_real_db"]["values"]
    assert f"({' / '.join(f'{x:+.2f}' for x in gain)})" in row and row.count(" / ") == 2 * 3 + len(gain) - 1
    assert os.path.getsize(os.path.join(out, "ladder.png")) > 1000 and "4-8 / > 8 px" in table


def test_a_stopped_experiment_exits_130_and_sigterm_stops_it_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    def stopped(cfg, out, quick, **kw):
        raise KeyboardInterrupt
    stopped.size, stopped.quick = {}, experiments.exp_ladder.quick
    monkeypatch.setitem(experiments.EXPERIMENTS, "ladder", stopped)
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert experiments.main(["ladder", "--quick", "--out", str(tmp_path)]) == 130
        assert all(signal.getsignal(sig) is signal.default_int_handler for sig in old)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    assert "ladder: stopped" in capsys.readouterr().err


def test_ladder_runs_the_strongest_rungs_early_and_tables_them_in_order():
    assert sorted(experiments.LADDER_RUNGS, key=experiments.ladder_run_order)[:3] == ["base", "warm-up 4000", "width 64"]
    cell = lambda d, r: {"domain": d, "rung": r}                                          # noqa: E731
    cells = {f"{d} | {r}": cell(d, r) for d, r in [("k", "width 64"), ("k", "base"), ("n", "lr 1e-4, 4x steps"), ("n", "base")]}
    assert list(experiments.ladder_table_order(cells, experiments.LADDER_RUNGS)) == [
        "k | base", "k | width 64", "n | base", "n | lr 1e-4, 4x steps"]


def test_the_device_ladder_trains_its_own_start_and_runs_base_and_warm_up(tmp_path, tiny_data):
    gpu = dm.make_config("gpu", start="scratch")
    assert experiments.ladder_rungs(gpu) == experiments.LADDER_DEVICE
    assert experiments.ladder_rungs(dm.make_config(**experiments.exp_ladder.size)) == experiments.LADDER_RUNGS
    assert experiments.rung_config(gpu, experiments.LADDER_DEVICE["warm-up 4x steps"]).d_warmup == 4 * gpu.steps
    cfg = dm.make_config("tiny", start="scratch", steps=3, eval_every=0, log_every=3)
    logs = []
    c = experiments.ladder_start(cfg, str(tmp_path), lambda: tiny_data, logs.append)
    assert c.start == str(tmp_path / "start.pt") and any("training one (15 steps" in m for m in logs)
    G = dm.init_state(c, torch.device("cpu")).G                                 # the runs continue from it
    blob = dm.read_checkpoint(c.start)
    assert blob["step"] == 15 and all(torch.equal(a, b) for a, b in zip(G.state_dict().values(),
                                                                           blob["restorer_ema"].values()))
    assert experiments.ladder_start(cfg, str(tmp_path), None, logs.append) == c                 # a rerun keeps it
    shipped = dm.make_config(**experiments.exp_ladder.size)
    assert experiments.ladder_start(shipped, str(tmp_path), None, logs.append) is shipped
    # its claims: base and warm-up per domain
    cell = lambda gain, diag, band: {"domain": "k", "da_gain_real_db": {"mean": gain}, "diag": {"mean": diag},  # noqa: E731
                                     "bands": {"da": [0, 0, band, 0]}}
    claims = experiments.ladder_claims({"k | base": cell(-0.5, 0.1, 0.4), "k | warm-up 4x steps": cell(0.2, 0.3, 0.3)})
    assert list(claims.values()) == [True, True, True] and len(claims) == 3
    claims = experiments.ladder_claims({"k | base": cell(-0.5, 0.3, 0.4), "k | warm-up 4x steps": cell(-0.1, 0.2, 0.5)})
    assert list(claims.values()) == [False, False, False]


def test_the_device_script_passes_flags_the_ladder_takes():
    """docs/ladder-device.sh runs only on a GPU: here its two commands' flags are parsed and their configs built."""
    import shlex
    text = open(os.path.join(os.path.dirname(experiments.__file__), "docs", "ladder-device.sh")).read()
    common = shlex.split(text.split("common=(")[1].split(")")[0].replace('"$photos"', "PHOTOS"))
    cmds = [shlex.split(line.split("experiments.py")[1].split('"${common')[0]) for line in text.splitlines()
            if line.startswith("timeout")]
    assert len(cmds) == 2
    for argv, (preset, d_width) in zip(cmds, [("gpu", 64), ("paper", 64)]):
        args = dm.parse_args(experiments.build_parser(), argv + common + ["--out", "x"])
        cfg = dm.parse_config(args)
        assert (args.name, args.preset, args.photos, cfg.d_width, cfg.start) == ("ladder", preset, ["PHOTOS"], d_width, "scratch")
        assert cfg.image_size <= experiments.AXIS_TILE and (cfg.real_noise, cfg.sigma_max) == ("white", 15.0)
        assert experiments.ladder_rungs(cfg) == experiments.LADDER_DEVICE


def test_warm_up_trains_the_denoiser_alone_first(tiny_data):
    cfg = dm.make_config("tiny", steps=2, d_warmup=3, eval_every=0, log_every=1)
    state = dm.init_state(cfg, torch.device("cpu"))
    G0, D0 = ([p.detach().clone() for p in net.parameters()] for net in (state.G, state.D))
    for _ in range(3):
        parts = dm.train_step(state, tiny_data)
        assert parts["alpha"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(G0, state.G.parameters()))          # G frozen in the warm-up
    assert any(not torch.equal(a, b) for a, b in zip(D0, state.D.parameters()))      # eps_theta learns
    dm.train_step(state, tiny_data)
    assert any(not torch.equal(a, b) for a, b in zip(G0, state.G.parameters()))     # then G adapts
    h = dm.train(cfg, tiny_data, log=lambda s: None).history
    assert h["step"][-1] == 5 and h["eval_step"] == [5]                                # warm-up + steps in all
    assert dm.train(dataclasses.replace(cfg, method="vanilla"), tiny_data, log=lambda s: None).history["step"][-1] == 2


def test_ladder_claims_follow_their_rules():
    def cell(dom, rung, diag, gain, band):
        return {"domain": dom, "rung": rung, "diag": {"mean": diag}, "da_gain_real_db": {"mean": gain},
                "bands": {"da": [0.1, 0.3, band, 1.0]}}
    ok = dict(zip(experiments.LADDER_RUNGS, [(0.0, -1.0, 1.0), (0.1, -0.5, 0.9), (0.2, 0.2, 0.8), (0.1, -0.5, 0.9),
                                                (0.2, -0.1, 0.8), (0.0, -1.0, 1.0)]))
    cells = {f"k | {r}": cell("k", r, *v) for r, v in ok.items()}
    assert list(experiments.ladder_claims(cells).values()) == [True, True, True]
    cells["k | warm-up 4000"] = cell("k", "warm-up 4000", 0.05, -0.2, 1.1)            # weaker at the top rung
    assert list(experiments.ladder_claims(cells).values()) == [False, False, False]
    del cells["k | base"]                                           # each claim is judged once its rungs are measured
    assert [k[:2] for k in experiments.ladder_claims(cells)] == ["D2"]
    assert experiments.ladder_claims({"k | base": cell("k", "base", 0.0, -1.0, 1.0)}) == {}


def test_the_published_ladder_agrees_with_its_trainings_and_the_docs():
    """docs/effect/ladder: every cell's numbers are its kept trainings', its claims are recomputed from its cells, and
    the table in docs/effect.md is ladder.md's (with the docs' minus and times signs)."""
    docs = os.path.join(os.path.dirname(experiments.__file__), "docs")
    res = json.load(open(os.path.join(docs, "effect", "ladder", "ladder.json")))
    assert len(res["cells"]) == 2 * len(experiments.LADDER_RUNGS) and res["seeds"] == [0, 1, 2]
    checked = 0
    for key, c in res["cells"].items():
        dom, rung = key.split(" | ")
        opt = rung if "lr" in c["overrides"] else "base"                 # vanilla and oracle: the base's or the lr rung's
        for m, name in (("vanilla", opt), ("oracle", opt), ("da", rung)):
            for seed, value in zip(res["seeds"], c[m]["values"]):
                run = res["runs"].get(f"{dom} | {name} | {m} | seed {seed}")   # the first two Kodak24 DA cells predate
                if run is not None:                                             # the record of single trainings
                    assert run["real_psnr_tiles"] == value
                    checked += 1
            assert c[m]["mean"] == pytest.approx(sum(c[m]["values"]) / 3)
        assert c["da_gain_real_db"]["values"] == pytest.approx([d - v for v, d in zip(c["vanilla"]["values"],
                                                                                      c["da"]["values"])])
    assert checked >= 100 and experiments.ladder_claims(res["cells"]) == res["claims"]
    rows = [r.replace(" x1 |", " ×1 |").replace("natural x white", "natural × white")
            for r in open(os.path.join(docs, "effect", "ladder", "ladder.md")).read().splitlines() if r.startswith("| ")]
    page = open(os.path.join(docs, "effect.md")).read().replace("−", "-")
    assert len(rows) == 13 and all(r.replace("−", "-") in page for r in rows)
