"""The setup the five walkthrough notebooks share: find and import dada_min, pick the device, seed everything,
choose the sizes, and keep finished runs so that a rerun loads them instead of training again.

Each notebook's first code cell imports what it uses from here and calls setup() once:

    from nb_setup import dm, device, QUICK, by_mode, run_dir, show, setup
    cfg = setup("03_denoising_as_adaptation", start=True)

Modes: DADA_QUICK=1 (what the tests run): the tiny preset and a handful of steps, seconds on a CPU. Otherwise
the gpu preset on CUDA and the cpu-demo preset elsewhere. DADA_RUNS moves the run cache (default runs/notebooks).

`python notebooks/nb_setup.py --render [NAME ...]` runs the notebooks in full mode (fresh runs, nothing loaded from
the cache) and writes executed copies with their outputs to docs/notebooks/, printing each one's wall time.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch

# the repository root is the first folder at or above this file's that holds dada_min.py
ROOT = next((p for p in pathlib.Path(__file__).resolve().parents if (p / "dada_min.py").is_file()), None)
if ROOT is None:
    raise FileNotFoundError(f"dada_min.py not found above {__file__}: keep nb_setup.py in the repository's notebooks/")
sys.path.insert(0, str(ROOT))
import dada_min as dm  # noqa: E402  (after the path is known)

QUICK = os.environ.get("DADA_QUICK") == "1"         # CI mode: tiny images, a handful of steps
device = dm.pick_device("auto")                    # cuda > mps > cpu
SEED = 0
# GPU: larger images, more steps and mixed precision (Config.precision "auto" means bf16 on CUDA).
# CPU: the cpu-demo sizes, which finish in minutes. QUICK: the tiny test sizes.
PRESET = "tiny" if QUICK else ("gpu" if device.type == "cuda" else "cpu-demo")
# Where G starts in the notebooks that adapt a restorer (setup(..., start=True)). Full mode: the shipped,
# converged synthetic-only restorer (data/start-awgn*.pt). It exists for the cpu-demo restorer sizes only, so
# the GPU preset keeps that restorer. QUICK: tiny networks, trained from scratch (a fresh G is the identity map).
START = "scratch" if QUICK else "shipped"
# Training cells load a finished checkpoint when there is one, else train. The folder name holds a hash of
# the config, so changing a setting trains anew instead of loading a stale run.
RUNS = pathlib.Path(os.environ.get("DADA_RUNS", ROOT / "runs" / "notebooks"))
NOTEBOOK = None                                    # set by setup(): the runs of each notebook get their own folder


@torch.no_grad()
def ddpm_sample(schedule, denoiser, cond, stride=1):
    """Ancestral DDPM sampling of y0 given cond = cat[c1, c2] (B, 6, H, W) with a dm.NoiseSchedule, for notebook 02's
    exercise: what has a trained denoiser learned? (The method never samples: eps_theta only trains G.)"""
    ac_all = schedule.alphas_cumprod
    ts = list(range(schedule.T - 1, -1, -stride))                                # stride > 1: a respaced DDPM
    y = torch.randn(cond.shape[0], 3, *cond.shape[2:], device=cond.device)     # (B, 3, H, W)
    for i, t in enumerate(ts):
        ac = ac_all[t]
        ac_prev = ac_all[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(ac)
        alpha = ac / ac_prev                                                    # this (respaced) step's 1 - beta
        eps = denoiser(torch.cat([y, cond], 1), ac.expand(y.shape[0])).float()    # gamma = abar_t
        mean = (y - (1 - alpha) / (1 - ac).sqrt() * eps) / alpha.sqrt()
        var = (1 - alpha) * (1 - ac_prev) / (1 - ac)                            # 0 at the last step
        y = mean + var.sqrt() * torch.randn_like(y) if i + 1 < len(ts) else mean  # no noise at the last step
    return y


def seed_everything(seed=SEED):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)                        # also seeds every CUDA device


def setup(notebook, start=False, **overrides):
    """Seed everything, print the device and mode, and return the notebook's config: the mode's preset on
    this device, then `overrides`. start=True: G starts from START (see above)."""
    global NOTEBOOK
    NOTEBOOK = notebook
    seed_everything()
    if start:
        overrides = dict(start=START, **(dict(r_width=dm.Config.r_width, r_depth=dm.Config.r_depth)
                                         if PRESET == "gpu" else {}), **overrides)
    cfg = dm.make_config(PRESET, device=device.type, precision="auto", seed=SEED, **overrides,
                         **(dict(steps=8, eval_every=4, log_every=4) if QUICK else {}))
    amp_dtype = dm.pick_precision(cfg.precision, device)
    runs = RUNS.relative_to(ROOT) if RUNS.is_relative_to(ROOT) else RUNS
    print(f"device: {device} | preset: {PRESET} | quick mode: {QUICK} | autocast: {amp_dtype} | runs under: {runs}")
    if start:
        print(f"real-like domain: {cfg.real_noise} | synthetic AWGN: sigma <= {cfg.sigma_max:g} | "
              f"G starts from: {cfg.start}")
    return cfg


def by_mode(quick, cpu, gpu):
    """One number per mode, e.g. training steps: by_mode(quick=20, cpu=1200, gpu=6000)."""
    return quick if QUICK else (gpu if PRESET == "gpu" else cpu)


def run_dir(cfg, name):
    """The folder of this notebook's run `name` with config cfg: RUNS/NOTEBOOK/NAME-HASH."""
    h = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return str(RUNS / NOTEBOOK / f"{name}-{h}")


def show(images, titles=None, size=2.6, cols=None):
    """Show (N, 3, H, W) images in [0, 1], nearest-neighbour so single noisy pixels stay visible."""
    images = images.detach().float().clamp(0, 1).cpu()
    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    plt.show()


# ----------------------------------------------------------------------------------------------------------
# Executed copies for reading before running (docs/notebooks/)
# ----------------------------------------------------------------------------------------------------------
def shrink_images(nb, max_width=720, max_png_bytes=60_000):
    """Downscale every image output wider than max_width px, and store the large ones (noisy images compress badly
    as PNG) as JPEG, so an executed copy stays small enough to browse."""
    import base64
    import io
    from PIL import Image
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" not in data:
                continue
            raw = base64.b64decode(data["image/png"])
            img = Image.open(io.BytesIO(raw))
            if img.width <= max_width and len(raw) <= max_png_bytes:
                continue
            if img.width > max_width:
                img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
            buf = io.BytesIO()
            if len(raw) > max_png_bytes:
                img.convert("RGB").save(buf, format="JPEG", quality=85)
                del data["image/png"]
                data["image/jpeg"] = base64.b64encode(buf.getvalue()).decode()
            else:
                img.save(buf, format="PNG", optimize=True)
                data["image/png"] = base64.b64encode(buf.getvalue()).decode()
            out.get("metadata", {}).pop("image/png", None)                      # its old size no longer holds
    return nb


def header_with_time(header, seconds):
    """The notebook header's 'Full mode: about N min on a K-core CPU; GPU: ...' with this run's time (rounded to
    half minutes) on this machine: the CPU part from a CPU run, the GPU part from a CUDA run."""
    import re
    t = f"about {max(0.5, round(seconds / 30) / 2):g} min"
    if device.type == "cuda":
        return re.sub(r"GPU: [^.]*\.", f"GPU: {t} ({torch.cuda.get_device_name(device)}).", header, count=1)
    return re.sub(r"Full mode: about [0-9.]+ min on an? [0-9]+-core CPU", f"Full mode: {t} on a {os.cpu_count()}-core CPU",
                  header, count=1)


def render(names=None, out=None, quick=False, log=print):
    """Execute the walkthrough notebooks top to bottom in full mode (quick=True: quick mode, for the tests), each
    with a fresh run cache (so the time includes all training), write the executed copies to `out` (default
    docs/notebooks/) and, in full mode, the measured time into each header (source and copy). Returns
    {name: wall seconds}; each copy records its time, device and torch version in its metadata["dada_min"]."""
    import shutil
    import tempfile
    import time
    import nbclient
    import nbformat
    out = pathlib.Path(out or ROOT / "docs" / "notebooks")
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted((ROOT / "notebooks").glob("0*.ipynb"))
    if names:
        unknown = set(names) - {p.stem for p in paths}
        if unknown:
            raise SystemExit(f"unknown notebook(s) {sorted(unknown)}; choose from {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem in names]
    times = {}
    for path in paths:
        runs = pathlib.Path(tempfile.mkdtemp(prefix="render-", dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None))
        env = {"DADA_RUNS": str(runs), "DADA_QUICK": "1" if quick else "0"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)                                                  # the kernel inherits them
        log(f"[render] {path.stem}: executing in {'quick' if quick else 'full'} mode ...")
        nb = nbformat.read(path, as_version=4)
        t0 = time.time()
        try:
            nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", record_timing=False,
                                    resources={"metadata": {"path": str(path.parent)}}).execute()
        finally:
            for k, v in old.items():                                            # restore the caller's environment
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(runs, ignore_errors=True)
        times[path.stem] = time.time() - t0
        nb.metadata["dada_min"] = {"wall_seconds": round(times[path.stem], 1), "quick": quick, "device": str(device),
                                   "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(),
                                   "torch": torch.__version__}
        if not quick:                                   # the header states what this run measured, in both copies
            source = nbformat.read(path, as_version=4)
            for book in (source, nb):
                book.cells[0].source = header_with_time(book.cells[0].source, times[path.stem])
            nbformat.write(source, path)
        nbformat.write(shrink_images(nb), out / path.name)
        log(f"[render] {path.stem}: {times[path.stem] / 60:.1f} min wall on {device} -> {out / path.name} "
            f"({(out / path.name).stat().st_size / 1e3:.0f} kB)")
    return times


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python notebooks/nb_setup.py",
                                description="Write executed copies of the walkthrough notebooks (full mode).")
    p.add_argument("--render", nargs="*", metavar="NAME", required=True,
                   help="notebooks to run (default: all five), e.g. 03_denoising_as_adaptation")
    p.add_argument("--out", default=None, help="folder of the executed copies (default: docs/notebooks)")
    args = p.parse_args()
    render(args.render or None, args.out)
