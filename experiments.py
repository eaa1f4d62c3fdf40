"""The experiments behind the README's evidence: the paper's tables and figures in miniature, one command
each. They import dada_min (the method) and never the other way round.

    python experiments.py compare      # Tables 1-3: vanilla, DANN, pixel DA, DA, oracle
    python experiments.py ablation     # Table 4: CS / RS / noised image / conditions / t range
    python experiments.py condition    # Fig. 1a: noise-prediction error against the condition's noise
    python experiments.py shortcut     # Fig. 2: joint training with and without the two tricks
    python experiments.py effect       # when does DA close the vanilla -> oracle gap? (docs/effect.md)
    python experiments.py worlds [--photos DIR]   # statistics of the built-in clean worlds (vs photographs)
    python experiments.py phone_world  # the phone world's selection by statistics (docs/effect.md)
    python experiments.py world_effect # vanilla / DA / oracle on each of those worlds, 3 seeds (docs/effect.md)
    python experiments.py regime_map   # helps / idles / destroys per world and domain, 3 seeds (docs/effect.md)
    python experiments.py axis --photos DIR [--photos DIR ...]   # DA - vanilla against clean hf, photos and worlds
    python experiments.py ladder [--photos DIR]   # is the smoothing push a weak denoiser's? (docs/effect.md)
    python experiments.py NAME --quick # a seconds-long run (what the tests use); --field value as dada_min.py
    python experiments.py --make-start # retrain the shipped converged starts data/start-*.pt

Each writes runs/NAME/NAME.json and PNG figures (--out DIR elsewhere) and prints a table and its runtime.
docs/evidence.md reports what they measured.
"""
import contextlib
import dataclasses
import importlib
import json
import math
import os
import signal
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

import baselines  # noqa: F401  (registers the methods "dann" and "pixel_da" used by compare)
import dada_min as dm
import folders
from folders import box5, clean_stats, luma, spectrum_slope  # noqa: F401  (the image statistics live there)


# ----------------------------------------------------------------------------------------------------------
# The registry: one command per experiment
# ----------------------------------------------------------------------------------------------------------
# name -> function(cfg, out, quick) -> results dict; each writes out/NAME.json and at least one PNG
EXPERIMENTS = {}


def experiment(fn=None, *, size=None, quick=None):
    """Register fn as `python experiments.py NAME` (NAME = fn's name without 'exp_').
    size:  config fields its default run changes from the cpu-demo preset so that it finishes in <= 10 min
           on 2 CPU cores (used only with the cpu-demo preset; --field flags still win)
    quick: config fields its --quick run changes from the tiny preset (seconds; used by the tests)
    Use as @experiment or @experiment(size=..., quick=...)."""
    def register(f):
        f.size, f.quick = dict(size or {}), dict(quick or {})
        EXPERIMENTS[f.__name__.removeprefix("exp_")] = f
        return f
    return register(fn) if fn is not None else register


# ----------------------------------------------------------------------------------------------------------
# Shared helpers: seeds, mean +- std, tables, figures
# ----------------------------------------------------------------------------------------------------------
# Every experiment trains with fixed seeds cfg.seed + i (a new seed also means new built-in data), reports
# mean and sample standard deviation over the seeds, writes out/NAME.json and PNG figures, and prints a
# table and its runtime (wall clock and CPU seconds of this process).
def begin(cfg, out):
    """The start of every experiment: its clocks (wall, CPU seconds), its output folder, its device."""
    os.makedirs(out, exist_ok=True)
    return time.time(), time.process_time(), dm.pick_device(cfg.device)


def exp_seeds(cfg, quick, n=3):
    """The seeds an experiment averages over: n of them, or 1 with --quick."""
    return [cfg.seed + i for i in range(1 if quick else n)]


def mean_std(values):
    """{"mean", "std" (sample std; None for a single value), "values"} of a list of floats."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None,
            "values": [float(v) for v in a]}


def fmt(ms, digits=2):
    """'mean ± std' of a mean_std dict ('± n/a' for a single seed)."""
    std = "n/a" if ms["std"] is None else f"{ms['std']:.{digits}f}"
    return f"{ms['mean']:.{digits}f} ± {std}"


def summarize(runs, base=None):
    """Per-seed metric dicts -> mean_std per metric; with `base` (the same seeds' vanilla runs) also the
    paired per-seed gain in real-like PSNR, whose spread is smaller than that of the PSNR itself."""
    keys = ("syn_psnr", "syn_ssim", "real_psnr", "real_ssim")
    s = {k: mean_std([r[k] for r in runs]) for k in keys}
    if base is not None:
        s["real_gain_db"] = mean_std([r["real_psnr"] - b["real_psnr"] for r, b in zip(runs, base)])
    return s


def seed_log(log, seed):
    # experiments train many models in one process: prefix each line with its seed (and row) to tell them apart
    return lambda msg: log(f"  seed {seed} {msg}")


def finish(name, out, results, t0, c0, log):
    """Stamp the runtime, write out/NAME.json atomically and print the runtime."""
    results["wall_seconds"], results["cpu_seconds"] = time.time() - t0, time.process_time() - c0
    dm.atomic_write_text(os.path.join(out, f"{name}.json"), json.dumps(results, indent=1))
    log(f"\nwrote {out}/{name}.json; runtime {results['wall_seconds']:.0f} s wall, "
        f"{results['cpu_seconds']:.0f} s CPU ({torch.get_num_threads()} threads)")
    return results


def kept_cells(path, results, log, per_cell=(), key="cells"):
    """The cells (or another entry: key) of an earlier run's JSON at `path` when it ran the same settings and seeds, so
    that a rerun (or a run stopped half-way) trains only what is missing. Config fields that each cell sets itself
    (per_cell) do not count; nor do fields the code gained (at their defaults) or lost since, which keep the behaviour
    of that run."""
    if not os.path.isfile(path):
        return {}
    old, now = json.load(open(path)), json.loads(json.dumps(results["config"]))
    defaults = json.loads(json.dumps(dataclasses.asdict(dm.Config())))
    same = lambda a, b: {k: v for k, v in a.items() if k in b and k not in per_cell}    # noqa: E731
    if (same(old.get("config", {}), now), old.get("seeds")) != (same(now, old.get("config", {})), results["seeds"]) or \
            any(now[k] != defaults[k] for k in set(now) - set(old.get("config", {}))):
        return {}
    log(f"[{results['experiment']}] {len(old.get(key, {}))} {key[:-1]}(s) kept from {path}")
    return old.get(key, {})


def report(name, out, results, table, figure, t0, c0, log):
    """The end of a map-like experiment: its table to out/NAME.md and to the log, its figure out/NAME.png, its claims
    (pre-registered hypotheses, each holds or FAILS), then finish()."""
    dm.atomic_write_text(os.path.join(out, f"{name}.md"), table + "\n")
    figure(os.path.join(out, f"{name}.png"), results)
    log("\n" + table + "\n")
    for claim, ok in results["claims"].items():
        log(f"  {'holds ' if ok else 'FAILS '} {claim}")
    return finish(name, out, results, t0, c0, log)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """Lay out, write and close a figure (every PNG of the experiments goes through here)."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def bar_figure(path, labels, groups, ylabel, title, hline=None):
    """Grouped bars with error bars. groups: {group name: [mean_std per label]}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 3.6))
    width = 0.8 / len(groups)
    for i, (g, vals) in enumerate(groups.items()):
        xs = np.arange(len(labels)) + (i - (len(groups) - 1) / 2) * width
        ax.bar(xs, [v["mean"] for v in vals], width, yerr=[v["std"] or 0 for v in vals], capsize=3, label=g)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=1, label="real-like input (no restoration)")
    lo = min(v["mean"] - (v["std"] or 0) for vals in groups.values() for v in vals)
    ax.set_ylim(min(lo, hline if hline is not None else lo) - 1, None)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel), ax.set_title(title, fontsize=9), ax.legend(fontsize=7)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# Tables 1-4, Fig. 1a and Fig. 2
# ----------------------------------------------------------------------------------------------------------
@experiment(size=dict(steps=500, batch_size=8, eval_every=0, log_every=250),
            quick=dict(steps=8, eval_every=0, log_every=8))
def exp_compare(cfg, out, quick, log=print):
    """Tables 1-3 in miniature: vanilla, feature-space DA (DANN), pixel-space DA, DA (ours) and the
    oracle on cfg.task's built-in real-like domain (cfg.real_noise); one task per call (--task NAME).
    All share G, the data, the Adam optimiser, the step budget and the alpha ramp. Writes
    out/compare.json, out/compare.png (PSNR per method) and out/compare_samples.png (restorations of
    real-like test images, first seed)."""
    t0, c0, device = begin(cfg, out)
    methods = ("vanilla", "dann", "pixel_da", "da", "oracle")
    runs, ident, models = {m: [] for m in methods}, [], {}
    seeds = exp_seeds(cfg, quick)
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed)
        data = dm.make_data(c, device)
        ident.append(dm.identity_metrics(data))
        for m in methods:
            state = dm.train(dataclasses.replace(c, method=m), data, log=seed_log(log, seed))
            runs[m].append(dm.evaluate_pools(state.G_eval, data))
            if seed == seeds[0]:
                models[m], sample_data = state.G_eval, data
    summary = {m: summarize(runs[m], runs["vanilla"]) for m in methods}
    real = {m: summary[m]["real_psnr"]["mean"] for m in methods}
    results = {"experiment": "compare", "task": cfg.task, "real_noise": cfg.real_noise, "seeds": seeds,
               "config": dataclasses.asdict(cfg), "identity": summarize(ident), "methods": summary,
               # the paper's qualitative claims (Table 1), checked on the mean real-like PSNR
               "claims": {"da_beats_vanilla": real["da"] > real["vanilla"],
                          "da_beats_dann": real["da"] > real["dann"],
                          "da_beats_pixel_da": real["da"] > real["pixel_da"],
                          "dann_beats_vanilla": real["dann"] > real["vanilla"],
                          "pixel_da_beats_vanilla": real["pixel_da"] > real["vanilla"]}}
    lines = [f"compare ({cfg.task}, real-like domain {cfg.real_noise}; mean ± std over seeds {seeds})",
             f"{'method':10s} {'syn PSNR':>14s} {'real PSNR':>14s} {'real SSIM':>16s} {'real gain (dB)':>15s}",
             f"{'input':10s} {fmt(results['identity']['syn_psnr']):>14s} {fmt(results['identity']['real_psnr']):>14s}"
             f" {fmt(results['identity']['real_ssim'], 4):>16s}"]
    for m in methods:
        s = summary[m]
        lines.append(f"{m:10s} {fmt(s['syn_psnr']):>14s} {fmt(s['real_psnr']):>14s} {fmt(s['real_ssim'], 4):>16s}"
                     f" {fmt(s['real_gain_db']):>15s}")
    log("\n" + "\n".join(lines))
    bar_figure(os.path.join(out, "compare.png"), list(methods),
               {"synthetic test": [summary[m]["syn_psnr"] for m in methods],
                "real-like test": [summary[m]["real_psnr"] for m in methods]},
               "PSNR (dB)", f"{cfg.task}: mean ± std over {len(seeds)} seed(s)",
               hline=results["identity"]["real_psnr"]["mean"])
    dm.save_comparison_figure(os.path.join(out, "compare_samples.png"), sample_data, models)
    return finish("compare", out, results, t0, c0, log)


# Table 4's rows: (label, method, t range or None for cfg's, in the paper's table?)
ABLATION_ROWS = [
    ("(a) vanilla", "vanilla", None),
    ("(b) t in [1,100]", "naive", (1, 100)),
    ("(c) t in [900,999]", "naive", (900, 999)),   # the paper's [900,1000]: t = 1000 has no alphas_cumprod[t]
    ("(d) full t", "naive", None),
    ("(e) + CS", "no_contrast", None),
    ("(f) + CS + RS (ours)", "da", None),
    ("only syn", "only_syn", None),
    ("only real", "only_real", None),
]


@experiment(size=dict(steps=300, batch_size=8, eval_every=0, log_every=150),
            quick=dict(steps=6, eval_every=0, log_every=6))
def exp_ablation(cfg, out, quick, log=print):
    """Table 4 in miniature: the noise-sampling range of t, channel shuffle (CS), residual-swapping
    contrastive learning (RS), and only-synthetic / only-real conditions (our reading of those two
    rows: see METHODS). Writes out/ablation.json and out/ablation.png."""
    t0, c0, device = begin(cfg, out)
    # 8 trainings per seed: two seeds take 409 s on an idle 2-core CPU, three would take about 610 s
    seeds = exp_seeds(cfg, quick, n=2)
    runs = {label: [] for label, _, _ in ABLATION_ROWS}
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed)
        data = dm.make_data(c, device)
        for label, method, t_range in ABLATION_ROWS:
            t_min, t_max = t_range or (c.t_min, c.t_max)
            state = dm.train(dataclasses.replace(c, method=method, t_min=t_min, t_max=t_max), data,
                          log=seed_log(log, f"{seed} {label}"))
            runs[label].append(dm.evaluate_pools(state.G_eval, data))
    base = runs[ABLATION_ROWS[0][0]]
    rows = []
    for label, method, t_range in ABLATION_ROWS:
        uses_dif, cs, rs, _, conds = dm.METHODS[method]
        rows.append({"label": label, "method": method, "t_range": list(t_range or (cfg.t_min, cfg.t_max)),
                     "diffusion": uses_dif, "cs": cs, "rs": rs, "conditions": conds,
                     **summarize(runs[label], base)})
    real = {r["label"][:3]: r["real_psnr"]["mean"] for r in rows}
    named = {r["method"]: r["real_psnr"]["mean"] for r in rows if r["t_range"] == [cfg.t_min, cfg.t_max]}
    results = {"experiment": "ablation", "task": cfg.task, "real_noise": cfg.real_noise, "seeds": seeds,
               "config": dataclasses.asdict(cfg), "rows": rows,
               # the paper's qualitative claims (Table 4), checked on the mean real-like PSNR
               "claims": {"b_below_vanilla": real["(b)"] < real["(a)"],
                          "c_below_d": real["(c)"] < real["(d)"],
                          "d_beats_vanilla": real["(d)"] > real["(a)"],
                          "cs_helps_e_beats_d": real["(e)"] > real["(d)"],
                          "rs_helps_f_beats_e": real["(f)"] > real["(e)"],
                          "only_syn_below_f": named["only_syn"] < named["da"],
                          "only_real_below_f": named["only_real"] < named["da"]}}
    lines = [f"ablation ({cfg.task}, {cfg.real_noise}; mean ± std over seeds {seeds})",
             f"{'row':22s} {'syn PSNR':>14s} {'real PSNR':>14s} {'real SSIM':>16s} {'gain vs (a)':>14s}"]
    for r in rows:
        lines.append(f"{r['label']:22s} {fmt(r['syn_psnr']):>14s} {fmt(r['real_psnr']):>14s} "
                     f"{fmt(r['real_ssim'], 4):>16s} {fmt(r['real_gain_db']):>14s}")
    log("\n" + "\n".join(lines))
    bar_figure(os.path.join(out, "ablation.png"), [r["label"] for r in rows],
               {"real-like test": [r["real_psnr"] for r in rows]}, "PSNR (dB)",
               f"Table 4 in miniature ({cfg.task}): mean ± std over {len(seeds)} seed(s)")
    return finish("ablation", out, results, t0, c0, log)


SIGMAS = tuple(range(0, 81, 10))                   # Fig. 1a: AWGN level of the condition, in /255 units


@torch.no_grad()
def condition_errors(D, schedule, y, cfg, draws=8, seed=1234):
    """Fig. 1a's measurement: the mean noise-prediction error MSE(eps, eps_theta(cat[y_t, c], gamma)) for a
    condition c = y + sigma/255 * z at each sigma in SIGMAS. y: (N, 3, p, p) clean test images. The same
    `draws` fixed draws of (gamma, eps, z) are used at every sigma, so only the condition's quality changes."""
    torch.manual_seed(seed)
    errs = torch.zeros(len(SIGMAS))
    for _ in range(draws):
        gamma = schedule.sample_gamma(y.shape[0], cfg.t_min, cfg.t_max)             # (N,)
        eps, z = torch.randn_like(y), torch.randn_like(y)
        y_t = schedule.q_sample(y, gamma, eps)
        for i, sigma in enumerate(SIGMAS):
            eps_hat = D(torch.cat([y_t, y + sigma / 255 * z], 1), gamma).float()    # input (N, 6, p, p)
            errs[i] += F.mse_loss(eps_hat, eps).item() / draws
    return errs.tolist()


@experiment(size=dict(steps=1000, eval_every=0, log_every=250),
            quick=dict(steps=10, eval_every=0, log_every=5))
def exp_condition(cfg, out, quick, log=print):
    """Fig. 1a in miniature: does the noise-prediction error grow as the condition gets worse?
    Protocol (the paper gives only the caption of Fig. 1a, Appendix A1.1): a ConditionalDenoiser with in_ch=6 takes
    cat[y_t, c], where y_t is the noised clean image and c the SAME clean image plus AWGN of level sigma.
    It is trained alone (no restorer) for cfg.steps Adam steps on clean synthetic crops, with sigma drawn
    per sample from U[0, 80]/255 so every tested condition level is in distribution, and t from the full
    range [cfg.t_min, cfg.t_max]. Then the error on the clean synthetic test images is measured at
    sigma = 0, 10, ..., 80 with fixed (gamma, eps, condition-noise) draws. Writes out/condition.json and
    out/condition.png."""
    t0, c0, device = begin(cfg, out)
    seeds = exp_seeds(cfg, quick)
    per_seed = []
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed)
        data = dm.make_data(c, device)
        torch.manual_seed(seed)
        # NOTE(simplification): one condition slot (in_ch=6) instead of the method's two; Fig. 1a is about
        # how the error depends on ONE condition's quality.
        D = dm.ConditionalDenoiser(c.d_width, tuple(c.d_mults), c.d_res_blocks, c.d_attn, c.d_dropout, in_ch=6)
        D = D.to(device)
        schedule = dm.NoiseSchedule(c.T, c.beta_start, c.beta_end).to(device)
        opt = torch.optim.Adam(D.parameters(), lr=c.lr)
        for step in range(c.steps):
            y = dm.random_crops(data.syn_clean, c.batch_size, c.patch_size)              # (B, 3, p, p)
            sigma = torch.rand(y.shape[0], 1, 1, 1, device=device) * 80 / 255        # per-sample condition level
            cond = y + sigma * torch.randn_like(y)
            gamma = schedule.sample_gamma(y.shape[0], c.t_min, c.t_max)
            eps = torch.randn_like(y)
            eps_hat = D(torch.cat([schedule.q_sample(y, gamma, eps), cond], 1), gamma).float()
            loss = F.mse_loss(eps_hat, eps)                                           # Eq. (1) with one condition
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % c.log_every == 0 or step + 1 == c.steps:
                log(f"  seed {seed} [condition] step {step + 1}/{c.steps} mse {loss.item():.4g}")
        D.eval()
        p = c.patch_size
        per_seed.append(condition_errors(D, schedule, data.test_syn_clean[..., :p, :p], c))
    errs = [mean_std([e[i] for e in per_seed]) for i in range(len(SIGMAS))]
    means = [e["mean"] for e in errs]
    results = {"experiment": "condition", "seeds": seeds, "config": dataclasses.asdict(cfg),
               "sigmas": list(SIGMAS), "error": errs,
               "ratio_80_to_0": means[-1] / means[0],
               # Fig. 1a's claim: the error rises monotonically with the condition's noise level
               "claims": {"monotone_increasing": all(b > a for a, b in zip(means, means[1:])),
                          "monotone_in_every_seed": all(all(b > a for a, b in zip(e, e[1:])) for e in per_seed),
                          "error_at_80_above_0": means[-1] > means[0]}}
    scale = 10 ** math.floor(math.log10(max(means)))
    lines = [f"condition (Fig. 1a): noise-prediction error vs the condition's AWGN level, seeds {seeds}",
             "sigma  " + " ".join(f"{s:>11d}" for s in SIGMAS),
             f"x{scale:.0e}  " + " ".join(f"{e['mean'] / scale:>5.2f}±{(e['std'] or 0) / scale:<5.2f}" for e in errs),
             f"error at sigma 80 / error at sigma 0 = {results['ratio_80_to_0']:.2f} (paper, read off Fig. 1a: ~1.32)"]
    log("\n" + "\n".join(lines))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.bar([str(s) for s in SIGMAS], [m / scale for m in means], yerr=[(e["std"] or 0) / scale for e in errs],
           capsize=3, color="tab:blue")
    ax.set_xlabel("AWGN level sigma of the condition (/255)")
    ax.set_ylabel(f"noise-prediction error (x{scale:.0e})")
    ax.set_title(f"Fig. 1a in miniature: mean ± std over {len(seeds)} seed(s)", fontsize=9)
    save_figure(fig, os.path.join(out, "condition.png"))
    return finish("condition", out, results, t0, c0, log)


@experiment(size=dict(steps=800, batch_size=8, eval_every=80, log_every=400),
            quick=dict(steps=8, eval_every=2, log_every=8))
def exp_shortcut(cfg, out, quick, log=print):
    """Fig. 2 in miniature: synthetic and real-like PSNR over training for naive joint training (no CS,
    no RS) and for DA (both tricks), with restorations of one synthetic and one real-like test image at
    several steps. The paper's shortcut signature is a real-like curve that rises, peaks and falls while
    the synthetic one keeps rising. Writes out/shortcut.json, out/shortcut.png (curves) and
    out/shortcut_samples.png (images, first seed)."""
    t0, c0, device = begin(cfg, out)
    # Two seeds: 370 s on an idle 2-core CPU; a third would take about 555 s, too close to the 10-minute
    # budget. Longer curves (--steps 3000 --eval_every 300) are the better use of extra time: stage III, if
    # it comes, comes late (it had not come by step 3000 here).
    seeds = exp_seeds(cfg, quick, n=2)
    methods = ("naive", "da")
    curves, samples = {m: [] for m in methods}, {m: [] for m in methods}
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed)
        data = dm.make_data(c, device)
        x_show = torch.cat([data.test_syn_noisy[:1], data.test_real_noisy[:1]])       # (2, 3, H, W)
        for m in methods:
            keep = samples[m] if seed == seeds[0] else None

            def on_eval(state, keep=keep):                                            # restorations at this step
                if keep is not None:
                    keep.append((state.step, dm.restore(state.G_eval.eval(), x_show).cpu()))
            state = dm.train(dataclasses.replace(c, method=m), data, log=seed_log(log, seed), on_eval=on_eval)
            h = state.history
            curves[m].append({"step": h["eval_step"], "syn_psnr": h["syn_psnr"], "real_psnr": h["real_psnr"]})
        if seed == seeds[0]:
            shown = (data.test_syn_clean[:1], data.test_real_clean[:1], x_show)
    steps = curves[methods[0]][0]["step"]
    summary = {}
    for m in methods:
        real = np.array([cv["real_psnr"] for cv in curves[m]])                        # (seeds, evals)
        syn = np.array([cv["syn_psnr"] for cv in curves[m]])
        summary[m] = {"syn_psnr": [mean_std(col) for col in syn.T], "real_psnr": [mean_std(col) for col in real.T],
                      # the shortcut signature per seed: how far the real-like PSNR fell after its peak
                      "real_peak_step": mean_std([steps[i] for i in real.argmax(1)]),
                      "real_drop_from_peak_db": mean_std(real.max(1) - real[:, -1]),
                      "syn_drop_from_peak_db": mean_std(syn.max(1) - syn[:, -1]),
                      "final_real_psnr": mean_std(real[:, -1]), "final_syn_psnr": mean_std(syn[:, -1])}
    results = {"experiment": "shortcut", "task": cfg.task, "real_noise": cfg.real_noise, "seeds": seeds,
               "config": dataclasses.asdict(cfg), "steps": steps, "methods": summary, "per_seed": curves,
               # Fig. 2's claims: naive training's real-like PSNR falls after a peak (> 0.1 dB, mean over
               # seeds) while DA's does not fall as much, and DA ends higher on real-like data
               "claims": {"naive_real_falls_after_peak": summary["naive"]["real_drop_from_peak_db"]["mean"] > 0.1,
                          "da_falls_less_than_naive": summary["da"]["real_drop_from_peak_db"]["mean"]
                          < summary["naive"]["real_drop_from_peak_db"]["mean"],
                          "da_ends_higher_on_real": summary["da"]["final_real_psnr"]["mean"]
                          > summary["naive"]["final_real_psnr"]["mean"]}}
    lines = [f"shortcut (Fig. 2; {cfg.task}, {cfg.real_noise}; mean over seeds {seeds})",
             f"{'step':>6s} " + " ".join(f"{m + ' syn':>10s} {m + ' real':>10s}" for m in methods)]
    for i, st in enumerate(steps):
        lines.append(f"{st:6d} " + " ".join(f"{summary[m]['syn_psnr'][i]['mean']:10.2f} "
                                            f"{summary[m]['real_psnr'][i]['mean']:10.2f}" for m in methods))
    for m in methods:
        lines.append(f"{m}: real-like PSNR peak at step {fmt(summary[m]['real_peak_step'], 0)}, "
                     f"drop from peak to end {fmt(summary[m]['real_drop_from_peak_db'])} dB")
    log("\n" + "\n".join(lines))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in zip(axes, ("syn_psnr", "real_psnr"), ("synthetic test", "real-like test")):
        for m in methods:
            mu = np.array([v["mean"] for v in summary[m][key]])
            sd = np.array([v["std"] or 0 for v in summary[m][key]])
            ax.plot(steps, mu, marker="o", ms=3, label="naive joint training" if m == "naive" else "DA (CS + RS)")
            ax.fill_between(steps, mu - sd, mu + sd, alpha=0.2)
        ax.set_xlabel("training step"), ax.set_ylabel("PSNR (dB)"), ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Fig. 2 in miniature: mean ± std over {len(seeds)} seed(s)", fontsize=9)
    save_figure(fig, os.path.join(out, "shortcut.png"))
    # images: rows (method x domain), columns: input, up to 5 evaluation steps, ground truth
    y_syn, y_real, x_show = shown
    idx = np.unique(np.linspace(0, len(samples[methods[0]]) - 1, min(5, len(samples[methods[0]]))).round().astype(int))
    fig, axes = plt.subplots(4, len(idx) + 2, figsize=(1.9 * (len(idx) + 2), 8), squeeze=False)
    for r, (m, d) in enumerate([(m, d) for m in methods for d in (0, 1)]):
        gt = (y_syn, y_real)[d]
        cols = [("input", x_show[d:d + 1].cpu())] + [(f"step {samples[m][i][0]}", samples[m][i][1][d:d + 1])
                                                     for i in idx] + [("ground truth", gt.cpu())]
        for j, (title, img) in enumerate(cols):
            ax = axes[r, j]
            dm.show_image(ax, img[0], ref=None if title == "ground truth" else gt[0],
                       title=title if r == 0 else None, fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{m}, {('synthetic', 'real-like')[d]}", fontsize=8)
    save_figure(fig, os.path.join(out, "shortcut_samples.png"))
    return finish("shortcut", out, results, t0, c0, log)


# ----------------------------------------------------------------------------------------------------------
# Does DA help at this scale, and when? (docs/effect.md)
# ----------------------------------------------------------------------------------------------------------
NOISE_LEVELS = (0.95, 0.7, 0.3, 0.05)   # gamma = alphas_cumprod values at which the diagnostic is read


GAP_LEVELS = (0.99999, 0.9999, 0.999, 0.99, 0.95, 0.7, 0.3, 0.05)   # ... and the RS gap (t from ~1 to ~900)


VAL_SEED = 100                          # the validation pool: seed 100's built-in data, used by no reported run


def hf_ratio(x, clean):
    """Energy of the high frequencies, x - box5(x), of images x relative to that of their clean targets:
    1 is as sharp as clean, > 1 leaves noise behind, < 1 is smoother than clean. (B, C, H, W) -> float."""
    return (((x - box5(x)) ** 2).mean() / ((clean - box5(clean)) ** 2).mean()).item()


def band_errors(restored, noisy, clean, levels=3):
    """Where the error of restored images sits, scale by scale: the energy of restored - clean in each octave band
    (a Haar-like pyramid: 1-2 px, 2-4 px, 4-8 px, ..., then the rest) over the energy of the input's noise,
    noisy - clean, in the same band. 1: as bad as the input there; 0: clean; above 1: detail lost or artefacts.
    Unlike hf_ratio (the 1-2 px band of the output alone), it sees correlated residual noise at coarser scales; inside
    one band it cannot tell residual noise from lost detail. (B, C, H, W) -> list of floats."""
    def bands(x):
        out = []
        for _ in range(levels):
            low = F.avg_pool2d(x, 2)                                                # (B, C, H/2, W/2)
            out.append(x - F.interpolate(low, scale_factor=2, mode="nearest"))      # the octave lost by pooling
            x = low
        return out + [x]
    h, w = (restored.shape[-2] >> levels) << levels, (restored.shape[-1] >> levels) << levels   # whole octaves
    err, noise = bands((restored - clean)[..., :h, :w]), bands((noisy - clean)[..., :h, :w])
    return [float((e ** 2).mean() / (n ** 2).mean().clamp(min=1e-12)) for e, n in zip(err, noise)]


def scored(G, data):
    """A run's test numbers: PSNR/SSIM on both test sets, and for the real-like outputs the HF ratio (sharper or
    smoother than clean at 1-2 px) and the octave-band errors (where the error sits)."""
    y = dm.restore(G.eval(), data.test_real_noisy)
    return {**dm.evaluate_pools(G, data), "real_hf": hf_ratio(y, data.test_real_clean),
            "real_bands": band_errors(y, data.test_real_noisy, data.test_real_clean)}


def shrink_hf(x, lam):
    """The training-free shrinkage test: damp the high frequencies of x by a factor (1 - lam). If this
    raises the PSNR of a restorer's real outputs, they carry high-frequency residue that a smoothing push
    (what the diffusion loss does at small scale) can remove."""
    return x - lam * (x - box5(x))


def diagnostic_draws(state, data, draws=64, n_real=16):
    """The mechanism diagnostic (mechanism_diagnostic) averaged over `draws` draws of (synthetic partner,
    eps, gamma) for each of n_real fixed real-like test crops, so its sign is not sampling noise."""
    c = dataclasses.replace(state.cfg, batch_size=n_real)
    x_real, y_real = dm.real_pairs_batch(data, c)                                       # (n_real, 3, p, p) each
    return float(np.mean([dm.mechanism_diagnostic(state, *dm.syn_batch(data, c), x_real, y_real, draws=1)
                          for _ in range(draws)]))


@torch.no_grad()
def contrast_gap_by_gamma(state, data, draws=16):
    """The per-noise-level view of the RS term: at each gamma in GAP_LEVELS, the mean over samples (and
    `draws` draws) of the per-sample noise-MSE gap MSE(eps, eps_neg) - MSE(eps, eps_pos), and the same gap
    in image units, times (1 - gamma) / gamma (the scale of a per-sample hinge on x0 errors). A batch-mean hinge
    of margin m is inactive whenever the batch's mean noise gap exceeds m."""
    cfg, G, D, sched = state.cfg, state.G, state.D, state.schedule
    was_training = D.training
    D.eval()
    out = {}
    for g in GAP_LEVELS:
        gaps = []
        for _ in range(draws):
            x_syn, y_syn = dm.syn_batch(data, cfg)
            x_real = dm.real_batch(data, cfg)
            r_syn, r_real = G(torch.cat([x_syn, x_real])).float().chunk(2)
            gamma = torch.full((x_syn.shape[0],), g, device=x_syn.device)
            eps = torch.randn_like(y_syn)
            y_t = sched.q_sample(y_syn, gamma, eps)
            pos = D(torch.cat([y_t, *dm.channel_shuffle(x_syn + r_syn, x_real + r_real)[:2]], 1), gamma).float()
            neg = D(torch.cat([y_t, *dm.channel_shuffle(*dm.residual_swap(x_syn, r_syn, x_real, r_real))[:2]], 1),
                    gamma).float()
            gaps.append((((neg - eps) ** 2) - ((pos - eps) ** 2)).flatten(1).mean(1))  # (B,)
        gap = torch.cat(gaps).mean().item()
        out[str(g)] = {"noise_gap": gap, "x0_gap": gap * (1 - g) / g}
    D.train(was_training)
    return out


# The rows of `python experiments.py effect`: label -> config overrides. (Until the opt-in RS hinges were removed, a
# "da_live" row also trained DA with a hinge chosen on a validation pool; docs/effect.md keeps what it measured.)
EFFECT_ROWS = {"vanilla": dict(method="vanilla"), "da": dict(method="da"), "no_contrast": dict(method="no_contrast"),
               "only_real": dict(method="only_real"), "oracle": dict(method="oracle")}


def run_variant(cfg, data, draws=64, log=lambda s: None):
    """Train one row of the effect table and measure it: test metrics, HF ratio of the real-like outputs,
    the hinge-active fraction over training, the diagnostic over `draws` draws and the per-level RS gap."""
    state = dm.train(cfg, data, log=log)
    m = scored(state.G_eval, data)
    h = state.history
    m["curve"] = {"step": h["eval_step"], "real_psnr": h["real_psnr"], "syn_psnr": h["syn_psnr"],
                  "hinge_active_frac": h["hinge_active_frac"], "neg_pos_gap": h["neg_pos_gap"]}
    contrast = dm.METHODS[cfg.method][2]
    m["hinge_active_frac"] = float(np.mean(h["hinge_active_frac"])) if contrast else None
    if dm.METHODS[cfg.method][0]:
        m["diag"] = diagnostic_draws(state, data, draws)
    if contrast:
        m["gap_by_gamma"] = contrast_gap_by_gamma(state, data, max(1, draws // 16))
    return m


@experiment(size=dict(steps=600, eval_every=100, log_every=300),
            quick=dict(steps=6, eval_every=3, log_every=6))
def exp_effect(cfg, out, quick, log=print, domains=None):
    """Does noise-space adaptation help at this scale, and when? For each built-in denoising domain (white:
    the paper's failure mode, camera: the counter-case) and seed, all rows continue from the same start (the
    shipped converged restorer where one fits) for the same steps: EFFECT_ROWS. Before any training, the
    shrinkage test on the start predicts the sign. Writes out/effect.json and out/effect.png.
    domains: a subset of the built-in domains (default: all; a subset serves to split the run over processes)."""
    t0, c0, device = begin(cfg, out)
    seeds = exp_seeds(cfg, quick)
    variants = EFFECT_ROWS
    res = {"experiment": "effect", "seeds": seeds, "config": dataclasses.asdict(cfg), "domains": {}}
    for domain in domains or dm.TASKS["denoise"]["real"]:
        runs, pred = {v: [] for v in variants}, []
        for seed in seeds:
            c = dataclasses.replace(cfg, seed=seed, real_noise=domain, sigma_max=None, start="auto").validate()
            if not quick and c.start == "scratch":
                raise FileNotFoundError(f"no shipped start for world {c.world}, sigma_max {c.sigma_max:g}: run "
                                        f"`python experiments.py --make-start --world {c.world}`")
            data = dm.make_data(c, device)
            G0 = dm.init_state(c, device).G_eval.eval()                                 # the start every row shares
            y0 = dm.restore(G0, data.test_real_noisy)
            s0 = dm.evaluate_pools(G0, data)                                        # scores of 8-bit outputs
            p0 = s0["real_psnr"]
            pred.append({"start_real_psnr": p0, "start_syn_psnr": s0["syn_psnr"],
                         "start_real_hf": hf_ratio(y0, data.test_real_clean),
                         **{f"shrink_{lam}": dm.psnr(dm.quantize_8bit(shrink_hf(y0, lam)), data.test_real_clean).mean().item() - p0
                            for lam in (0.1, 0.3)}})
            for v, over in variants.items():
                m = run_variant(dataclasses.replace(c, **over), data, draws=2 if quick else 64)
                runs[v].append(m)
                log(f"[effect] {domain} seed {seed} {v:12s} syn {m['syn_psnr']:.2f} real {m['real_psnr']:.2f} "
                    f"HF {m['real_hf']:.2f}" + (f" diag {m['diag']:+.3f}" if "diag" in m else "")
                    + (f" hinge active {m['hinge_active_frac']:.0%}" if m["hinge_active_frac"] is not None else "")
                    + f"  ({time.time() - t0:.0f} s)")
        van, ora = runs["vanilla"], runs["oracle"]
        summary = {}
        for v, rs in runs.items():
            row = {k: mean_std([r[k] for r in rs]) for k in ("real_psnr", "syn_psnr", "real_hf")}
            row["real_gain_db"] = mean_std([r["real_psnr"] - a["real_psnr"] for r, a in zip(rs, van)])
            row["syn_change_db"] = mean_std([r["syn_psnr"] - a["syn_psnr"] for r, a in zip(rs, van)])
            row["gap_closed"] = mean_std([(r["real_psnr"] - a["real_psnr"]) / (o["real_psnr"] - a["real_psnr"])
                                          for r, a, o in zip(rs, van, ora)])
            for k in ("hinge_active_frac", "diag"):
                if rs[0].get(k) is not None:
                    row[k] = mean_std([r[k] for r in rs])
            summary[v] = row
        res["domains"][domain] = {"prediction": {k: mean_std([p[k] for p in pred]) for k in pred[0]},
                                  "summary": summary, "runs": runs}
    # the targets, checked on the means: on white DA closes >= 40% of the gap with synthetic PSNR within
    # 0.2 dB of vanilla; on camera DA stays within 0.1 dB of vanilla
    checks = {"white": lambda s: s["gap_closed"]["mean"] >= 0.4 and abs(s["syn_change_db"]["mean"]) <= 0.2,
              "camera": lambda s: abs(s["real_gain_db"]["mean"]) <= 0.1}
    res["targets"] = {d: {v: checks[d](r["summary"][v]) for v in ("da",)}
                      for d, r in res["domains"].items() if d in checks}
    log("\n" + effect_table(res))
    _plot_effect(os.path.join(out, "effect.png"), res)
    return finish("effect", out, res, t0, c0, log)


def effect_table(res):
    """The effect experiment as a Markdown table (the README's table is this output)."""
    lines = [f"mean ± std over seeds {res['seeds']}"]
    for d, r in res["domains"].items():
        p = r["prediction"]
        lines += ["", f"**{d}**: start real {fmt(p['start_real_psnr'])} dB, syn {fmt(p['start_syn_psnr'])} dB, "
                      f"HF ratio {fmt(p['start_real_hf'])}; shrinkage test lam 0.1: {fmt(p['shrink_0.1'])} dB, "
                      f"lam 0.3: {fmt(p['shrink_0.3'])} dB", "",
                  "| row | real PSNR | gain vs vanilla | gap closed | syn PSNR | syn change | real HF | hinge active | diagnostic |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v, s in r["summary"].items():
            opt = [fmt(s[k], 3 if k == "diag" else 2) if k in s else "–" for k in ("hinge_active_frac", "diag")]
            lines.append(f"| {v} | {fmt(s['real_psnr'])} | {fmt(s['real_gain_db'])} | {fmt(s['gap_closed'])} | "
                         f"{fmt(s['syn_psnr'])} | {fmt(s['syn_change_db'])} | {fmt(s['real_hf'])} | {opt[0]} | {opt[1]} |")
    return "\n".join(lines)


def _plot_effect(path, res):
    """Real-like PSNR over training for every row (mean over seeds), one panel per domain."""
    plt = pyplot()
    doms = list(res["domains"])
    fig, axes = plt.subplots(1, len(doms), figsize=(5 * len(doms), 3.6), squeeze=False)
    for ax, d in zip(axes[0], doms):
        for v, runs in res["domains"][d]["runs"].items():
            curves = np.array([r["curve"]["real_psnr"] for r in runs])              # (seeds, evaluations)
            ax.plot(runs[0]["curve"]["step"], curves.mean(0), marker="o", ms=3, label=v)
        ax.axhline(res["domains"][d]["prediction"]["start_real_psnr"]["mean"], color="k", ls=":", lw=1, label="start")
        ax.set_title(f"real-like domain: {d}", fontsize=9), ax.set_xlabel("training step from the start")
        ax.set_ylabel("real-like PSNR (dB)"), ax.legend(fontsize=7)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# Clean-image worlds: how far is the built-in world from photographs, at the scale the networks see?
# ----------------------------------------------------------------------------------------------------------
# A restorer trained on 32 px crops sees only what a 32 px crop holds: folders.clean_stats measures three statistics of
# clean crops (hf, edges, slope), compared here with tiles of photographs (`python experiments.py worlds --photos DIR`;
# no photograph is shipped).
def defocus(x, sigma):
    """A Gaussian defocus of sigma px (the blur of a lens focused elsewhere)."""
    return dm.blur(x, dm.gaussian_kernels(torch.full((x.shape[0],), sigma), int(2 * math.ceil(3 * sigma) + 1)))


# name -> clean(n, size, gen): the sharp dead leaves, variants that change one property at a time, and the world the
# selection rule of docs/effect.md chose (dada_min.natural_leaves, world=natural)
CLEAN_VARIANTS = {
    "dead leaves (current)": lambda n, s, g: dm.dead_leaves(n, s, g),
    "60 discs, radius 6, defocus 1.5": lambda n, s, g: defocus(dm.dead_leaves(n, s, g, n_discs=60, min_radius=6.0),
                                                                1.5),
    "defocus 1.5 px": lambda n, s, g: defocus(dm.dead_leaves(n, s, g), 1.5),
    "min radius 6 px": lambda n, s, g: dm.dead_leaves(n, s, g, min_radius=6.0),
    "2x canvas, crop": lambda n, s, g: dm.dead_leaves(n, 2 * s, g)[..., s // 2:s // 2 + s, s // 2:s // 2 + s],
    "60 discs": lambda n, s, g: dm.dead_leaves(n, s, g, n_discs=60),
    "natural (contrast 0.44, texture 0.04)": lambda n, s, g: dm.natural_leaves(n, s, g),
}


@experiment(size=dict(image_size=48, patch_size=32), quick=dict())
def exp_worlds(cfg, out, quick, log=print, photos=()):
    """Statistics of each built-in clean world (CLEAN_VARIANTS) and, with --photos DIR (repeatable), of 48 px tiles of
    photographs."""
    t0, c0, _ = begin(cfg, out)
    n = 32 if quick else 256
    pools = {name: fn(n, cfg.image_size, torch.Generator().manual_seed(cfg.seed)) for name, fn in CLEAN_VARIANTS.items()}
    for folder in photos:
        pools[f"photographs ({os.path.basename(os.path.normpath(folder))})"] = folders.folder_tiles(
            folder, cfg.image_size, torch.Generator().manual_seed(cfg.seed), log=log)
    stats = {name: clean_stats(x, cfg.patch_size) for name, x in pools.items()}
    ref = stats[next(iter(stats))] if not photos else stats[list(stats)[-1]]
    log(f"\n{'clean world':34s} {'hf':>8s} {'edges':>7s} {'slope':>7s}   (crops of {cfg.patch_size} px; "
        f"hf relative to the {'photographs' if photos else 'first row'})")
    for name, st in stats.items():
        log(f"{name:34s} {st['hf']:8.5f} {st['edges']:7.3f} {st['slope']:7.2f}   hf x{st['hf'] / ref['hf']:.2f}")
    plt = pyplot()
    fig, axes = plt.subplots(len(pools), 6, figsize=(9, 1.6 * len(pools)), squeeze=False)
    for i, (name, x) in enumerate(pools.items()):
        for j in range(6):
            dm.show_image(axes[i, j], x[j * (len(x) // 6)])
        axes[i, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    save_figure(fig, os.path.join(out, "worlds.png"), dpi=80)
    return finish("worlds", out, {"experiment": "worlds", "config": dataclasses.asdict(cfg), "crop": cfg.patch_size,
                                  "image_size": cfg.image_size, "stats": stats}, t0, c0, log)


PHOTO_HF = 0.00245             # hf of 48 px tiles of the McMaster photographs (docs/effect.md)


def world_claims(worlds):
    """The pre-registered hypotheses of docs/effect.md, judged on the worlds measured so far (mean over seeds)."""
    gain = {k: w["da_gain_real_db"]["mean"] for k, w in worlds.items()}
    hf = {k: w["clean_stats"]["hf"] for k, w in worlds.items()}
    low = [k for k in worlds if hf[k] <= 2 * PHOTO_HF]
    rank = lambda v: np.argsort(np.argsort(v))                                     # noqa: E731 (ranks, no ties)
    rho = float(np.corrcoef(rank([hf[k] for k in worlds]), rank([gain[k] for k in worlds]))[0, 1]) \
        if len(worlds) > 2 else float("nan")
    same = [k for k in ("60 discs", "2x canvas, crop") if k in worlds]
    cur = gain.get("dead leaves (current)")
    return {"H1: gain rises as hf falls (rank correlation of hf and gain < 0)": bool(rho < 0),
            "H1: every world with hf <= 2x photographs' gains (mean > 0)": bool(low) and all(gain[k] > 0 for k in low),
            "H3: disc count and canvas size keep the current world's sign": bool(same) and cur is not None
            and all((gain[k] > 0) == (cur > 0) for k in same)}


@experiment(size=dict(steps=400, eval_every=0, log_every=200), quick=dict(steps=4, eval_every=0, log_every=4))
def exp_world_effect(cfg, out, quick, log=print):
    """The property runs of docs/effect.md: per clean world (CLEAN_VARIANTS, in order), vanilla, DA and the oracle from the
    same start on that world's data (real-like domain cfg.real_noise), seeds cfg.seed.. (3; 1 with --quick).
    Reports DA - vanilla and the gap closed on real-like PSNR beside the world's clean statistics; the JSON is
    rewritten after each world, so an interrupted run keeps the worlds it finished."""
    t0, c0, device = begin(cfg, out)
    seeds = exp_seeds(cfg, quick)
    results = {"experiment": "world_effect", "config": dataclasses.asdict(cfg), "seeds": seeds, "worlds": {}}
    for name, clean in list(CLEAN_VARIANTS.items())[:2 if quick else None]:
        runs, identity = {m: [] for m in ("vanilla", "da", "oracle")}, []
        for seed in seeds:
            c = dataclasses.replace(cfg, seed=seed, world="dead-leaves")   # every variant from the dead-leaves start
            data = dm.make_data(c, device, clean=clean)
            identity.append(dm.identity_metrics(data)["real_psnr"])
            for m in runs:
                state = dm.train(dataclasses.replace(c, method=m), data, log=seed_log(log, seed))
                runs[m].append(scored(state.G_eval, data))
        results["worlds"][name] = w = {
            "clean_stats": clean_stats(clean(256, cfg.image_size, torch.Generator().manual_seed(cfg.seed)),
                                       cfg.patch_size), **map_cell(runs, identity)}   # the regime map's summary row
        log(f"{name}: DA - vanilla {fmt(w['da_gain_real_db'])} dB, gap closed {fmt(w['gap_closed'])}, "
            f"synthetic change {fmt(w['da_syn_change_db'])} dB")
        results["claims"] = world_claims(results["worlds"])
        dm.atomic_write_text(os.path.join(out, "world_effect.json"), json.dumps(results, indent=1))
    log(f"\n{'clean world':34s} {'hf':>8s} " + " ".join(f"{h:>14s}" for h in ("vanilla", "DA - vanilla", "gap closed",
                                                                              "syn change")))
    for name, r in results["worlds"].items():
        log(f"{name:34s} {r['clean_stats']['hf']:8.5f} {fmt(r['vanilla']['real_psnr']):>14s} "
            f"{fmt(r['da_gain_real_db']):>14s} {fmt(r['gap_closed']):>14s} {fmt(r['da_syn_change_db']):>14s}")
    return finish("world_effect", out, results, t0, c0, log)


# The phone world (docs/effect.md, "The phone world and the smoothness axis"): the targets are the clean_stats of the
# ground truths of three real-noise photograph sets (measured with the folder commands; no photograph is shipped), and
# the rule below, fixed before any DA run on a candidate, picks the generator by statistics alone.
PHONE_TARGETS = {"SIDD (phone)": (0.00012, 0.006, -2.32), "PolyU (DSLR)": (0.00032, 0.017, -2.90),
                 "Nam / CC (DSLR)": (0.00024, 0.017, -2.86)}                       # (hf, edges, slope)
PHONE_RULE = {"hf": (0.0001, 0.0004), "edges": (0.0048, 0.021), "slope": (-3.2, -2.0), "luma_std": (0.04, 1.0)}
PHONE_CENTRE = (0.00021, 0.012, -2.69)   # geometric means of the targets' hf and edges, mean of their slopes


def phone_rule(st):
    """(qualifies, distance to PHONE_CENTRE) of a candidate's statistics under the phone world's selection rule."""
    ok = all(lo <= st[k] <= hi for k, (lo, hi) in PHONE_RULE.items())
    hf, edges, slope = PHONE_CENTRE
    dist = abs(math.log(st["hf"] / hf)) + abs(math.log(max(st["edges"], 1e-9) / edges)) + abs(st["slope"] - slope) / 0.3
    return ok, dist


def upsampled(clean, k):
    """The world `clean` rendered at 1/k of the size and upsampled k x (bicubic): the same scene with k x finer pixels."""
    return lambda n, s, g: F.interpolate(clean(n, math.ceil(s / k), g), scale_factor=k, mode="bicubic",
                                         align_corners=False)[..., :s, :s].clamp(0, 1)


def phone_candidates(quick=False):
    """name -> clean(n, size, gen): the pre-registered grid of soft_leaves settings and the upsampled natural world."""
    grid = [(100, 14.0, 1.0, 2.0, 0.02)] if quick else [
        (n, r, c, s, t) for n in (20, 40, 100) for r in (6.0, 10.0, 14.0) for c in (0.5, 0.7, 1.0)
        for s in (1.2, 1.6, 2.0, 2.5) for t in (0.02, 0.04, 0.06)]
    cands = {f"phone_leaves n {n} r {r:g} c {c:g} lens {s:g} texture {t:g}":
             (lambda n_, r_, c_, s_, t_: lambda k, size, g: dm.soft_leaves(k, size, g, n_, r_, c_, s_, t_))(n, r, c, s, t)
             for n, r, c, s, t in grid}
    for k in (3,) if quick else (2, 3, 4):
        cands[f"natural upsampled x{k}"] = upsampled(dm.natural_leaves, k)
    return cands


@experiment(size=dict(image_size=48, patch_size=32), quick=dict(image_size=48, patch_size=32))
def exp_phone_world(cfg, out, quick, log=print):
    """The phone world's selection (docs/effect.md): clean_stats and the luma contrast of every candidate
    (phone_candidates), the rule (phone_rule), the chosen one, and a figure of it beside the natural world."""
    t0, c0, _ = begin(cfg, out)
    n = 32 if quick else 256
    rows = {}
    for name, fn in phone_candidates(quick).items():
        x = fn(n, cfg.image_size, torch.Generator().manual_seed(cfg.seed))
        st = {**clean_stats(x, cfg.patch_size), "luma_std": float(luma(x).std((2, 3)).mean())}
        rows[name] = {**st, **dict(zip(("qualifies", "distance"), phone_rule(st)))}
    ranked = sorted(rows, key=lambda k: (not rows[k]["qualifies"], rows[k]["distance"]))
    chosen = ranked[0] if rows[ranked[0]]["qualifies"] else None
    log(f"\n{'candidate':52s} {'hf':>8s} {'edges':>7s} {'slope':>6s} {'luma sd':>7s} {'ok':>3s} {'dist':>5s}")
    for name in ranked[:12] + [k for k in ranked[12:] if k.startswith("natural")]:
        r = rows[name]
        log(f"{name:52s} {r['hf']:8.5f} {r['edges']:7.4f} {r['slope']:6.2f} {r['luma_std']:7.3f} "
            f"{'yes' if r['qualifies'] else 'no':>3s} {r['distance']:5.2f}")
    log(f"{sum(r['qualifies'] for r in rows.values())} of {len(rows)} candidates qualify; chosen: {chosen}")
    plt = pyplot()
    shown = {"phone (chosen)": phone_candidates(quick)[chosen] if chosen else None, "natural": dm.natural_leaves}
    fig, axes = plt.subplots(2, 6, figsize=(9, 3.4))
    for i, (label, fn) in enumerate(shown.items()):
        x = fn(6, cfg.image_size, torch.Generator().manual_seed(cfg.seed)) if fn else torch.zeros(6, 3, 8, 8)
        for j in range(6):
            dm.show_image(axes[i, j], x[j])
        axes[i, 0].set_ylabel(label, fontsize=8)
    save_figure(fig, os.path.join(out, "phone_world.png"), dpi=80)
    return finish("phone_world", out, {"experiment": "phone_world", "config": dataclasses.asdict(cfg),
                                       "targets": PHONE_TARGETS, "rule": PHONE_RULE, "centre": PHONE_CENTRE,
                                       "candidates": rows, "chosen": chosen}, t0, c0, log)


# ----------------------------------------------------------------------------------------------------------
# The regime map: when does the noise-space loss help, idle or destroy? (docs/effect.md, pre-registered)
# ----------------------------------------------------------------------------------------------------------
REGIME_DB = 0.3                 # |mean DA - vanilla| below this: idles; above: helps or destroys


def regime(gain_db):
    return "helps" if gain_db > REGIME_DB else "destroys" if gain_db < -REGIME_DB else "idles"


def map_cell(runs, identity):
    """Per-seed runs {method: [metrics]} of one (world, domain) cell -> its summary row."""
    van, da, ora = runs["vanilla"], runs["da"], runs["oracle"]
    gain = summarize(da, van)["real_gain_db"]
    return {"identity_real_psnr": mean_std(identity), **{m: summarize(r) for m, r in runs.items()},
            "hf": {m: mean_std([x["real_hf"] for x in r]) for m, r in runs.items()},
            "bands": {m: [float(np.mean(b)) for b in zip(*[x["real_bands"] for x in r])] for m, r in runs.items()},
            "da_gain_real_db": gain, "regime": regime(gain["mean"]),
            "gap_closed": mean_std([g / (o["real_psnr"] - v["real_psnr"]) for g, o, v in zip(gain["values"], ora, van)]),
            "da_syn_change_db": mean_std([d["syn_psnr"] - v["syn_psnr"] for d, v in zip(da, van)]),
            "vanilla_share": mean_std([(v["real_psnr"] - i) / (o["real_psnr"] - i) for v, o, i in zip(van, ora, identity)])}


def regime_claims(cells):
    """The pre-registered hypotheses M1-M5 of docs/effect.md, judged on the cells measured."""
    c = lambda w, d: cells.get(f"{w} | {d}")                                       # noqa: E731
    gain = lambda w, d: c(w, d)["da_gain_real_db"]["mean"]                         # noqa: E731
    out = {}
    if c("natural", "white"):
        nw = c("natural", "white")
        out["M1: natural x white helps, closes >= 40% of the gap, syn within 0.5 dB"] = bool(
            nw["regime"] == "helps" and nw["gap_closed"]["mean"] >= 0.4 and nw["da_syn_change_db"]["mean"] >= -0.5)
    if c("dead-leaves", "white"):
        out["M2: dead-leaves x white destroys"] = c("dead-leaves", "white")["regime"] == "destroys"
    cams = [c(w, "camera") for w in ("natural", "dead-leaves") if c(w, "camera")]
    if cams:
        out["M3: camera idles or destroys on both worlds"] = all(x["regime"] != "helps" for x in cams)
    if c("natural", "correlated"):
        nc = c("natural", "correlated")
        out["M4: correlated: vanilla < half the oracle's gain, 2-4 px error > 0.5, natural helps"] = bool(
            nc["vanilla_share"]["mean"] < 0.5 and nc["bands"]["vanilla"][1] > 0.5 and nc["regime"] == "helps")
    pairs = [d for d in dm.TASKS["denoise"]["real"] if c("natural", d) and c("dead-leaves", d)]
    if pairs:
        out["M5: natural gains more than dead-leaves on every domain"] = all(
            gain("natural", d) > gain("dead-leaves", d) for d in pairs)
    if c("phone", "white"):                                                         # the phone world's rows
        pw = c("phone", "white")
        out["P1: phone x white: DA - vanilla >= +1 dB, gap closed >= 0.40, syn within 0.5 dB"] = bool(
            pw["da_gain_real_db"]["mean"] >= 1 and pw["gap_closed"]["mean"] >= 0.4 and pw["da_syn_change_db"]["mean"] >= -0.5)
        if c("natural", "white"):
            out["P3: phone x white gains more than natural x white"] = gain("phone", "white") > gain("natural", "white")
    if cells.get("phone | camera (σ ≤ 15)"):
        out["P2: phone x camera (sigma <= 15) helps"] = cells["phone | camera (σ ≤ 15)"]["regime"] == "helps"
    return out


def regime_table(results):
    """The map as a markdown table (the README's), one row per (world, domain) cell."""
    lines = ["| world | domain | input | vanilla | DA | oracle | DA − vanilla | regime | gap closed | DA syn change "
             "| vanilla's share of the oracle's gain | HF ratio v / DA / o | band errors 1-2 / 2-4 / 4-8 px, vanilla → DA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["cells"].items():
        world, domain = key.split(" | ")
        b = lambda m: " / ".join(f"{v:.2f}" for v in r["bands"][m][:3])         # noqa: E731
        lines.append(f"| {world} | {domain} | {r['identity_real_psnr']['mean']:.2f} | {fmt(r['vanilla']['real_psnr'])} "
                     f"| {fmt(r['da']['real_psnr'])} | {fmt(r['oracle']['real_psnr'])} | {fmt(r['da_gain_real_db'])} "
                     f"| **{r['regime']}** | {fmt(r['gap_closed'])} | {fmt(r['da_syn_change_db'])} "
                     f"| {fmt(r['vanilla_share'])} | " + " / ".join(f"{r['hf'][m]['mean']:.2f}" for m in r["hf"])
                     + f" | {b('vanilla')} → {b('da')} |")
    return "\n".join(lines)


def regime_figure(path, results):
    """DA - vanilla per cell, worlds as rows and domains as columns, each labelled with its regime."""
    worlds = list(dict.fromkeys(k.split(" | ")[0] for k in results["cells"]))
    domains = list(dict.fromkeys(k.split(" | ")[1] for k in results["cells"]))
    grid = np.full((len(worlds), len(domains)), np.nan)
    for key, r in results["cells"].items():
        w, d = key.split(" | ")
        grid[worlds.index(w), domains.index(d)] = r["da_gain_real_db"]["mean"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.9 * len(domains) + 1.5, 1.1 * len(worlds) + 1))
    lim = max(1.0, float(np.nanmax(np.abs(grid))))
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim)
    for key, r in results["cells"].items():
        w, d = key.split(" | ")
        dark = abs(r["da_gain_real_db"]["mean"]) > 0.6 * lim                      # light text on a dark cell
        ax.text(domains.index(d), worlds.index(w), f"{r['regime']}\n{fmt(r['da_gain_real_db'])} dB", ha="center",
                va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(domains)), domains), ax.set_yticks(range(len(worlds)), worlds)
    ax.set_title("DA - vanilla, real-like PSNR (mean ± std over seeds)", fontsize=9)
    fig.colorbar(im, ax=ax, label="dB")
    save_figure(fig, path)


# (world, real-like domain, synthetic sigma_max or None for the domain's own range): the map's cells, in order. The phone
# world's camera cell keeps sigma <= 15, so the camera noise lies above the synthetic range, as phone noise does.
REGIME_CELLS = [(w, d, None) for w in ("natural", "dead-leaves") for d in ("white", "camera", "correlated")] + [
    ("phone", "white", None), ("phone", "camera", 15.0)]
PER_CELL = ("world", "real_noise", "sigma_max", "start")  # config fields each cell sets itself


def cell_key(world, domain, sigma_max):
    own = sigma_max is None or sigma_max == dm.TASKS["denoise"]["sigma_max"][domain]
    return f"{world} | {domain}" + ("" if own else f" (σ ≤ {sigma_max:g})")


@experiment(size=dict(steps=400, eval_every=0, log_every=200), quick=dict(steps=4, eval_every=0, log_every=4))
def exp_regime_map(cfg, out, quick, log=print, cells=None):
    """The regime map of docs/effect.md: per cell of REGIME_CELLS (or `cells`), vanilla, DA and the oracle
    from the shipped start of that world and synthetic range, seeds cfg.seed.. (3; 1 with --quick),
    each cell judged helps / idles / destroys (REGIME_DB), with the HF ratio, the octave-band errors and vanilla's
    share of the oracle's gain. Writes out/regime_map.json after every cell (a rerun with the same settings skips
    the cells it holds), out/regime_map.md (the table) and out/regime_map.png."""
    t0, c0, device = begin(cfg, out)
    seeds, path = exp_seeds(cfg, quick), os.path.join(out, "regime_map.json")
    results = {"experiment": "regime_map", "config": dataclasses.asdict(cfg), "seeds": seeds, "cells": {}}
    results["cells"] = kept_cells(path, results, log, PER_CELL)
    for world, domain, sigma_max in cells or REGIME_CELLS:
        key = cell_key(world, domain, sigma_max)
        if key in results["cells"]:
            continue
        runs, identity = {m: [] for m in ("vanilla", "da", "oracle")}, []
        for seed in seeds:
            c = dataclasses.replace(cfg, seed=seed, world=world, real_noise=domain, sigma_max=sigma_max,
                                    start="auto").validate()
            if not quick and not os.path.isfile(dm.start_path(world, c.sigma_max)):
                raise FileNotFoundError(f"no shipped start for world {world}, sigma_max {c.sigma_max:g} at "
                                        f"{dm.start_path(world, c.sigma_max)}: run `python experiments.py "
                                        f"--make-start --world {world}`")
            data = dm.make_data(c, device)
            identity.append(dm.identity_metrics(data)["real_psnr"])
            for m in runs:
                state = dm.train(dataclasses.replace(c, method=m), data, log=seed_log(log, seed))
                runs[m].append(scored(state.G_eval, data))
        results["cells"][key] = cell = {**map_cell(runs, identity), "sigma_max": c.sigma_max}
        log(f"[regime_map] {key}: DA - vanilla {fmt(cell['da_gain_real_db'])} dB ({cell['regime']}), gap closed "
            f"{fmt(cell['gap_closed'])}, synthetic change {fmt(cell['da_syn_change_db'])} dB  "
            f"({time.time() - t0:.0f} s)")
        results["claims"] = regime_claims(results["cells"])
        dm.atomic_write_text(path, json.dumps(results, indent=1))
    results["claims"] = regime_claims(results["cells"])                            # also when every cell was kept
    return report("regime_map", out, results, regime_table(results), regime_figure, t0, c0, log)


# ----------------------------------------------------------------------------------------------------------
# The smoothness axis: the folder protocol on photograph sets at their native size and rendered at finer pixel pitches,
# and on built-in worlds written to folders, so that both sit on one axis of clean-image hf (docs/effect.md).
AXIS_TILE = 128                # px: the tiles written to the clean / real / eval folders
AXIS_TILES_PER_PHOTO = 8       # at most this many tiles of one photograph in the clean and real pools
AXIS_EVAL_TILES = 24           # evaluation tiles in all
AXIS_WORLDS = {"world: natural": dm.natural_leaves, "world: phone": dm.phone_leaves,
               "world: 60 discs, radius 6, defocus 1.5": CLEAN_VARIANTS["60 discs, radius 6, defocus 1.5"]}
AXIS_CONFIG = dict(task="denoise", world="natural", start="shipped", real_noise="white", sigma_max=15.0, steps=300,
                   eval_every=0, log_every=300)   # the folder protocol: the shipped natural start, AWGN sigma <= 15


def grid_tiles(img, size=AXIS_TILE):
    """The non-overlapping size px tiles of an image (3, H, W), row by row: (k, 3, size, size)."""
    h, w = img.shape[-2] // size, img.shape[-1] // size
    return img[:, :h * size, :w * size].unfold(1, size, size).unfold(2, size, size).permute(1, 2, 0, 3, 4).reshape(
        -1, 3, size, size)


def write_axis_folders(images, root, gen, quick=False):
    """The folder layout of a user's run from a list of clean images (3, H, W), dealt in turn to the clean, real and
    eval pools (a photograph's tiles stay in one pool): root/clean/, root/real/{input,target}/ (real-like `white` noise;
    DA reads only input/) and root/eval/{input,target}/. Returns the number of tiles per pool."""
    pools = {"clean": [], "real": [], "eval": []}
    for i, img in enumerate(images):
        tiles = grid_tiles(img, AXIS_TILE // 4 if quick else AXIS_TILE)
        pool = list(pools)[i % 3]
        keep = tiles if pool == "eval" else tiles[torch.randperm(len(tiles), generator=gen)[:AXIS_TILES_PER_PHOTO]]
        pools[pool].append(keep)
    pools = {k: torch.cat(v) for k, v in pools.items()}
    ev = pools["eval"]
    pools["eval"] = ev[torch.linspace(0, len(ev) - 1, min(len(ev), AXIS_EVAL_TILES)).long()]
    white = dm.TASKS["denoise"]["real"]["white"]
    files = {"clean": pools["clean"], "real/target": pools["real"], "real/input": white(pools["real"], gen),
             "eval/target": pools["eval"], "eval/input": white(pools["eval"], gen)}
    for sub, imgs in files.items():
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for j, img in enumerate(imgs):
            folders.write_image(os.path.join(root, sub, f"{j:04d}.png"), img)
    return {k: len(v) for k, v in pools.items()}


def axis_sets(photos, quick=False):
    """name -> (kind, a function returning the clean images (3, H, W)): each photograph folder at x1, x2, x3 (bicubic),
    then the built-in worlds (AXIS_WORLDS), 3 x 64 images of AXIS_TILE px, every image one tile: as many tiles as
    Kodak24's pools hold (8 photographs x 8 tiles), so both see the same amount of data."""
    def photo_set(folder, k):
        def load():
            imgs = [torch.from_numpy(folders.read_image(os.path.join(folder, f))).permute(2, 0, 1)
                    for f in folders.list_images(folder)][:6 if quick else None]
            return [F.interpolate(x[None], scale_factor=k, mode="bicubic", align_corners=False)[0].clamp(0, 1)
                    if k > 1 else x for x in imgs]
        return load
    sets = {f"{os.path.basename(os.path.normpath(d))} x{k}": ("photographs", photo_set(d, k))
            for d in photos for k in ((1, 2) if quick else (1, 2, 3))}
    n, size = (6, AXIS_TILE // 4) if quick else (3 * 64, AXIS_TILE)
    for name, fn in AXIS_WORLDS.items():
        sets[name] = ("built-in world", lambda fn=fn: list(fn(n, size, torch.Generator().manual_seed(0))))
    return sets


def axis_claims(cells):
    """A1 and A2 of docs/effect.md, judged on the photograph cells (means over seeds)."""
    photo = [c for c in cells.values() if c["kind"] == "photographs"]
    if len(photo) < 3:
        return {}
    rank = lambda v: np.argsort(np.argsort(v))                                     # noqa: E731
    rho = float(np.corrcoef(rank([c["hf"] for c in photo]), rank([c["da_gain_real_db"]["mean"] for c in photo]))[0, 1])
    smooth = [c for c in photo if c["hf"] <= 0.0005]
    rough = [c for c in photo if c["hf"] >= 0.002]
    return {f"A1: DA - vanilla falls as hf rises (rank correlation {rho:+.2f} < 0)": bool(rho < 0),
            "A2: every cell with hf <= 0.0005 helps, none with hf >= 0.002 does": bool(smooth) and
            all(c["da_gain_real_db"]["mean"] > REGIME_DB for c in smooth) and
            all(c["da_gain_real_db"]["mean"] <= REGIME_DB for c in rough)}


def axis_figure(path, results):
    """DA - vanilla and the gap closed against the clean images' hf: photograph sets and built-in worlds."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "da_gain_real_db", "DA − vanilla, real-like PSNR (dB)"),
                           (axes[1], "gap_closed", "gap closed (DA − vanilla) / (oracle − vanilla)")):
        for kind, marker in (("photographs", "o"), ("built-in world", "s")):
            cs = [c for c in results["cells"].values() if c["kind"] == kind]
            ax.errorbar([c["hf"] for c in cs], [c[key]["mean"] for c in cs], yerr=[c[key]["std"] or 0 for c in cs],
                        fmt=marker, capsize=3, label=kind)
            for c in cs:
                ax.annotate(c["name"].removeprefix("world: "), (c["hf"], c[key]["mean"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        if key == "da_gain_real_db":
            ax.axhspan(-REGIME_DB, REGIME_DB, color="0.9", label="idles (±0.3 dB)")
        for name, (hf, _, _) in PHONE_TARGETS.items():                          # where phone photos sit
            ax.axvline(hf, color="tab:green", ls=":", lw=1)
            ax.text(hf, 1.0, name.split(" ")[0], transform=ax.get_xaxis_transform(), fontsize=6, color="tab:green",
                    rotation=90, ha="right", va="top")
        ax.set_xscale("log"), ax.set_xlabel("clean images' hf (energy of x − box5(x), 32 px crops)")
        ticks = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 4e-3)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks]), ax.xaxis.set_minor_formatter(pyplot().NullFormatter())
        ax.set_ylabel(label, fontsize=8), ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("The folder protocol on photographs (native size, x2, x3) and built-in worlds; mean ± std over 3 seeds; "
                 "dotted: phone and DSLR ground truths", fontsize=8)
    save_figure(fig, path)


@experiment(size=dict(AXIS_CONFIG), quick=dict(AXIS_CONFIG, start="scratch", steps=4, log_every=4))
def exp_axis(cfg, out, quick, log=print, photos=()):
    """The smoothness axis of docs/effect.md: for each photograph folder (--photos DIR, repeatable) at x1, x2 and x3,
    and for each built-in world of AXIS_WORLDS, write the folders of a user's run (write_axis_folders), then per seed
    train vanilla, DA and the oracle with folders.load_folder_data and score whole evaluation tiles with
    folders.evaluate_folder. Writes out/axis.json after every set (a rerun with the same settings keeps those sets),
    out/axis.md and out/axis.png. The folders go under out/folders/ and are not needed afterwards."""
    t0, c0, device = begin(cfg, out)
    seeds, path = exp_seeds(cfg, quick), os.path.join(out, "axis.json")
    results = {"experiment": "axis", "config": dataclasses.asdict(cfg), "seeds": seeds, "cells": {}}
    results["cells"] = kept_cells(path, results, log)
    for name, (kind, load) in axis_sets(photos, quick).items():
        if name in results["cells"]:
            continue
        root = os.path.join(out, "folders", name.replace(": ", "-").replace(" ", "_").replace(",", ""))
        counts = write_axis_folders(load(), root, torch.Generator().manual_seed(0), quick)
        dirs = {k: os.path.join(root, k) for k in ("clean", "real", "eval")}
        runs, identity, hf = {m: [] for m in ("vanilla", "da", "oracle")}, [], None
        for seed in seeds:
            c = dataclasses.replace(cfg, seed=seed)
            data = folders.load_folder_data(c, dirs["clean"], None, dirs["real"], dirs["eval"], device, log=lambda s: None)
            hf = hf or clean_stats(data.syn_clean.cpu(), c.patch_size)["hf"]
            for m in runs:
                state = dm.train(dataclasses.replace(c, method=m), data, log=seed_log(log, seed))
                r = folders.evaluate_folder(state.G_eval, dirs["eval"], log=lambda s: None)
                runs[m].append({"real_psnr": r["mean_psnr"], "syn_psnr": dm.evaluate_pools(state.G_eval, data)["syn_psnr"]})
                identity.append(r["input_mean_psnr"])
        v, d, o = ([r["real_psnr"] for r in runs[m]] for m in ("vanilla", "da", "oracle"))
        results["cells"][name] = cell = {
            "name": name, "kind": kind, "hf": hf, "tiles": counts, "identity_real_psnr": float(np.mean(identity)),
            **{m: mean_std([r["real_psnr"] for r in rs]) for m, rs in runs.items()},
            "da_gain_real_db": mean_std([b - a for a, b in zip(v, d)]),
            "gap_closed": mean_std([(b - a) / (c_ - a) for a, b, c_ in zip(v, d, o)]),
            "da_syn_change_db": mean_std([b["syn_psnr"] - a["syn_psnr"] for a, b in zip(runs["vanilla"], runs["da"])])}
        cell["regime"] = regime(cell["da_gain_real_db"]["mean"])
        log(f"[axis] {name}: hf {hf:.5f}, DA - vanilla {fmt(cell['da_gain_real_db'])} dB ({cell['regime']}), gap "
            f"closed {fmt(cell['gap_closed'])}  ({time.time() - t0:.0f} s)")
        results["claims"] = axis_claims(results["cells"])
        dm.atomic_write_text(path, json.dumps(results, indent=1))
    results["claims"] = axis_claims(results["cells"])
    lines = ["| clean images | kind | hf | input | vanilla | DA | oracle | DA − vanilla | regime | gap closed | DA syn change |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(results["cells"].values(), key=lambda c: c["hf"]):
        lines.append(f"| {c['name']} | {c['kind']} | {c['hf']:.5f} | {c['identity_real_psnr']:.2f} | "
                     f"{fmt(c['vanilla'])} | {fmt(c['da'])} | {fmt(c['oracle'])} | {fmt(c['da_gain_real_db'])} | "
                     f"**{c['regime']}** | {fmt(c['gap_closed'])} | {fmt(c['da_syn_change_db'])} |")
    return report("axis", out, results, "\n".join(lines), axis_figure, t0, c0, log)


# ----------------------------------------------------------------------------------------------------------
# The denoiser ladder: is the smoothing push a weak denoiser's? (docs/effect.md, pre-registered)
# ----------------------------------------------------------------------------------------------------------
# Rungs on one axis at a time from the base (the cpu-demo denoiser, no warm-up, lr 1e-3): a longer warm-up of eps_theta
# alone (the paper's ramp is long), a larger eps_theta (with the levels and attention the size needs), a lower lr
# with 4x the steps (vanilla and the oracle follow the lr rung, so every comparison is paired).
LADDER_RUNGS = {"base": {}, "warm-up 1000": dict(d_warmup=1000), "warm-up 4000": dict(d_warmup=4000),
                "width 32": dict(d_width=32, d_mults=(1, 2, 2), d_res_blocks=2, d_attn=True),
                "width 64": dict(d_width=64, d_mults=(1, 2, 2), d_res_blocks=2, d_attn=True),
                "lr 1e-4, 4x steps": dict(lr=1e-4, steps_factor=4)}
LADDER_QUICK = {"base": {}, "warm-up 1000": dict(d_warmup=2), "lr 1e-4, 4x steps": dict(lr=1e-4, steps_factor=2)}
# At the gpu and paper sizes (docs/ladder-device.sh) eps_theta is already the preset's (16 M, 62.6 M parameters): the
# size is the capacity rung, and each size runs the base and a warm-up of 4x its steps. No start is shipped at those
# sizes, so the ladder first trains one (vanilla, synthetic only, LADDER_START_FACTOR x the steps, seed 0), as the
# shipped start is, and every run of every rung continues from it.
LADDER_DEVICE = {"base": {}, "warm-up 4x steps": dict(warmup_factor=4)}
LADDER_START_FACTOR = 5


def rung_config(c, over):
    """c with one rung's overrides (steps_factor multiplies c.steps, warmup_factor sets d_warmup to a multiple)."""
    over = dict(over)
    steps, warm = c.steps * over.pop("steps_factor", 1), over.pop("warmup_factor", None)
    return dataclasses.replace(c, steps=steps, **over, **({"d_warmup": warm * c.steps} if warm else {})).validate()


def ladder_rungs(cfg, quick=False):
    """The cpu-demo ladder on the shipped start, the device ladder (LADDER_DEVICE) on a start of its own."""
    return LADDER_QUICK if quick else LADDER_RUNGS if cfg.start != "scratch" else LADDER_DEVICE


def ladder_start(cfg, out, make_data, log):
    """A ladder from scratch first trains its start (vanilla, LADDER_START_FACTOR x steps, seed 0, on make_data())
    and returns the config every run continues from; a rerun keeps out/start.pt. A shipped start is used as it is."""
    if cfg.start != "scratch":
        return cfg
    path = os.path.join(out, "start.pt")
    if not os.path.isfile(path):
        c = dataclasses.replace(cfg, method="vanilla", seed=0, steps=cfg.steps * LADDER_START_FACTOR, d_warmup=0)
        log(f"[ladder] no shipped start at these sizes: training one ({c.steps} steps, synthetic only) -> {path}")
        save_start(path, dm.train(c, make_data(), log=seed_log(log, "start")))
    return dataclasses.replace(cfg, start=path).validate()


def ladder_domains(photos, quick=False):
    """name -> (how its data is made): the built-in natural world with the white domain, and each photograph folder at
    its native size through the folder protocol of the axis (write_axis_folders; scored on whole evaluation tiles)."""
    doms = {}                                     # the photographs first: the reading rule is read on them
    for name, (kind, load) in axis_sets(photos, quick).items():
        if kind == "photographs" and name.endswith(" x1"):
            doms[name] = load
    return {**doms, "natural x white": None}


@experiment(size=dict(AXIS_CONFIG), quick=dict(AXIS_CONFIG, start="scratch", steps=4, log_every=4))
def exp_ladder(cfg, out, quick, log=print, photos=()):
    """The denoiser ladder of docs/effect.md: per domain (ladder_domains) and seed, vanilla and the oracle (at the base
    and at the lr rung's optimiser) and DA at every rung of LADDER_RUNGS, each scored on real-like and synthetic PSNR,
    the mechanism diagnostic (64 draws) and the octave-band errors. Writes out/ladder.json after every (domain, rung)
    cell (a rerun with the same settings keeps them), out/ladder.md and out/ladder.png (Ctrl-C writes those two for
    the finished cells, then stops). Without a shipped start at cfg's sizes it first trains one (ladder_start)."""
    t0, c0, device = begin(cfg, out)
    rungs = ladder_rungs(cfg, quick)                                               # --quick: three rungs, seconds
    cfg = ladder_start(cfg, out, lambda: dm.make_data(dataclasses.replace(cfg, seed=0), device), log)
    seeds, path = exp_seeds(cfg, quick), os.path.join(out, "ladder.json")
    results = {"experiment": "ladder", "config": dataclasses.asdict(cfg), "seeds": seeds, "cells": {}}
    results["cells"] = kept_cells(path, results, log)
    results["runs"] = kept_cells(path, results, log, key="runs")          # every finished training: a rerun goes on
    stopped = None                                                         # from the last one, not the last cell
    try:
        for dom, load in ladder_domains(photos, quick).items():
            data_of, score = {}, None
            if load is not None:
                root = os.path.join(out, "folders", dom.replace(" ", "_"))
                write_axis_folders(load(), root, torch.Generator().manual_seed(0), quick)
                dirs = [os.path.join(root, k) for k in ("clean", "real", "eval")]
                score = lambda G: folders.evaluate_folder(G, dirs[2], log=lambda s: None)["mean_psnr"]  # noqa: E731
            for seed in seeds:
                c = dataclasses.replace(cfg, seed=seed)
                data_of[seed] = (dm.make_data(c, device) if load is None else folders.load_folder_data(
                    c, dirs[0], None, dirs[1], dirs[2], device, log=lambda s: None))

            def run(c, data, name):
                name = f"{dom} | {name} | {c.method} | seed {c.seed}"
                if name not in results["runs"]:
                    state = dm.train(c, data, log=seed_log(log, c.seed))
                    m = scored(state.G_eval, data)
                    m["real_psnr_tiles"] = score(state.G_eval) if score else m["real_psnr"]
                    if dm.METHODS[c.method][0]:
                        m["diag"] = diagnostic_draws(state, data, 4 if quick else 64)
                    results["runs"][name] = m
                    dm.atomic_write_text(path, json.dumps(results, indent=1))
                return results["runs"][name]
            for rung in sorted(rungs, key=ladder_run_order):                           # the strongest rungs early
                over, key = rungs[rung], f"{dom} | {rung}"
                if key in results["cells"]:
                    continue
                t_cell = time.time()
                # vanilla and the oracle: the base's, or the lr rung's own (same optimiser as its DA); run() trains
                # each once per domain and seed, and every rung shares them
                opt = {k: v for k, v in over.items() if k in ("lr", "steps_factor")}
                runs = {m: [] for m in ("vanilla", "oracle", "da")}
                for seed in seeds:
                    c = dataclasses.replace(cfg, seed=seed)
                    for m in ("vanilla", "oracle"):
                        runs[m].append(run(rung_config(dataclasses.replace(c, method=m), opt), data_of[seed],
                                           rung if opt else "base"))
                    runs["da"].append(run(rung_config(dataclasses.replace(c, method="da"), over), data_of[seed], rung))
                v, d, o = ([r["real_psnr_tiles"] for r in runs[m]] for m in ("vanilla", "da", "oracle"))
                results["cells"][key] = cell = {
                    "domain": dom, "rung": rung, "overrides": {k: list(x) if isinstance(x, tuple) else x
                                                               for k, x in over.items()},
                    **{m: mean_std([r["real_psnr_tiles"] for r in rs]) for m, rs in runs.items()},
                    "da_gain_real_db": mean_std([b - a for a, b in zip(v, d)]),
                    "gap_closed": mean_std([(b - a) / (c_ - a) for a, b, c_ in zip(v, d, o)]),
                    "da_syn_change_db": mean_std([b["syn_psnr"] - a["syn_psnr"] for a, b in zip(runs["vanilla"], runs["da"])]),
                    "diag": mean_std([r["diag"] for r in runs["da"]]),
                    "bands": {m: [float(np.mean(b)) for b in zip(*[x["real_bands"] for x in rs])] for m, rs in runs.items()}}
                log(f"[ladder] {key}: DA - vanilla {fmt(cell['da_gain_real_db'])} dB, diagnostic {fmt(cell['diag'], 3)}, "
                    f"4-8 px band {cell['bands']['vanilla'][2]:.2f} -> {cell['bands']['da'][2]:.2f}  "
                    f"({time.time() - t_cell:.0f} s, {time.time() - t0:.0f} s since the start)")
                results["claims"] = ladder_claims(results["cells"])
                dm.atomic_write_text(path, json.dumps(results, indent=1))
    except KeyboardInterrupt as e:                   # Ctrl-C: the finished cells still get their table and figure
        stopped = e
        if not results["cells"]:
            raise
        log(f"\n[ladder] stopped: the table and figure of the {len(results['cells'])} finished cell(s); a rerun "
            "with the same settings trains only the rest")
    results["claims"] = ladder_claims(results["cells"])
    results["cells"] = ladder_table_order(results["cells"], rungs)
    lines = ["| domain | rung | vanilla | DA | oracle | DA − vanilla (per seed) | gap closed | DA syn change | diagnostic "
             "| band errors 1-2 / 2-4 / 4-8 / > 8 px, vanilla → DA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cells"].values():
        b = lambda m: " / ".join(f"{x:.2f}" for x in c["bands"][m])                # noqa: E731
        per_seed = " / ".join(f"{x:+.2f}" for x in c["da_gain_real_db"]["values"])
        lines.append(f"| {c['domain']} | {c['rung']} | {fmt(c['vanilla'])} | {fmt(c['da'])} | {fmt(c['oracle'])} | "
                     f"{fmt(c['da_gain_real_db'])} ({per_seed}) | {fmt(c['gap_closed'])} | {fmt(c['da_syn_change_db'])} | "
                     f"{fmt(c['diag'], 3)} | {b('vanilla')} → {b('da')} |")
    results = report("ladder", out, results, "\n".join(lines), ladder_figure, t0, c0, log)
    if stopped:
        raise stopped
    return results


def ladder_run_order(rung):
    """base, then the strongest warm-up and width rungs (what D2 reads), then the rest: a run cut short by a session's
    end still answers the reading rule."""
    first = ["base", "warm-up 4000", "width 64"]
    return first.index(rung) if rung in first else len(first)


def ladder_table_order(cells, rungs):
    """The cells by domain (as they came) and then in LADDER_RUNGS order, whatever order they ran in."""
    doms, names = list(dict.fromkeys(c["domain"] for c in cells.values())), list(rungs)
    rank = lambda c: (doms.index(c["domain"]), names.index(c["rung"]) if c["rung"] in names else len(names))  # noqa: E731
    return dict(sorted(cells.items(), key=lambda kv: rank(kv[1])))


def ladder_claims(cells):
    """D1-D3 of docs/effect.md per domain (means over seeds), each as soon as the rungs it reads are measured (the
    LADDER_RUNGS claims, or at the device sizes the LADDER_DEVICE ones)."""
    out = {}
    for dom in dict.fromkeys(c["domain"] for c in cells.values()):
        c = {k.split(" | ")[1]: v for k, v in cells.items() if v["domain"] == dom}
        diag, gain, band = ({k: f(v) for k, v in c.items()} for f in (
            lambda v: v["diag"]["mean"], lambda v: v["da_gain_real_db"]["mean"], lambda v: v["bands"]["da"][2]))
        has = lambda *rungs: set(rungs) <= set(c)                                 # noqa: E731
        if has("base", "warm-up 4x steps"):                                       # a device size: base and warm-up
            w = "warm-up 4x steps"
            out[f"D1 ({dom}): the diagnostic rises with the warm-up"] = bool(diag[w] > diag["base"])
            out[f"D2 ({dom}): DA - vanilla is positive at the base or the warm-up"] = bool(max(gain[w], gain["base"]) > 0)
            out[f"D3 ({dom}): DA's 4-8 px error falls with the warm-up"] = bool(band[w] < band["base"])
        if has("base", "warm-up 1000", "warm-up 4000", "width 32", "width 64"):
            out[f"D1 ({dom}): the diagnostic rises along warm-up and width"] = bool(
                diag["base"] < diag["warm-up 1000"] < diag["warm-up 4000"] and diag["base"] < diag["width 32"] < diag["width 64"])
        if has("warm-up 4000", "width 64"):
            out[f"D2 ({dom}): DA - vanilla turns positive at the strongest warm-up or width rung"] = bool(
                gain["warm-up 4000"] > 0 or gain["width 64"] > 0)
        if has("base", "warm-up 4000", "width 64"):
            out[f"D3 ({dom}): DA's 4-8 px error falls at the strongest rungs"] = bool(
                band["warm-up 4000"] < band["base"] and band["width 64"] < band["base"])
    return out


def ladder_figure(path, results):
    """Per domain: DA - vanilla (bars) and the diagnostic (dots) at each rung."""
    plt = pyplot()
    doms = list(dict.fromkeys(c["domain"] for c in results["cells"].values()))
    fig, axes = plt.subplots(1, len(doms), figsize=(5.5 * len(doms), 3.8), squeeze=False)
    for ax, dom in zip(axes[0], doms):
        cs = [c for c in results["cells"].values() if c["domain"] == dom]
        xs = np.arange(len(cs))
        ax.bar(xs, [c["da_gain_real_db"]["mean"] for c in cs], yerr=[c["da_gain_real_db"]["std"] or 0 for c in cs],
               capsize=3, color="tab:blue", label="DA − vanilla (dB)")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(xs, [c["rung"] for c in cs], rotation=25, ha="right", fontsize=7)
        ax.set_ylabel("DA − vanilla, real-like PSNR (dB)"), ax.set_title(dom, fontsize=9)
        ax2 = ax.twinx()
        ax2.plot(xs, [c["diag"]["mean"] for c in cs], "o", color="tab:red", label="diagnostic cos")
        ax2.set_ylabel("mechanism diagnostic (cos)", color="tab:red")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# The shipped starts: the converged synthetic-only restorers every cpu-demo run continues from
# ----------------------------------------------------------------------------------------------------------
# `python experiments.py --make-start` retrains the data/start-*.pt files with exactly these settings (--world W,
# --sigma_max S: only those); dada_min.STARTS names the files and dada_min.load_start reads them.
START = dict(method="vanilla", task="denoise", start="scratch", seed=0, steps=6000, eval_every=1000,
             log_every=1000)


def start_config(world, sigma_max):
    """The config of the shipped start for this clean world and synthetic range; its real-like domain (only
    evaluated, never trained on) is the first one TASKS pairs with that range."""
    domain = next(d for d, s in dm.TASKS["denoise"]["sigma_max"].items() if s == sigma_max)
    return dm.make_config("cpu-demo", world=world, sigma_max=sigma_max, real_noise=domain, **START)


def save_start(path, state):
    """The slim checkpoint a shipped start is: config, step, history and the EMA restorer only (no
    denoiser, no optimiser), readable by dada_min.read_checkpoint and load_restorer."""
    weights = {k: v.clone() for k, v in state.G_ema.state_dict().items()}
    # "restorer" and "restorer_ema" share storage, so torch.save writes the weights once
    dm.write_checkpoint(path, state, restorer=weights, restorer_ema=weights)


def make_start(world, sigma_max, path=None, log=print, **overrides):
    """Train the shipped start for one clean world and synthetic range (vanilla, start_config; overrides: for
    the tests) and save it (default: where dada_min looks for it). About 4.5 minutes each on 2 CPU cores."""
    path = path or dm.start_path(world, sigma_max)
    state = dm.train(dataclasses.replace(start_config(world, sigma_max), **overrides).validate(), log=log)
    save_start(path, state)
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    return state


# ----------------------------------------------------------------------------------------------------------
# The check against the official code: same weights in, same numbers out
# ----------------------------------------------------------------------------------------------------------
# `python experiments.py --check-official PATH` imports the official networks from a checkout of
# github.com/KangLiao929/Noise-DA (nothing of it is copied here), copies their weights into dada_min's `paper`
# networks by an explicit mapping, and compares restorer output, denoiser output, the DA loss and its gradients
# on one batch with scripted random draws (t, u -> gamma, eps, both swap masks). docs/official-check.md has
# the command and its output. Everything runs in float32 (the official denoiser casts its input to float32).
CHECK_TOL = {"output": 1e-5, "loss": 1e-5, "grad": 1e-4}    # max |ours - official| / max |official|


def restorer_convs(G):
    """G's convs in the official RestorationNet's module order: per level down two convs, then per level up
    conv_up and the block's two convs, then the head (dada_min keeps up_conv and up_block in two lists)."""
    convs = [c for block in G.down for c in block if isinstance(c, torch.nn.Conv2d)]
    for up, block in zip(G.up_conv, G.up_block):
        convs += [up] + [c for c in block if isinstance(c, torch.nn.Conv2d)]
    return convs + [G.last]


def qkv_rows(c, heads):
    """Row order that turns dada_min's qkv projection (3, heads, C/heads) into the official legacy attention's
    head-major layout (heads, 3, C/heads): official row r holds dada_min row qkv_rows(c, heads)[r]."""
    return torch.arange(3 * c).view(3, heads, c // heads).transpose(0, 1).reshape(-1)


def denoiser_pairs(ours, official):
    """[(our name, our tensor, official name, official tensor)] in module order: both UNets register their
    parameters in the order of the forward pass (embedding MLP, input conv, down, middle, up, output)."""
    a, b = list(ours.named_parameters()), list(official.named_parameters())
    if len(a) != len(b):
        raise ValueError(f"the denoisers have {len(a)} and {len(b)} parameter tensors: not the same network")
    return [(na, ta, nb, tb) for (na, ta), (nb, tb) in zip(a, b)]


def to_ours(name, t, ours_t, heads):
    """An official tensor in dada_min's layout: Conv1d (c, k, 1) -> Conv2d (c, k, 1, 1); qkv rows permuted back."""
    if t.numel() != ours_t.numel():
        raise ValueError(f"official {name} {tuple(t.shape)} has no counterpart of that size in dada_min "
                         f"({tuple(ours_t.shape)})")
    t = t.reshape(ours_t.shape)
    if ".qkv." in name:                                                              # head-major -> (3, heads, ...)
        t = t[torch.argsort(qkv_rows(t.shape[0] // 3, heads))]
    return t


def attn_heads(D):
    """The head count of eps_theta's attention block (the qkv permutation depends on it)."""
    return next(m.heads for m in D.modules() if isinstance(m, dm.AttnBlock))


def copy_official_weights(G, D, off_G, off_D, log=print):
    """Copy the official restorer's and denoiser's weights into dada_min's G and D; print the mapping."""
    heads = attn_heads(D)
    with torch.no_grad():
        off_convs = [m for m in off_G.modules() if isinstance(m, torch.nn.Conv2d)]
        names = {m: n for n, m in off_G.named_modules()}
        ours_names = {m: n for n, m in G.named_modules()}
        if len(off_convs) != len(restorer_convs(G)):
            raise ValueError(f"the restorers have {len(off_convs)} and {len(restorer_convs(G))} convs")
        log("restorer (module order):")
        for o, m in zip(off_convs, restorer_convs(G)):
            m.weight.copy_(o.weight), m.bias.copy_(o.bias)
            log(f"  {names[o]:32s} -> G.{ours_names[m]:20s} {tuple(o.weight.shape)}")
        log("denoiser (parameter order; one line per module):")
        last = None
        for na, ta, nb, tb in denoiser_pairs(D, off_D):
            ta.copy_(to_ours(nb, tb, ta, heads))
            module = nb.rsplit(".", 1)[0]
            if module != last:
                how = ("rows head-major -> (3, heads, c)" if ".qkv." in nb else
                       "reshape" if tuple(ta.shape) != tuple(tb.shape) else "")
                log(f"  {module:40s} -> D.{na.rsplit('.', 1)[0]:34s} {tuple(tb.shape)} {how}")
                last = module


@contextlib.contextmanager
def scripted_draws(ints, uniforms):
    """Make torch.randint return the given tensors, and torch.rand the given ones, in call order (the official
    forward pass draws t, u and the two swap masks itself)."""
    real_randint, real_rand = torch.randint, torch.rand
    ints, uniforms = list(ints), list(uniforms)
    torch.randint = lambda *a, **k: ints.pop(0)
    torch.rand = lambda *a, **k: uniforms.pop(0)
    try:
        yield
    finally:
        torch.randint, torch.rand = real_randint, real_rand


def import_official(repo, log=print):
    """models.network and models.loss of an official checkout; modules it imports that are not installed
    (image I/O, metrics, logging; none is on the compared path) are stubbed with empty modules."""
    if not os.path.isfile(os.path.join(repo, "models", "network.py")):
        raise FileNotFoundError(f"{repo!r} is not a checkout of KangLiao929/Noise-DA (no models/network.py)")
    sys.path.insert(0, os.path.abspath(repo))
    stubbed = []
    for _ in range(20):
        try:
            network = importlib.import_module("models.network")
            importlib.import_module("models.guided_diffusion_modules.unet")
            return network, importlib.import_module("models.loss"), stubbed
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] in ("models", "core"):
                raise
            sys.modules[e.name] = types.ModuleType(e.name)
            stubbed.append(e.name)
            log(f"stubbed {e.name} (not installed; not on the compared path)")
    raise ImportError("too many missing modules in the official code")


def relative_diff(ours, official):
    ours, official = ours.detach(), official.detach()
    return float((ours - official).abs().max() / official.abs().max().clamp(min=1e-30))


def check_official(repo, size=32, batch=2, seed=0, log=print):
    """Compare dada_min's `paper` networks and DA loss with the official code's; returns {name: (diff, tol, ok)}."""
    network, losses, _ = import_official(repo, log)
    cfg = dm.make_config("paper", patch_size=size, image_size=size, start="scratch", seed=seed)
    torch.manual_seed(seed)
    off = network.Network(unet=dict(in_channel=9, out_channel=3, inner_channel=cfg.d_width,
                                    channel_mults=list(cfg.d_mults), attn_res=[16], num_head_channels=32,
                                    res_blocks=cfg.d_res_blocks, dropout=cfg.d_dropout, image_size=128),
                          beta_schedule={"train": dict(schedule="linear", n_timestep=cfg.T, linear_start=cfg.beta_start,
                                                       linear_end=cfg.beta_end)},
                          module_name="guided_diffusion", init_type="kaiming")
    off.init_weights()                                   # the official training's initialisation
    off.set_new_noise_schedule(device=torch.device("cpu"), phase="train")
    off.set_loss([losses.mse_loss, losses.charbonnier_loss, losses.cal_triplet_margin_loss])
    G, D = dm.make_networks(cfg)
    schedule = dm.NoiseSchedule(cfg.T, cfg.beta_start, cfg.beta_end)
    log(f"official: RestorationNet {dm.n_params(off.RestorationNet):,} and UNet {dm.n_params(off.denoise_fn):,} "
        f"parameters; dada_min paper preset: G {dm.n_params(G):,}, eps_theta {dm.n_params(D):,}")
    copy_official_weights(G, D, off.RestorationNet, off.denoise_fn, log)
    for net in (off, G, D):
        net.eval()                                       # dropout off: its masks cannot be scripted
    gen = torch.Generator().manual_seed(seed)
    y_syn = torch.rand(batch, 3, size, size, generator=gen)                        # (B, 3, s, s) clean
    x_syn = y_syn + 0.1 * torch.randn(y_syn.shape, generator=gen)
    x_real = (torch.rand(batch, 3, size, size, generator=gen) + 0.2 * torch.randn(batch, 3, size, size, generator=gen))
    eps = torch.randn(y_syn.shape, generator=gen)
    t = torch.randint(1, cfg.T, (batch,), generator=gen)
    u = torch.rand(batch, 1, generator=gen)
    m1, m2 = (torch.rand(batch, generator=gen) < 0.5 for _ in range(2))           # the two swap masks
    ac = schedule.alphas_cumprod
    gamma = ac[t - 1] + (ac[t] - ac[t - 1]) * u[:, 0]                               # as the official forward
    results = {"noise schedule (gammas)": (relative_diff(ac, off.gammas), CHECK_TOL["output"])}
    with torch.no_grad():
        results["restorer output R(x)"] = (relative_diff(G(x_real), off.RestorationNet(x_real)), CHECK_TOL["output"])
        inp = torch.cat([x_syn, y_syn, x_real], 1)
        results["denoiser output eps_hat"] = (relative_diff(D(inp, gamma), off.denoise_fn(inp, gamma)),
                                              CHECK_TOL["output"])
    # the DA loss: official forward (diff_flag=1) with scripted draws vs dada_min's functions with the same draws
    with scripted_draws([t], [u, torch.where(m1, 0.75, 0.25), torch.where(m2, 0.75, 0.25)]):   # rand > 0.5
        loss_noise, loss_syn = off(y_syn, y_syn=x_syn, y_real=x_real, diff_flag=1, noise=eps)
    r_syn, r_real = G(torch.cat([x_syn, x_real])).chunk(2)                          # train_step, lines 2-7
    ours_res = dm.charbonnier(x_syn + r_syn, y_syn)
    with scripted_draws([], [torch.where(m1, 0.25, 0.75), torch.where(m2, 0.25, 0.75)]):   # rand < 0.5
        ours_dif, _ = dm.diffusion_loss(D, schedule, y_syn, x_syn + r_syn, x_real + r_real,
                                        dm.residual_swap(x_syn, r_syn, x_real, r_real), True, cfg.margin,
                                        gamma=gamma, eps=eps)
    results["L_Res (Charbonnier)"] = (relative_diff(ours_res, loss_syn), CHECK_TOL["loss"])
    results["L_noise = (Eq. 1 + Eq. 3) / 2"] = (relative_diff(ours_dif, loss_noise), CHECK_TOL["loss"])
    (loss_syn + cfg.alpha_max * loss_noise).backward()
    (ours_res + cfg.alpha_max * ours_dif).backward()
    heads = attn_heads(D)
    g_off = [o.weight.grad for o in off.RestorationNet.modules() if isinstance(o, torch.nn.Conv2d)]
    g_ours = [m.weight.grad for m in restorer_convs(G)]
    results["gradient, restorer weights"] = (max(relative_diff(a, b) for a, b in zip(g_ours, g_off)), CHECK_TOL["grad"])
    pairs = denoiser_pairs(D, off.denoise_fn)
    results["gradient, denoiser parameters"] = (
        max(relative_diff(ta.grad, to_ours(nb, tb.grad, ta, heads)) for _, ta, nb, tb in pairs), CHECK_TOL["grad"])
    log(f"\n{'compared (float32, batch ' + str(batch) + ', ' + str(size) + ' px)':40s} {'max rel. diff':>14s} "
        f"{'tolerance':>10s}")
    for name, (diff, tol) in results.items():
        log(f"{name:40s} {diff:14.2e} {tol:10.0e} {'ok' if diff <= tol else 'FAILED'}")
    return {k: (d, tol, d <= tol) for k, (d, tol) in results.items()}


# ----------------------------------------------------------------------------------------------------------
# The README's figure of the built-in tasks
# ----------------------------------------------------------------------------------------------------------
def save_task_figure(path, size=64, seed=0):
    """One row per task: a clean built-in image, its synthetic degradation and each built-in real-like
    one, with the PSNR of each against the clean image. `python -c "import experiments;
    experiments.save_task_figure('docs/tasks.png')"` makes the README's figure."""
    plt = pyplot()
    gen = torch.Generator().manual_seed(seed)
    n_cols = 2 + max(len(t["real"]) for t in dm.TASKS.values())
    fig, axes = plt.subplots(len(dm.TASKS), n_cols, figsize=(2.2 * n_cols, 2.4 * len(dm.TASKS)), squeeze=False)
    for i, (task, fns) in enumerate(dm.TASKS.items()):
        y = dm.dead_leaves(1, size, gen)                                               # (1, 3, size, size)
        cols = [("clean", y), ("synthetic", dm.degrade_synthetic(dm.make_config(task=task, sigma_max=75.0), y, gen).clamp(0, 1))]
        cols += [(f"real-like: {name}", fn(y, gen)) for name, fn in fns["real"].items()]
        for j, ax in enumerate(axes[i]):
            if j >= len(cols):
                ax.axis("off")
                continue
            title, img = cols[j]
            dm.show_image(ax, img[0], ref=y[0] if j else None, title=f"{task}: {title}" if j == 0 else title)
    save_figure(fig, path, dpi=80)


def build_parser():
    p = dm.config_parser("experiments.py", "The paper's evidence in miniature, one experiment per command.")
    p.add_argument("name", nargs="?", choices=sorted(EXPERIMENTS), help="the experiment")
    p.add_argument("--make-start", action="store_true",
                   help="instead: retrain the shipped starts data/start-*.pt (with --world, --sigma_max: only those)")
    p.add_argument("--check-official", metavar="PATH", default=None,
                   help="instead: compare the paper networks and DA loss with a checkout of the official code")
    p.add_argument("--quick", action="store_true", help="the seconds-long size used by the tests")
    p.add_argument("--out", default=None, help="output directory (default: runs/NAME)")
    p.add_argument("--photos", action="append", default=[], metavar="DIR",
                   help="worlds, axis, ladder: a folder of clean photographs (repeat the flag for several)")
    return p


def main(argv=None):
    """--quick: the experiment's quick size on the tiny preset; with the cpu-demo preset, its default size
    (<= 10 min on 2 CPU cores); --field flags win over both."""
    parser = build_parser()
    args = dm.parse_args(parser, argv)
    if args.make_start:                               # its configs are fixed (start_config), not the flags'
        keys = [(w, s) for w, s in dm.STARTS if args.cfg_world in (None, w) and args.cfg_sigma_max in (None, s)]
        if not keys:
            parser.error(f"--world {args.cfg_world} --sigma_max {args.cfg_sigma_max} has no shipped start; the "
                         f"starts are (world, sigma_max) in {sorted(dm.STARTS)}")
        for world, sigma_max in keys:
            make_start(world, sigma_max)
        return 0
    if args.check_official:
        try:
            checks = check_official(args.check_official)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        failed = [k for k, (_, _, ok) in checks.items() if not ok]
        print("all within tolerance" if not failed else f"FAILED: {', '.join(failed)}")
        return 1 if failed else 0
    if args.name is None:
        parser.error("name an experiment (one of " + ", ".join(sorted(EXPERIMENTS)) + ") or give --make-start")
    exp = EXPERIMENTS[args.name]
    try:
        if args.quick:
            cfg = dm.parse_config(args, "tiny", exp.quick)
        elif args.preset == "cpu-demo":
            cfg = dm.parse_config(args, base=exp.size)
        else:
            cfg = dm.parse_config(args)
    except ValueError as e:
        parser.error(str(e))
    if args.photos and args.name not in ("worlds", "axis", "ladder"):
        parser.error("--photos is for the worlds, axis and ladder experiments")
    for folder in args.photos:
        if not os.path.isdir(folder):
            parser.error(f"--photos {folder!r} is not a folder")
    if args.name == "axis" and not args.photos and not args.quick:
        parser.error("axis needs at least one --photos DIR of clean photographs")
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    # SIGINT and SIGTERM raise KeyboardInterrupt (a shell starting a job in the background ignores SIGINT for it, and
    # `kill` and `timeout` send SIGTERM), so an experiment that keeps its finished cells reports them when stopped
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        exp(cfg, args.out or f"runs/{args.name}", args.quick, **({"photos": args.photos} if args.photos else {}))
    except KeyboardInterrupt:
        print(f"{args.name}: stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
