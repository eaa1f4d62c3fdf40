"""Throughput of one DA training step, GPU fast path against plain fp32, in one process:

    python bench.py --preset gpu                  # one JSON line per (batch, path), then a summary line
    python bench.py --preset paper --batch 3,16   # the official network sizes at two batch sizes
    python bench.py --preset tiny --device cpu --steps 2
    python bench.py --profile                     # where one DA step spends its time (top operators)
    python bench.py --repro --method da --steps 100   # same run in fresh processes: twice, 1 thread, other kernels

--steps counts the timed steps (default 20); --batch and --size choose batch sizes and the patch side.
Every config field is a flag, as for dada_min.py. docs/gpu.md explains the fast path and the numbers.
"""
import argparse
import dataclasses
import gc
import json
import sys
import time

import torch

import dada_min as dm


def loss_agreement(ref, other, rtol=1e-2):
    """(largest relative difference between two dicts of losses, whether it is <= rtol). The default is
    a bf16 tolerance: bf16 keeps 8 significant bits (steps of 2^-8 = 0.4% relative), and a loss that
    averages many such values lands within a couple of those steps of the fp32 value."""
    diff = max(abs(other[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref)
    return diff, diff <= rtol


def _sync(device):
    """CUDA kernels run asynchronously: wait for all of them before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_mb():
    """Peak resident memory of this process so far (the CPU has no per-run peak like CUDA's), or None."""
    try:
        import resource
    except ImportError:                                                             # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss                        # KiB on Linux, bytes on macOS
    return round(rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)


def _bench_path(cfg, data, device, fast, steps, warmup):
    """Time train_step on one path. Returns (ms per step, peak CUDA MiB or None, check losses, switches)."""
    switches = dm.fast_path(device)
    if not fast:
        switches = {k: False for k in switches}
    cudnn_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = switches["cudnn_benchmark"]
    state = dm.init_state(cfg, device, fast=fast)
    # The loss check: init_state seeded the weights, and the same seed gives the same batch, gamma, eps
    # and slot swaps (both paths draw the same random numbers in the same order). Dropout is off for
    # this one step: its masks depend on the memory layout, not only on the seed.
    # At step 0 alpha = 0, so this step changes G only through L_Res.
    state.D.eval()
    torch.manual_seed(cfg.seed + 1)
    parts = dm.train_step(state, data)
    losses = {k: float(parts[k]) for k in ("loss_res", "loss_dif")}                # host sync: fine, untimed
    state.D.train()
    for _ in range(warmup):                                                         # cuDNN tuning and
        dm.train_step(state, data)                                                  # allocator growth
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        dm.train_step(state, data)
    _sync(device)
    ms = (time.perf_counter() - t0) / steps * 1e3
    peak = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else None
    torch.backends.cudnn.benchmark = cudnn_before
    del state                                                                       # free memory for the next path
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms, peak, losses, switches


def bench(cfg, batches=None, size=None, steps=20, warmup=None, label=None, log=print):
    """Throughput of one DA training step (Algorithm A: G on both domains, both eps_theta passes, one
    backward through both networks, the Adam step and the EMA), timed after a warm-up, for the fast
    path (cfg.precision, channels_last, fused Adam, cuDNN autotuning) and for the plain
    fp32 eager path, in the same process, on the same data and the same initial weights.
    batches: batch sizes to time (default [cfg.batch_size]); size: patch side in px (default
    cfg.patch_size); steps: timed steps per path; warmup: untimed steps after the (also untimed) loss
    check step (default 5 on CUDA for cuDNN tuning, 1 elsewhere).
    Logs one JSON line per (batch, path) with: path, device, precision, channels_last, fused_adam,
    cudnn_benchmark, batch, size, steps, warmup, ms_per_step, pairs_per_s (synthetic pairs per
    second; each comes with one real image), peak_mem_mb (CUDA max_memory_allocated over the timed
    steps; null on CPU), max_rss_mb (this process's peak resident memory so far), params_restorer,
    params_denoiser, loss_res, loss_dif (the check step's losses). The fast line adds speedup (its
    pairs/s over the fp32 line's), loss_max_rel_diff, loss_rtol and losses_agree. Returns the rows."""
    device = dm.pick_device(cfg.device)
    batches = list(batches or [cfg.batch_size])
    size = size or cfg.patch_size
    warmup = (5 if device.type == "cuda" else 1) if warmup is None else warmup
    precision = "bf16" if dm.pick_precision(cfg.precision, device) else "fp32"
    G, D = dm.make_networks(cfg)
    counts = {"params_restorer": dm.n_params(G), "params_denoiser": dm.n_params(D)}
    del G, D
    dev_name = (f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                else f"{device.type} ({torch.get_num_threads()} threads)")
    log(f"parameters: restorer G {counts['params_restorer']:,}, denoiser eps_theta {counts['params_denoiser']:,}")
    rows = []
    for B in batches:
        n = max(16, 2 * B)                            # small pools: the bench times the step, not the data
        bcfg = dataclasses.replace(cfg, method="da", batch_size=B, patch_size=size, image_size=size,
                                   n_syn=n, n_real=n, n_test=1).validate()
        data = dm.make_data(bcfg, device)
        by_path = {}
        for path, pcfg, fast in (("fp32-eager", dataclasses.replace(bcfg, precision="fp32"), False),
                                 ("fast", bcfg, True)):
            ms, peak, losses, sw = _bench_path(pcfg, data, device, fast, steps, warmup)
            row = {"bench": "da_train_step", "preset": label, "path": path, "device": dev_name,
                   "precision": "fp32" if not fast else precision, **sw, "batch": B, "size": size,
                   "steps": steps, "warmup": warmup, "ms_per_step": round(ms, 3),
                   "pairs_per_s": float(f"{B / ms * 1e3:.4g}"), "peak_mem_mb": peak, "max_rss_mb": _max_rss_mb(),
                   **counts, **losses}
            by_path[path] = row
        slow, fast_row = by_path["fp32-eager"], by_path["fast"]
        diff, ok = loss_agreement({k: slow[k] for k in ("loss_res", "loss_dif")},
                                  {k: fast_row[k] for k in ("loss_res", "loss_dif")})
        fast_row.update(speedup=float(f"{slow['ms_per_step'] / fast_row['ms_per_step']:.4g}"),    # = pairs/s ratio
                        loss_max_rel_diff=diff, loss_rtol=1e-2, losses_agree=ok)
        for row in (slow, fast_row):
            log(json.dumps(row))
        log(f"batch {B}, {size} px, {dev_name}: fp32 eager {slow['ms_per_step']:.1f} ms/step "
            f"({slow['pairs_per_s']:.3g} pairs/s); fast ({precision}) "
            f"{fast_row['ms_per_step']:.1f} ms/step ({fast_row['pairs_per_s']:.3g} pairs/s): "
            f"{fast_row['speedup']:.2f}x; losses {'agree' if ok else 'DISAGREE'} (max relative difference {diff:.1e})")
        rows += [slow, fast_row]
    return rows


def profile(cfg, steps=20, rows=12, log=print):
    """Where one DA training step spends its time: torch.profiler over `steps` steps (after 2 untimed ones) on the
    config's sizes and device; logs ms per step and the top `rows` operators by their own (self) time. Returns
    ms per step."""
    device = dm.pick_device(cfg.device)
    pcfg = dataclasses.replace(cfg, method="da", n_syn=64, n_real=64, n_test=1).validate()
    data = dm.make_data(pcfg, device)
    state = dm.init_state(pcfg, device)
    for _ in range(2):
        dm.train_step(state, data)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            dm.train_step(state, data)
        _sync(device)
    ms = (time.perf_counter() - t0) / steps * 1e3
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(f"DA step, batch {pcfg.batch_size}, {pcfg.patch_size} px, {device.type} ({torch.get_num_threads()} threads): "
        f"{ms:.1f} ms/step under the profiler")
    log(prof.key_averages().table(sort_by=key, row_limit=rows))
    return ms


REPRO_RUNS = {                    # name -> environment changes: what differs between two machines with one torch build
    "default": {},
    "default, again": {},
    "1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "other CPU kernels": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},   # no AVX
}


def repro(argv, log=print):
    """Is a run reproducible, and what changes its numbers? Trains the same config (dada_min.py flags in argv, e.g.
    --method da --steps 100) in a fresh process per REPRO_RUNS entry and logs, per run, the final real-like and
    synthetic PSNR and the largest weight difference from the first run. Returns {name: (real, syn, max diff)}."""
    import os
    import subprocess
    import tempfile
    code = ("import sys, torch, dada_min as dm\n"
            "cfg = dm.parse_config(dm.parse_args(dm.build_parser(), sys.argv[2:]))\n"
            "s = dm.train(cfg, log=lambda m: None)\n"
            "torch.save({'w': s.G_eval.state_dict(), 'real': s.history['real_psnr'][-1],\n"
            "            'syn': s.history['syn_psnr'][-1]}, sys.argv[1])")
    here, rows = os.path.dirname(os.path.abspath(__file__)), {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, env) in enumerate(REPRO_RUNS.items()):
            path = os.path.join(tmp, f"{i}.pt")
            subprocess.run([sys.executable, "-c", code, path, *argv], cwd=here, env={**os.environ, **env}, check=True)
            r = torch.load(path, weights_only=True)
            ref = ref if i else r
            diff = max((r["w"][k] - ref["w"][k]).abs().max().item() for k in r["w"])
            rows[name] = (r["real"], r["syn"], diff)
            log(f"{name:20s} real-like PSNR {r['real']:.4f} dB, synthetic {r['syn']:.4f} dB, "
                f"max weight difference from the first run {diff:.3g}  {env or ''}")
    return rows


def _int_list(text):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects integers separated by commas, e.g. 3,16; got {text!r}") from None


def build_parser():
    p = dm.config_parser("bench.py", "Time one DA training step: GPU fast path vs plain fp32 (JSON lines).")
    p.add_argument("--batch", default=None, metavar="B[,B..]", type=_int_list,
                   help="batch sizes, e.g. 3,16 (default: the preset's batch_size)")
    p.add_argument("--size", default=None, metavar="PX", type=int, help="patch side (default: patch_size)")
    p.add_argument("--profile", action="store_true",
                   help="instead: profile --steps DA steps at the config's sizes, top operators by own time")
    p.add_argument("--repro", action="store_true", help="instead: train the config (e.g. --method da --steps 100) in "
                   "fresh processes, twice as is, with 1 thread and with other CPU kernels; compare the results")
    return p


def main(argv=None):
    parser = build_parser()
    args = dm.parse_args(parser, argv)
    try:
        cfg = dm.parse_config(args)
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        if args.repro:
            repro([a for a in (argv if argv is not None else sys.argv[1:]) if a != "--repro"])
        elif args.profile:
            profile(cfg, steps=args.cfg_steps or 20)
        else:
            bench(cfg, args.batch, args.size, steps=args.cfg_steps or 20, label=args.preset)
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
