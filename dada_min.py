"""dada-min: Denoising as Adaptation, in one readable file.

Implements "Denoising as Adaptation: Noise-Space Domain Adaptation for Image Restoration" (Liao, Yue, Wang, Loy;
ICLR 2025, arXiv 2406.18516).

The idea in four lines:
  1. A restorer G (residual UNet, y_hat = x + R(x)) is trained on synthetic pairs (x_syn, y_syn).
  2. A conditional diffusion denoiser eps_theta is trained *jointly* on noised synthetic targets,
     conditioned on BOTH restored images (y_syn_hat, y_real_hat); its loss flows back into G.
  3. Two tricks stop shortcuts: channel shuffle (random per-sample swap of the two condition slots)
     and residual-swapping contrastive learning (negatives x_syn + R_real and x_real + R_syn).
  4. At test time the denoiser is thrown away: restoring is one pass of G.

Sections, top to bottom: config -> built-in data (TASKS) -> networks -> noise schedule -> the two anti-shortcut tricks
-> losses -> training -> checkpoints -> inference -> metrics -> demo -> CLI. "Algorithm A" is the joint training
(Sec. 3) as the official code runs it (Noise-DA, diff_flag=1); "Algorithm B" its variant "Ours-Ex" (diff_flag=2).

    python dada_min.py --demo          # vanilla vs DA vs oracle from the shipped start (~3 min on 2 CPU cores)
    python dada_min.py --method da --steps 600 --out runs/da     # train one method on built-in data

The harness imports this file (never the reverse): folders.py, experiments.py, baselines.py, bench.py.
"""

import argparse
import contextlib
import copy
import dataclasses
import difflib
import functools
import inspect
import json
import math
import numbers
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
METHODS = {
    # name:        (diffusion loss?, channel shuffle?, contrastive?, diffusion input, conditions)
    "vanilla":     (False, False, False, None, None),       # G on synthetic pairs only (the paper's "Vanilla")
    "da":          (True, True, True, "syn", "both"),       # the paper's full method (Sec. 3), Algorithm A
    "no_shuffle":  (True, False, True, "syn", "both"),      # ablation: without channel shuffle (CS)
    "no_contrast": (True, True, False, "syn", "both"),      # ablation: without residual swapping (RS)
    "naive":       (True, False, False, "syn", "both"),     # naive joint training, Table 4 (d)
    "da_ex":       (True, True, False, "ref", "both"),      # "Ours-Ex": noise an unpaired clean image, CS only
    "oracle":      (False, False, False, None, None),       # G on REAL pairs (unseen by the method): upper bound
    # Table 4's last two rows; the paper does not say how they were built, so this is our reading:
    "only_syn":    (True, False, False, "syn", "syn"),      # both slots y_syn_hat: real images never reach eps_theta
    "only_real":   (True, False, False, "syn", "real"),     # both slots y_real_hat, unrelated to the noised y_syn
}


# NOTE(simplification): the defaults are the cpu-demo scale, a minute a run on a laptop CPU: G ~0.13M parameters (not
# 8.56M), eps_theta ~0.2M (not ~62M), no dropout, 32 px crops, 10x the learning rate; `paper` has the official sizes.
@dataclass
class Config:
    # --- run ---
    method: str = "da"            # what to train, one of METHODS: vanilla | da | oracle | ablations (+ baselines.py's)
    task: str = "denoise"         # restoration task: denoise | derain | deblur (each has built-in domains)
    seed: int = 0                 # seeds data generation, initialisation and sampling
    device: str = "auto"          # auto (cuda > mps > cpu) | cpu | cuda | mps
    precision: str = "auto"       # auto (bf16 on CUDA GPUs of compute capability >= 8, else fp32) | fp32 | bf16
    # --- built-in data (all images in [0, 1], as the official denoising config) ---
    image_size: int = 48          # side of each generated clean image, px
    world: str = "phone"          # built-in clean images, one of WORLDS: phone (phone photos) | natural | dead-leaves
    patch_size: int = 32          # side of the random training crops, px
    n_syn: int = 512              # clean images behind the synthetic training pairs
    n_real: int = 512             # unpaired real-like training images (from OTHER clean images)
    n_test: int = 64              # images in each of the synthetic and real-like test sets
    real_noise: str = "auto"      # real-like domain in TASKS[task]["real"], auto: the first (denoise: white | camera)
    sigma_max: float = None       # AWGN sigma ~ U[0, sigma_max]/255 (paper: 75); None: the one paired with real_noise
    # --- restorer G (residual UNet) ---
    restorer: str = "unet"        # G's architecture, one of RESTORERS: unet (a new one is one entry there)
    r_width: int = 16             # channels at the first level (paper: 64)
    r_depth: int = 3              # UNet levels; inputs are padded to a multiple of 2^(depth-1) (paper: 4)
    r_zero_head: bool = True      # G's last conv starts at zero (a fresh G is the identity); false: Kaiming (official)
    start: str = "auto"           # G's start: shipped (data/, the world's and sigma_max's; STARTS) | scratch
                                  # | a checkpoint.pt PATH; auto: shipped where one fits (start_matches), else scratch
    # --- conditional denoiser eps_theta ---
    d_width: int = 16             # base channels (paper: 64)
    d_mults: tuple = (1, 2)       # channel multiplier per level (paper: 1,2,4,8)
    d_res_blocks: int = 1         # residual blocks per level (paper: 2)
    d_attn: bool = False          # self-attention at the bottleneck (paper: yes)
    d_dropout: float = 0.0        # dropout inside residual blocks (paper: 0.2)
    # --- noise schedule (DDPM; the official configs' linear schedule) ---
    T: int = 1000                 # diffusion steps
    beta_start: float = 1e-6      # first beta of the linear schedule
    beta_end: float = 1e-2        # last beta of the linear schedule
    t_min: int = 1                # training draws t ~ U{t_min..t_max} (Table 4 ablates this range)
    t_max: int = 999              # at most T-1 (gamma is drawn between alphas_cumprod[t] and [t-1])
    # --- the method ---
    alpha_max: float = 0.2        # final weight of the diffusion loss (official diff_weight)
    ramp_frac: float = 0.5        # fraction of training over which alpha ramps up (official: 300 epochs)
    margin: float = 0.1           # triplet hinge margin, Eq. (3) (official: 0.1)
    d_warmup: int = 0             # steps of eps_theta alone (G frozen) before alpha ramps, as early in a long ramp
    # --- optimisation ---
    steps: int = 400              # training steps
    batch_size: int = 16          # synthetic pairs (and as many real images) per step and process (torchrun: x N)
    lr: float = 1e-3              # Adam learning rate, constant, shared by G and eps_theta (paper: 1e-4)
    ema_decay: float = 0.995      # decay of the EMA of G's weights, in [0, 1) (official: 0.9999)
    ema_warmup: bool = True       # warm the decay up as min(ema_decay, (1 + step) / (10 + step)); false: constant
    eval_ema: bool = True         # evaluate, save for restore and start from the EMA of G; false: the raw G (official)
    # NOTE(simplification): official: a constant-decay EMA, the raw G scored (so the `paper` preset); short runs are
    # noisy and a 0.9999 EMA would lag them by 10,000 steps, so the small presets warm the decay up and score the EMA.
    eval_every: int = 100         # evaluate PSNR and the mechanism diagnostic every N steps (0: only at the end)
    log_every: int = 100          # print losses every N steps

    def validate(self):
        """Reject values that would fail later with an obscure error."""
        def bad(name, why):
            raise ValueError(f"config: {name}={getattr(self, name)!r} {why}")
        if self.method not in METHODS:
            bad("method", f"is not one of {sorted(METHODS)} (the baselines dann and pixel_da: import baselines)")
        if self.task not in TASKS:
            bad("task", f"is not one of {sorted(TASKS)}")
        if self.real_noise == "auto":                   # resolved once, so checkpoints record the real name
            self.real_noise = next(iter(TASKS[self.task]["real"]))
        if self.real_noise not in TASKS[self.task]["real"]:
            bad("real_noise", f"is not one of {sorted(TASKS[self.task]['real'])} (or auto) for task {self.task!r}")
        if self.sigma_max is None:                      # resolved once, like real_noise
            self.sigma_max = TASKS[self.task].get("sigma_max", {}).get(self.real_noise, 75.0)
        for name, table in (("world", WORLDS), ("restorer", RESTORERS)):
            if getattr(self, name) not in table:
                bad(name, f"is not one of {sorted(table)}")
        if self.start == "auto":                        # resolved once, so checkpoints record the choice
            self.start = "shipped" if start_matches(self) else "scratch"
        if self.start == "shipped" and not start_matches(self):
            bad("start", f"shipped starts exist for task denoise with (world, sigma_max) in {sorted(STARTS)} and restorer="
                         f"{Config.restorer}, r_width={Config.r_width}, r_depth={Config.r_depth} only; use start=scratch or a checkpoint path")
        if self.start not in ("shipped", "scratch") and not os.path.isfile(self.start):
            bad("start", "must be auto, shipped, scratch or the path of an existing checkpoint.pt")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", "must be auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            bad("device", "must be auto, cpu, cuda, cuda:N or mps")
        # numbers: finite (NaN/inf compare False with everything and would slip through), integers in int fields
        rules = [(("image_size", "patch_size", "n_syn", "n_real", "n_test", "r_width", "r_depth", "d_width",
                   "d_res_blocks", "t_min", "t_max", "steps", "batch_size", "log_every"), lambda v: v >= 1, ">= 1"),
                 (("eval_every",), lambda v: v >= 0, ">= 0 (0: evaluate only at the end)"),
                 (("T",), lambda v: v >= 2, ">= 2"), (("seed",), lambda v: True, ""),
                 (("sigma_max", "alpha_max", "margin", "d_warmup"), lambda v: v >= 0, ">= 0"),
                 (("lr",), lambda v: v > 0, "> 0"),
                 (("ramp_frac",), lambda v: 0 < v <= 1, "in (0, 1]"),
                 (("ema_decay", "d_dropout"), lambda v: 0 <= v < 1, "in [0, 1)"),
                 (("beta_start", "beta_end"), lambda v: 0 < v < 1, "in (0, 1)")]
        ints = {f.name for f in dataclasses.fields(self) if f.type in (int, "int")}
        for names, ok, rule in rules:
            for name in names:
                v = getattr(self, name)
                number = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                if not number or (name in ints and not isinstance(v, numbers.Integral)) or not ok(v):
                    bad(name, f"must be {'an integer' if name in ints else 'a finite number'} {rule}".rstrip())
        if self.beta_start >= self.beta_end:
            bad("beta_end", f"must be > beta_start ({self.beta_start}): the linear schedule rises")
        mults = self.d_mults if isinstance(self.d_mults, (tuple, list)) else ()
        if not mults or not all(isinstance(m, numbers.Integral) and m >= 1 for m in mults):
            bad("d_mults", "must be one or more integers >= 1, e.g. 1,2")
        if self.patch_size > self.image_size:
            bad("patch_size", f"must be <= image_size ({self.image_size})")
        if self.patch_size % 2 ** (self.r_depth - 1) or self.patch_size % 2 ** (len(self.d_mults) - 1):
            bad("patch_size", "must be divisible by 2^(r_depth-1) and 2^(len(d_mults)-1)")
        if not 1 <= self.t_min <= self.t_max <= self.T - 1:
            bad("t_max", f"needs 1 <= t_min ({self.t_min}) <= t_max <= T-1 ({self.T - 1})")
        return self


PRESETS = {
    "cpu-demo": dict(),                      # `--demo` (three trainings) in about 3 minutes on 2 CPU cores
    "tiny": dict(image_size=32, patch_size=16, n_syn=32, n_real=32, n_test=8, r_width=8, r_depth=2, d_width=8,
                 d_mults=(1, 2), steps=20, batch_size=4, eval_every=10, log_every=10),  # seconds: the tests, CI
    "gpu": dict(image_size=96, patch_size=64, n_syn=4096, n_real=4096, n_test=128, r_width=32, r_depth=4,
                d_width=64, d_mults=(1, 2, 4), d_res_blocks=2, steps=6000, batch_size=32, lr=5e-4,
                ema_decay=0.999, eval_every=1000, log_every=250),                       # one GPU, minutes
    # The official sizes (official code: models/net/UNet.py and the guided-diffusion UNet), 128 px patches, lr 1e-4:
    # G 8,559,171 and eps_theta 62,643,075 parameters, the official networks layer for layer (bench.py prints them).
    "paper": dict(image_size=160, patch_size=128, n_syn=1024, n_real=1024, n_test=64, sigma_max=75.0, r_width=64,
                  r_depth=4, r_zero_head=False, d_width=64, d_mults=(1, 2, 4, 8), d_res_blocks=2, d_attn=True,
                  d_dropout=0.2, batch_size=3, lr=1e-4, ema_decay=0.9999, ema_warmup=False, eval_ema=False,
                  steps=100000, eval_every=5000, log_every=500),
}


# NOTE(simplification): the shipped starts. The official alpha ramp spans 300 epochs (~1e5 steps), so G is a converged
# synthetic denoiser long before the diffusion loss weighs anything: dada-min ships such restorers (vanilla, 6000
# steps, cpu-demo sizes; `python experiments.py --make-start`), one per clean world and synthetic range.
STARTS = {("natural", 15.0): "start-awgn15.pt", ("natural", 75.0): "start-awgn75.pt",        # (world, sigma_max)
          ("dead-leaves", 15.0): "start-awgn15-dead-leaves.pt", ("dead-leaves", 75.0): "start-awgn75-dead-leaves.pt",
          ("phone", 15.0): "start-awgn15-phone.pt", ("phone", 75.0): "start-awgn75-phone.pt"}


def start_path(world, sigma_max):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", STARTS[world, sigma_max])


def start_matches(cfg):
    """Whether a shipped start fits cfg: denoising, a shipped world and range, the cpu-demo restorer sizes."""
    return (cfg.task == "denoise" and (cfg.world, cfg.sigma_max) in STARTS
            and os.path.isfile(start_path(cfg.world, cfg.sigma_max))
            and (cfg.restorer, cfg.r_width, cfg.r_depth) == (Config.restorer, Config.r_width, Config.r_depth))


def make_config(preset="cpu-demo", **overrides):
    """A validated Config: the preset's values, then the overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in dataclasses.fields(Config)}
    if unknown := sorted(set(overrides) - names):
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
    return Config(**{**PRESETS[preset], **overrides}).validate()


# ----------------------------------------------------------------------------------------------------------
# Data: clean images, the two degradations, four pools
# ----------------------------------------------------------------------------------------------------------
# NOTE(simplification): clean images come from a generator (WORLDS) instead of DIV2K/Flickr2K/WED/BSD, the real-like
# sets from a simulated camera instead of SIDD: no download, and a known real-like ground truth (oracle, diagnostic).
def dead_leaves(n, size, gen, n_discs=250, min_radius=3.0, device="cpu", chunk=32):
    """Sharp clean images (world=dead-leaves): occluding discs, radii ~ r^-3 (scale-invariant), each gently shaded,
    rendered at 2x and box-downsampled; `gen` draws on the CPU (same images on every device). (n, 3, s, s)."""
    s = 2 * size
    r_min, r_max = 2.0 * min_radius, s / 2    # render px; min_radius keeps detail distinguishable from noise for tiny G
    u = torch.rand(n, n_discs, generator=gen)                # inverse-CDF sampling of p(r) ~ r^-3 on [r_min, r_max]
    radius = ((r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5).to(device)   # (n, K)
    centre = (torch.rand(n, n_discs, 2, generator=gen) * s).to(device)              # (n, K, 2) as (y, x)
    colour = (torch.rand(n, n_discs, 3, generator=gen) ** 1.5).to(device)           # (n, K, 3), darker bias
    slope = ((torch.rand(n, n_discs, 2, generator=gen) - 0.5) * 0.6 / s).to(device) # (n, K, 2) shading
    background = torch.rand(n, 3, generator=gen).to(device)                         # (n, 3)
    ar = torch.arange(s, dtype=torch.float32, device=device)
    yx = torch.stack(torch.meshgrid(ar, ar, indexing="ij"), -1).view(1, s * s, 2)  # (1, s*s, 2) pixel coords
    out = []
    for i in range(0, n, chunk):                  # chunks bound the (m, K, s, s) memory
        dy = ar.view(1, 1, s, 1) - centre[i:i + chunk, :, 0, None, None]            # (m, K, s, 1)
        dx = ar.view(1, 1, 1, s) - centre[i:i + chunk, :, 1, None, None]            # (m, K, 1, s)
        inside = (dy ** 2 + dx ** 2 < radius[i:i + chunk, :, None, None] ** 2).flatten(2)   # (m, K, s*s)
        front = torch.full(inside[:, 0].shape, n_discs)  # (m, s*s): the FIRST disc over each pixel, K where none:
        for k in range(n_discs - 1, -1, -1):            # painted from the last disc to the first (faster than argmax)
            front = torch.where(inside[:, k], k, front)
        slope_px, centre_px, colour_px = (torch.take_along_dim(v[i:i + chunk], front.clamp(max=n_discs - 1)[..., None],
                                                               1) for v in (slope, centre, colour))   # its parameters
        shade = 1 + (slope_px * (yx - centre_px)).sum(-1, keepdim=True)             # (m, s*s, 1)
        img = torch.where((front < n_discs)[..., None], colour_px * shade, background[i:i + chunk, None])
        out.append(img.view(-1, s, s, 3).permute(0, 3, 1, 2))                       # (m, 3, s, s)
    return F.avg_pool2d(torch.cat(out), 2).clamp(0, 1)


def soft_leaves(n, size, gen, n_discs=250, min_radius=3.0, contrast=0.44, lens=0.0, texture=0.04, device="cpu"):
    """Dead leaves made photo-like: pulled towards each image's mean colour by `contrast`, softened by a Gaussian lens
    of `lens` px (0: none), times a 1/f luminance grain of std `texture`. Two worlds, chosen by statistics (below)."""
    x = dead_leaves(n, size, gen, n_discs=n_discs, min_radius=min_radius)          # (n, 3, s, s)
    mean = x.mean((2, 3), keepdim=True)                                             # (n, 3, 1, 1)
    x = mean + contrast * (x - mean)
    if lens:
        x = blur(x, gaussian_kernels(torch.full((n,), float(lens)), int(2 * math.ceil(3 * lens) + 1)))   # +-3 sigma
    f = torch.fft.fftfreq(size)
    radius = torch.sqrt(f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).clamp(min=1 / size)   # (s, s) cycles per px
    grain = torch.fft.ifft2(torch.fft.fft2(torch.randn(n, 1, size, size, generator=gen)) / radius).real
    grain = grain / grain.std((2, 3), keepdim=True)                                 # (n, 1, s, s), unit std
    return (x * (1 + texture * grain)).clamp(0, 1).to(device)


# world=natural (docs/effect.md): a 48 px tile of a textured photograph. 32 px crops: hf 0.0025, edge share 0.056, slope
# -2.71 (McMaster photographs: 0.0024, 0.084, -2.70; the sharp dead leaves: 0.0123, 0.208, -2.77).
natural_leaves = soft_leaves
# world=phone (docs/effect.md): a phone's pixels are small against what they see: a few large soft shapes per 48 px.
# hf 0.00027, edges 0.0105, slope -2.89 (SIDD / PolyU / Nam ground truths: 0.00012-0.00032, 0.006-0.017, -2.3/-2.9).
phone_leaves = functools.partial(soft_leaves, n_discs=100, min_radius=14.0, contrast=1.0, lens=2.0, texture=0.02)

WORLDS = {"natural": natural_leaves, "dead-leaves": dead_leaves, "phone": phone_leaves}   # Config.world -> generator


def add_awgn(y, sigma_max, gen=None):
    """Synthetic degradation: x = y + N(0, sigma^2), sigma ~ U[0, sigma_max]/255 per image, unclipped (as official)."""
    sigma = torch.rand(y.shape[0], 1, 1, 1, generator=gen, device=y.device) * sigma_max / 255
    return y + sigma * torch.randn(y.shape, generator=gen, device=y.device)


# camera RGB -> linear sRGB colour-correction matrix (rows sum to 1, typical saturation boost)
CCM = torch.tensor([[1.75, -0.55, -0.20], [-0.25, 1.55, -0.30], [0.05, -0.60, 1.55]])


def camera_noise(y, gen=None, shot=(1e-3, 1e-2), read=(1e-6, 1e-4)):
    """Real-like degradation: Poisson-Gaussian noise added on a Bayer mosaic in linear camera space, then demosaiced,
    white-balanced, colour-corrected and gamma-encoded, so the sRGB noise is correlated in space and colour and depends
    on brightness. Only the noise goes through the pipeline, x = y + P(raw + n) - P(raw): the clean target stays y."""
    n, _, h, w = y.shape
    dev, ccm = y.device, CCM.to(y.device)
    masks = torch.zeros(3, h, w, device=dev)                                        # RGGB: which colour each photosite
    for c, dy, dx in ((0, 0, 0), (1, 0, 1), (1, 1, 0), (2, 1, 1)):                  # measures (R G / G B)
        masks[c, dy::2, dx::2] = 1
    k_rb = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]], device=dev) / 4
    k_g = torch.tensor([[0., 1., 0.], [1., 4., 1.], [0., 1., 0.]], device=dev) / 4
    demosaic = torch.stack([k_rb, k_g, k_rb])[:, None]                              # (3, 1, 3, 3) bilinear kernels
    a, b = (torch.exp(math.log(lo) + torch.rand(n, 1, 1, 1, generator=gen).to(dev) * math.log(hi / lo))
            for lo, hi in (shot, read))  # shot gain a, read variance b (var = a*x + b), log-uniform per image
    wb = 1.6 + 0.8 * torch.rand(n, 3, 1, 1, generator=gen).to(dev)                 # red/blue white-balance gains
    wb[:, 1] = 1.0

    def to_srgb(raw):                           # the camera's processing P: demosaic (it spreads each photosite's
        rgb = F.conv2d(F.pad(raw * masks, (1, 1, 1, 1), mode="reflect"), demosaic, groups=3)   # noise), WB, CCM,
        x = torch.einsum("ij,njhw->nihw", ccm, rgb * wb).clamp(min=0)                          # gamma
        return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp(min=1e-8) ** (1 / 2.4) - 0.055)
    lin = torch.where(y <= 0.04045, y / 12.92, ((y + 0.055) / 1.055) ** 2.4)      # sRGB -> linear
    cam = torch.einsum("ij,njhw->nihw", torch.linalg.inv(ccm), lin) / wb            # undo CCM and WB
    raw = (cam.clamp(0, 1) * masks).sum(1, keepdim=True)                            # (n, 1, h, w) mosaic
    noisy_raw = raw + torch.sqrt(a * raw + b) * torch.randn(raw.shape, generator=gen).to(dev)
    return (y + to_srgb(noisy_raw) - to_srgb(raw)).clamp(0, 1)


def white_noise(y, gen=None, sigma=(30.0, 60.0)):
    """A real-like domain with a high-frequency residual: spatially and colour-white Poisson-Gaussian noise in sRGB."""
    s = (sigma[0] + (sigma[1] - sigma[0]) * torch.rand(y.shape[0], 1, 1, 1, generator=gen, device=y.device)) / 255
    var = s ** 2 * (0.25 + 1.5 * y)          # grows with brightness; the mean of (0.25 + 1.5 y) is ~1 for y ~ U[0, 1]
    return (y + var.sqrt() * torch.randn(y.shape, generator=gen, device=y.device)).clamp(0, 1)


def correlated_noise(y, gen=None, sigma=(5.0, 15.0), width=1.0):
    """A real-like domain INSIDE the synthetic range sigma <= 15 but spatially correlated: white noise blurred by a
    Gaussian of `width` px, rescaled to a per-pixel sigma ~ U[5, 15]/255 (its energy sits at the middle frequencies)."""
    n = y.shape[0]
    s = (sigma[0] + (sigma[1] - sigma[0]) * torch.rand(n, 1, 1, 1, generator=gen, device=y.device)) / 255
    grain = blur(torch.randn(y.shape, generator=gen, device=y.device), gaussian_kernels(torch.full((n,), width), 7))
    return (y + s * grain / grain.std((2, 3), keepdim=True)).clamp(0, 1)


# --- deraining: rain streaks are a line kernel stamped at random seed points ------------------------------
def line_kernels(length, angle, width, size, taper=False):
    """(B, 1, size, size) anti-aliased line segments through the kernel centre, in [0, 1]; length, width (px), angle
    (radians from vertical, + leans right): (B,) each. taper: fade towards both ends, like a falling drop's streak."""
    ar = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    v, u = torch.meshgrid(ar, ar, indexing="ij")                                    # (size, size) down, right
    cy, cx = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)      # (B, 1, 1) line direction
    along = v * cy + u * cx                                                         # (B, size, size)
    across = (u * cy - v * cx).abs()
    half = length.view(-1, 1, 1) / 2
    dist = torch.sqrt(across ** 2 + (along.abs() - half).clamp(min=0) ** 2)        # distance to the segment
    k = (width.view(-1, 1, 1) / 2 + 0.5 - dist).clamp(0, 1)                        # 1 inside, 1 px soft edge
    if taper:
        k = k * (1 - (along / half.clamp(min=1)) ** 2).clamp(min=0)
    return k[:, None]


def uniform(n, lo, hi, gen):
    """(n,) values ~ U[lo, hi], drawn on the CPU from gen (so every device sees the same numbers)."""
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def streak_layer(n, h, w, gen, density, length, angle, width, amplitude, taper):
    """(n, 1, h, w) rain-streak layer in [0, 1]: seed points with per-pixel probability `density`, each with a
    brightness ~ U[amplitude], convolved with the image's line kernel. density, length, angle, width: (n,)."""
    size = 2 * int(math.ceil(float(length.max()) / 2 + float(width.max()))) + 1
    p = size // 2                                   # seeds on a padded canvas: streaks enter from outside the frame
    seeds = (torch.rand(n, 1, h + 2 * p, w + 2 * p, generator=gen) < density.view(-1, 1, 1, 1)).float()
    seeds = seeds * (amplitude[0] + (amplitude[1] - amplitude[0]) * torch.rand(seeds.shape, generator=gen))
    kernels = line_kernels(length, angle, width, size, taper)   # (n, 1, size, size): one per image, in a grouped conv
    return F.conv2d(seeds.view(1, n, h + 2 * p, w + 2 * p), kernels, groups=n).view(n, 1, h, w).clamp(0, 1)


def simple_rain(y, gen=None):
    """Synthetic rain: ONE layer of straight, thin (1 px), equally long streaks of one brightness and one near-vertical
    angle per image, x = y + a * S: like the rendered rain of synthetic training sets, regular and easy to learn."""
    n, _, h, w = y.shape
    S = streak_layer(n, h, w, gen, density=uniform(n, 0.004, 0.012, gen), length=uniform(n, 6, 14, gen),
                     angle=uniform(n, -0.15, 0.15, gen), width=torch.ones(n), amplitude=(1.0, 1.0), taper=False)
    a = uniform(n, 0.5, 0.9, gen).view(-1, 1, 1, 1).to(y.device)                    # streak brightness
    return (y + a * S.to(y.device)).clamp(0, 1)


def layered_rain(y, gen=None):
    """Real-like rain: two streak layers under one wind (far: dense, short, thin, faint; near: sparse, long, 1.5-3.5 px
    wide) of varying brightness, fading at their ends, screen-blended, then a veil of haze x = (1 - h) x + h A."""
    n, _, h, w = y.shape
    wind = uniform(n, -0.5, 0.5, gen)                                               # radians, shared by the layers
    far = streak_layer(n, h, w, gen, density=uniform(n, 0.01, 0.03, gen), length=uniform(n, 4, 10, gen),
                       angle=wind + uniform(n, -0.1, 0.1, gen), width=torch.ones(n), amplitude=(0.15, 0.5), taper=True)
    near = streak_layer(n, h, w, gen, density=uniform(n, 0.002, 0.006, gen), length=uniform(n, 10, 24, gen),
                        angle=wind + uniform(n, -0.1, 0.1, gen), width=uniform(n, 1.5, 3.5, gen),
                        amplitude=(0.3, 0.8), taper=True)
    x = 1 - (1 - y) * (1 - far.to(y.device)) * (1 - near.to(y.device))              # screen blend (light adds up)
    haze = uniform(n, 0.05, 0.3, gen).view(-1, 1, 1, 1).to(y.device)               # veil strength
    light = uniform(n, 0.75, 1.0, gen).view(-1, 1, 1, 1).to(y.device)              # atmospheric light A (grey)
    return ((1 - haze) * x + haze * light).clamp(0, 1)  # the target stays y: dehazing is part of the task


# --- deblurring: a blurred image is the sharp one convolved with a kernel that sums to 1 -------------------
def blur(y, kernels):
    """Convolve each image (B, 3, H, W) with its own kernel (B, 1, k, k); reflect padding keeps border brightness."""
    n, c, h, w = y.shape
    p = kernels.shape[-1] // 2
    yp = F.pad(y, (p, p, p, p), mode="reflect").reshape(1, n * c, h + 2 * p, w + 2 * p)
    k = kernels.to(y.device, y.dtype).repeat_interleave(c, 0)                       # (B*3, 1, k, k)
    return F.conv2d(yp, k, groups=n * c).view(n, c, h, w)


def gaussian_kernels(sigma, size):
    """(B, 1, size, size) isotropic Gaussian kernels, sigma: (B,) px, each summing to 1."""
    ar = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    r2 = ar.view(1, -1, 1) ** 2 + ar.view(1, 1, -1) ** 2                           # (1, size, size)
    k = torch.exp(-r2 / (2 * sigma.view(-1, 1, 1) ** 2))
    return (k / k.sum((1, 2), keepdim=True))[:, None]


def simple_blur(y, gen=None, size=11):
    """Synthetic blur: per image a Gaussian or a straight linear motion, no noise (synthetic sets' regular kernels)."""
    n = y.shape[0]
    gauss = gaussian_kernels(uniform(n, 0.4, 1.6, gen), size)
    line = line_kernels(uniform(n, 2, 8, gen), uniform(n, 0, math.pi, gen), torch.ones(n), size)
    line = line / line.sum((2, 3), keepdim=True)
    use_gauss = (torch.rand(n, generator=gen) < 0.5).view(-1, 1, 1, 1)
    return blur(y, torch.where(use_gauss, gauss, line))


def shake_kernels(n, gen, size=11, steps=48):
    """Camera-shake kernels: the path of a hand-held camera during the exposure, a random walk with momentum splatted
    bilinearly onto the kernel grid (slow parts weigh more). Returns (n, 1, size, size), each summing to 1."""
    v = torch.randn(n, 2, generator=gen)
    pos, path = torch.zeros(n, 2), []
    for _ in range(steps):                                                          # at equal time steps
        v = 0.85 * v + 0.5 * torch.randn(n, 2, generator=gen)                      # momentum + random push
        pos = pos + v
        path.append(pos)
    path = torch.stack(path, 1)                                                     # (n, steps, 2) as (y, x)
    path = path - path.mean(1, keepdim=True)                                        # centred: the image is not shifted
    extent = uniform(n, 1.5, size / 2 - 1, gen).view(-1, 1, 1)                      # px, the path's largest offset
    path = path / path.abs().amax((1, 2), keepdim=True).clamp(min=1e-6) * extent + (size - 1) / 2
    base, frac = path.floor(), path - path.floor()
    k = torch.zeros(n, size * size)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):           # bilinear splatting: each point weighs on 4 pixels
        wgt = (frac[..., 0] if dy else 1 - frac[..., 0]) * (frac[..., 1] if dx else 1 - frac[..., 1])
        idx = ((base[..., 0] + dy) * size + base[..., 1] + dx).long()                # (n, steps)
        k.scatter_add_(1, idx, wgt)
    return (k / k.sum(1, keepdim=True)).view(n, 1, size, size)


def shake_blur(y, gen=None):
    """Real-like blur: a camera-shake kernel per image, then mild sensor noise (camera_noise at low gain)."""
    return camera_noise(blur(y, shake_kernels(y.shape[0], gen)).clamp(0, 1), gen, shot=(1e-4, 1e-3), read=(1e-7, 1e-5))


# task -> its synthetic degradation fn(y, gen=None, **params) ("params": the Config fields it takes) and its real-like
# ones fn(y, gen); a new task is one entry here. Each denoising domain has its paired synthetic range (used when
# Config.sigma_max is None): on `white` a converged restorer leaves residual noise, on `camera` it over-smooths.
# NOTE(simplification): every task works in [0, 1] (official: [-1, 1] for deraining and deblurring, data/dataset.py).
TASKS = {
    "denoise": {"synthetic": add_awgn, "params": ("sigma_max",), "real": {"white": white_noise, "camera": camera_noise,
                "correlated": correlated_noise}, "sigma_max": {"white": 15.0, "camera": 75.0, "correlated": 15.0}},
    "derain": {"synthetic": simple_rain, "params": (), "real": {"layered": layered_rain}},
    "deblur": {"synthetic": simple_blur, "params": (), "real": {"shake": shake_blur}},
}


def degrade_synthetic(cfg, y, gen=None):
    """x_syn: clean y (B, 3, H, W) through cfg.task's synthetic degradation, given the Config fields in its "params"."""
    task = TASKS[cfg.task]
    return task["synthetic"](y, gen=gen, **{k: getattr(cfg, k) for k in task["params"]})


@dataclass
class Data:
    """The four pools, each (N, 3, H, W) in [0, 1] and already on the training device."""
    syn_clean: torch.Tensor         # clean images; synthetic inputs are made from them online (fresh noise every step)
    real_noisy: torch.Tensor        # unpaired real-like training images (their clean versions are never used by DA)
    real_clean: torch.Tensor        # ONLY for the oracle and the diagnostic; None without ground truth (a folder)
    test_syn_noisy: torch.Tensor    # test_*: the synthetic and real-like test sets with ground truth
    test_syn_clean: torch.Tensor
    test_real_noisy: torch.Tensor
    test_real_clean: torch.Tensor
    syn_pairs: torch.Tensor = None  # or ready-made pairs from a folder (N, 6, H, W) = cat[input, target] along C

    def to(self, device):
        return Data(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


def make_data(cfg, device="cpu", clean=None):
    """Deterministic built-in data from cfg.seed: four disjoint clean sets from clean(n, size, gen) (or the world's)."""
    gen, clean = torch.Generator().manual_seed(cfg.seed), clean or WORLDS[cfg.world]
    real_fn = TASKS[cfg.task]["real"][cfg.real_noise]
    sizes = [cfg.n_syn, cfg.n_real, cfg.n_test, cfg.n_test]
    syn_clean, real_clean, test_syn_clean, test_real_clean = clean(sum(sizes), cfg.image_size, gen).split(sizes)
    return Data(syn_clean=syn_clean, real_noisy=real_fn(real_clean, gen), real_clean=real_clean,
                test_syn_noisy=degrade_synthetic(cfg, test_syn_clean, gen), test_syn_clean=test_syn_clean,
                test_real_noisy=real_fn(test_real_clean, gen), test_real_clean=test_real_clean).to(device)


def dihedral(x, k):
    """The k-th of the 8 dihedral transforms (k in 0..7): rotate by 90*(k % 4) degrees, flip if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def random_crops(pool, n, patch):
    """n random patches (n, C, patch, patch) from a pool (N, C, H, W), each with its own crop and one of the 8 dihedral
    transforms, in one gather without a host sync; channels stay together, so (input, target) stacked along C align."""
    (N, C, H, W), dev = pool.shape, pool.device
    idx = torch.randint(N, (n,), device=dev)
    oy, ox = (torch.randint(side - patch + 1, (n,), device=dev) for side in (H, W))   # crop offsets
    k = torch.randint(8, (n,), device=dev)
    # A dihedral transform only moves pixels: applied to a (row, col) grid it maps each output pixel to its crop pixel,
    # so one indexing step crops and transforms (a loop over k with boolean masks would need .any(), a host sync).
    ar = torch.arange(patch, device=dev)
    grid = torch.stack(torch.meshgrid(ar, ar, indexing="ij"))                       # (2, p, p) as (row, col)
    maps = torch.stack([dihedral(grid, t) for t in range(8)])[k]                    # (n, 2, p, p)
    iy, ix = oy[:, None, None] + maps[:, 0], ox[:, None, None] + maps[:, 1]         # (n, p, p) each
    return pool[idx[:, None, None], :, iy, ix].permute(0, 3, 1, 2)                  # (n, C, p, p)


def syn_batch(data, cfg):
    """Synthetic pairs (x_syn, y_syn), both (B, 3, p, p): crop + augment the clean image, then degrade."""
    if data.syn_pairs is not None:                  # ready-made pairs from a folder: crop both halves together
        return random_crops(data.syn_pairs, cfg.batch_size, cfg.patch_size).split(3, 1)   # (B, 6, p, p) in halves
    y_syn = random_crops(data.syn_clean, cfg.batch_size, cfg.patch_size)
    return degrade_synthetic(cfg, y_syn), y_syn


def real_batch(data, cfg):
    """Unpaired real-like inputs x_real (B, 3, p, p), cropped and augmented independently of syn_batch."""
    return random_crops(data.real_noisy, cfg.batch_size, cfg.patch_size)


def real_pairs_batch(data, cfg):
    """(x_real, y_real) pairs for the oracle and the diagnostic: same crop and transform for both."""
    return random_crops(torch.cat([data.real_noisy, data.real_clean], 1), cfg.batch_size, cfg.patch_size).split(3, 1)


def ref_batch(data, cfg):
    """Unpaired clean images y_c for "Ours-Ex": the synthetic ground truth, drawn apart from the batch (as official)."""
    return random_crops(data.syn_clean, cfg.batch_size, cfg.patch_size)


# ----------------------------------------------------------------------------------------------------------
# Networks: the restorer G and the conditional denoiser eps_theta
# ----------------------------------------------------------------------------------------------------------
def conv3(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3, padding=1)


def kaiming_init(net):
    """The official initialisation of both networks (BaseNetwork.init_weights, "kaiming"): Kaiming-normal weights,
    fan_in, zero biases in every conv and linear layer (guided-diffusion's zero-init output layers overwritten too)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            nn.init.zeros_(m.bias)
    return net


class RestorerUNet(nn.Module):
    """G: the official RestorationNet in miniature, no normalisation: per level two 3x3 convs + LeakyReLU(0.2), then
    average pooling; the decoder upsamples bilinearly, concatenates the skip, two convs. forward() returns R(x)."""

    def __init__(self, width=16, depth=3, zero_head=True):
        super().__init__()
        self.depth = depth
        chans = [width * 2 ** i for i in range(depth)]                              # e.g. 16, 32, 64
        act = nn.LeakyReLU(0.2)
        self.down, c_prev = nn.ModuleList(), 3
        for c in chans:
            self.down.append(nn.Sequential(conv3(c_prev, c), act, conv3(c, c), act))
            c_prev = c
        self.up_conv, self.up_block = nn.ModuleList(), nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up_conv.append(conv3(c_prev, c))                                   # after bilinear x2
            self.up_block.append(nn.Sequential(conv3(2 * c, c), act, conv3(c, c), act))
            c_prev = c
        self.last = conv3(c_prev, 3)
        kaiming_init(self)                                                          # as the official code
        if zero_head:
            # NOTE(simplification): a zero residual head: a fresh G is the identity (y_hat = x). With Kaiming weights, a
            # from-scratch G at the small presets' 10x learning rate stalls below its input (docs/deviations.md, 3).
            nn.init.zeros_(self.last.weight), nn.init.zeros_(self.last.bias)

    def forward(self, x, return_features=False):                                    # x: (B, 3, H, W)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth - 1:
                skips.append(x)
                x = F.avg_pool2d(x, 2)
        features = x                                                                # bottleneck (B, c_max, h, w)
        for conv, block in zip(self.up_conv, self.up_block):
            x = conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
            x = block(torch.cat([x, skips.pop()], 1))                               # (B, 2c, h, w) -> (B, c, h, w)
        return (self.last(x), features) if return_features else self.last(x)  # R(x) (B, 3, H, W); features: DANN


def gamma_embedding(gamma, dim, max_period=10000):
    """Sinusoidal embedding of the continuous noise level gamma in (0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=gamma.device) / half)
    args = gamma.float()[:, None] * freqs[None]         # (B, half); gamma itself, not the step t (SR3/Palette)
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


def norm(c):
    """GroupNorm with 32 groups as the official denoiser, but at least 2 channels per group. NOTE(simplification): at
    dada-min's widths (16, 32) 32 groups would be InstanceNorm, so narrow layers get c/2 groups (c >= 64: 32 groups)."""
    return nn.GroupNorm(min(32, c // 2), c)


class ResBlock(nn.Module):
    """Guided-diffusion residual block: norm-SiLU-conv, norm + FiLM by gamma, SiLU-dropout-conv; 2x resampling."""

    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, resample=None):
        super().__init__()
        self.resample = resample                                                    # None | "down" | "up"
        self.in_layers = nn.Sequential(norm(c_in), nn.SiLU())
        self.conv1 = conv3(c_in, c_out)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out))
        self.norm2 = norm(c_out)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), conv3(c_out, c_out))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def _resample(self, x):
        return (F.avg_pool2d(x, 2) if self.resample == "down" else
                F.interpolate(x, scale_factor=2, mode="nearest") if self.resample == "up" else x)

    def forward(self, x, emb):
        h = self.conv1(self._resample(self.in_layers(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, 1)                  # (B, c, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift                                     # FiLM by gamma
        return self.skip(self._resample(x)) + self.out_layers(h)


class AttnBlock(nn.Module):
    """Multi-head self-attention over all positions, at the bottleneck only, heads of 32 channels (both as official)."""

    def __init__(self, c, head_channels=32):
        super().__init__()
        self.heads = c // head_channels if c % head_channels == 0 else 1           # else one (same parameter count)
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        nh = self.heads
        qkv = self.qkv(self.norm(x)).reshape(B, 3, nh, C // nh, H * W)               # (B, 3, nh, C/nh, HW)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                                   # (B, nh, HW, C/nh) each
        h = F.scaled_dot_product_attention(q, k, v)                                 # (B, nh, HW, C/nh)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))               # heads back to channels


class ConditionalDenoiser(nn.Module):
    """eps_theta, a guided-diffusion UNet: cat[y_t, c1, c2] (B, 9, H, W) and gamma (B,) -> eps_hat (B, 3, H, W)."""

    def __init__(self, width=32, mults=(1, 2, 2), res_blocks=1, attn=False, dropout=0.0, in_ch=9):
        super().__init__()
        emb_dim = 4 * width
        self.emb_dim_in = width
        self.gamma_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = conv3(in_ch, width)
        chans = [width * m for m in mults]
        self.down, skip_ch, c = nn.ModuleList(), [width], width
        for i, c_out in enumerate(chans):
            for _ in range(res_blocks):
                self.down.append(ResBlock(c, c_out, emb_dim, dropout))
                c = c_out
                skip_ch.append(c)
            if i < len(chans) - 1:                                                  # downsample by a ResBlock
                self.down.append(ResBlock(c, c, emb_dim, dropout, resample="down"))
                skip_ch.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), AttnBlock(c) if attn else nn.Identity(),
                                  ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, c_out in reversed(list(enumerate(chans))):
            for j in range(res_blocks + 1):
                self.up.append(ResBlock(c + skip_ch.pop(), c_out, emb_dim, dropout))
                c = c_out
                if i > 0 and j == res_blocks:                                       # upsample by a ResBlock
                    self.up.append(ResBlock(c, c, emb_dim, dropout, resample="up"))
        self.out = nn.Sequential(norm(c), nn.SiLU(), conv3(c, 3))
        kaiming_init(self)                                                          # as the official code

    def forward(self, x, gamma):                                                    # x: (B, 9, H, W), gamma: (B,)
        emb = self.gamma_mlp(gamma_embedding(gamma, self.emb_dim_in))               # (B, 4*width)
        h = self.inp(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h) if isinstance(block, (AttnBlock, nn.Identity)) else block(h, emb)
        for block in self.up:
            if block.resample != "up":
                h = torch.cat([h, skips.pop()], 1)                                  # U-Net skip
            h = block(h, emb)
        return self.out(h)                                                          # eps_hat: (B, 3, H, W)


# cfg.restorer -> a function(cfg) that builds G; a new restorer is one entry: a module returning the residual R(x), with
# a .depth attribute (restore() pads to 2^(depth-1)) and no batch statistics (both domains pass in one batch).
RESTORERS = {"unet": lambda cfg: RestorerUNet(cfg.r_width, cfg.r_depth, cfg.r_zero_head)}


def make_networks(cfg):
    """G and eps_theta as the config describes them (on the CPU, in float32)."""
    return (RESTORERS[cfg.restorer](cfg),
            ConditionalDenoiser(cfg.d_width, tuple(cfg.d_mults), cfg.d_res_blocks, cfg.d_attn, cfg.d_dropout))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# Noise schedule (DDPM), the forward process of Sec. 3
# ----------------------------------------------------------------------------------------------------------
class NoiseSchedule(nn.Module):
    """Linear betas, computed in float64; alphas_cumprod[i] is the paper's alpha_bar_{i+1} (continuously: gamma)."""

    def __init__(self, T=1000, beta_start=1e-6, beta_end=1e-2):
        super().__init__()
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.T = T
        self.register_buffer("betas", betas.float())    # float32 buffers: .to(device) moves them, autocast does not
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())  # (T,), decreasing, in (0, 1)

    def sample_gamma(self, n, t_min=1, t_max=None):
        """SR3-style continuous noise level: t ~ U{t_min..t_max}, gamma ~ U(abar[t], abar[t-1]). Returns (n,)."""
        t_max = self.T - 1 if t_max is None else t_max  # official: t in 1..T-1 (Table 4 varies it)
        ac = self.alphas_cumprod
        t = torch.randint(t_min, t_max + 1, (n,), device=ac.device)
        lo, hi = ac[t], ac[t - 1]
        return lo + (hi - lo) * torch.rand(n, device=ac.device)

    @staticmethod
    def q_sample(y0, gamma, eps):
        """Forward diffusion: y_t = sqrt(gamma) * y0 + sqrt(1 - gamma) * eps (gamma: (B,))."""
        g = gamma.view(-1, 1, 1, 1).to(y0.dtype)
        return g.sqrt() * y0 + (1 - g).sqrt() * eps


# ----------------------------------------------------------------------------------------------------------
# The two anti-shortcut tricks
# ----------------------------------------------------------------------------------------------------------
def channel_shuffle(c_syn, c_real, enabled=True):
    """Channel-shuffling layer (CS): for each sample independently, with p = 1/2, swap which condition slot holds the
    synthetic and which the real image (redrawn each call; y_t stays in front). Returns (c1, c2, swapped (B,) bool)."""
    # Why: y_syn_hat shows the noised scene; without CS eps_theta reads that fixed slot and ignores the other.
    if not enabled:
        return c_syn, c_real, torch.zeros(c_syn.shape[0], dtype=torch.bool, device=c_syn.device)
    swapped = torch.rand(c_syn.shape[0], device=c_syn.device) < 0.5                 # (B,)
    m = swapped.view(-1, 1, 1, 1)
    return torch.where(m, c_real, c_syn), torch.where(m, c_syn, c_real), swapped


def residual_swap(x_syn, r_syn, x_real, r_real):
    """Residual-swapping (RS) negatives, Eq. (2): x_syn + R_real and x_real + R_syn (the OTHER domain's residual)."""
    return x_syn + r_real, x_real + r_syn               # nothing detached: the hinge also trains G


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
def charbonnier(pred, target, eps=1e-3):
    """L_Res: mean sqrt((pred - target)^2 + eps^2), a smooth L1."""
    return torch.sqrt((pred - target) ** 2 + eps ** 2).mean()


def triplet_hinge(eps, eps_pos, eps_neg, margin=0.1):
    """Eq. (3) as the official code: relu(MSE(eps, eps_pos) - MSE(eps, eps_neg) + margin), each MSE over the batch."""
    # In noise-MSE units; at CPU sizes the negatives soon trail by more than 0.1, so it is mostly 0 (hinge_active_frac).
    return F.relu(F.mse_loss(eps_pos, eps) - F.mse_loss(eps_neg, eps) + margin)      # ONE hinge per batch


def diffusion_loss(denoiser, schedule, y0, cond_syn, cond_real, neg=None, shuffle=True, margin=0.1,
                   t_range=(1, None), gamma=None, eps=None):
    """The noise-space loss L_noise, Eq. (1): MSE(eps, eps_theta(cat[y_t, c1, c2], gamma)) -> (loss, detached parts).
    y0:        (B, 3, H, W) clean image that is noised (y_syn; an unpaired clean image for Ours-Ex)
    cond_syn, cond_real: (B, 3, H, W) restored images y_syn_hat = x_syn + R_syn, y_real_hat = x_real + R_real
    neg:       None, or the RS negatives (x_syn + R_real, x_real + R_syn): their pass uses the SAME y_t, eps and
               gamma with its own slot swap, and the loss is (Eq. (1) + Eq. (3)) / 2"""
    gamma = schedule.sample_gamma(y0.shape[0], *t_range) if gamma is None else gamma  # (B,)
    eps = torch.randn_like(y0) if eps is None else eps
    y_t = schedule.q_sample(y0, gamma, eps)                                         # (B, 3, H, W)
    c1, c2, _ = channel_shuffle(cond_syn, cond_real, shuffle)
    if neg is None:
        eps_pos = denoiser(torch.cat([y_t, c1, c2], 1), gamma).float()              # input (B, 9, H, W)
        mse_pos = F.mse_loss(eps_pos, eps)                                          # Eq. (1)
        return mse_pos, {"mse": mse_pos.detach()}
    n1, n2, _ = channel_shuffle(neg[0], neg[1], shuffle)                            # its own, independent swap
    # positives and negatives in ONE denoiser call (official: two): the same maths, as eps_theta has no batch statistics
    # and dropout masks are independent either way; under torchrun each network then runs once a step, as DDP expects
    inp = torch.cat([torch.cat([y_t, c1, c2], 1), torch.cat([y_t, n1, n2], 1)])   # (2B, 9, H, W)
    eps_pos, eps_neg = denoiser(inp, torch.cat([gamma, gamma])).float().chunk(2)    # (B, 3, H, W) each
    mse_pos = F.mse_loss(eps_pos, eps)                                              # Eq. (1)
    mse_neg = F.mse_loss(eps_neg, eps)
    hinge = triplet_hinge(eps, eps_pos, eps_neg, margin)                             # Eq. (3)
    return (mse_pos + hinge) / 2, {"mse": mse_pos.detach(), "mse_neg": mse_neg.detach(), "hinge": hinge.detach()}


def alpha_ramp(step, total_ramp_steps, alpha_max=0.2):
    """Weight of the diffusion loss: DANN-style sigmoid ramp (2 / (1 + exp(-5 p)) - 1) * alpha_max: 0 to 0.987 of it.
    NOTE(simplification): the official code ramps per epoch over 300 epochs; dada-min per step over cfg.ramp_frac."""
    p = min(step / max(total_ramp_steps, 1), 1.0)       # clipped to 1
    return (2 / (1 + math.exp(-5 * p)) - 1) * alpha_max


def condition_pair(which, y_syn_hat, y_real_hat):
    """The restored images in eps_theta's slots: "both" (y_syn_hat, y_real_hat); "syn" / "real": one of them twice."""
    return {"both": (y_syn_hat, y_real_hat), "syn": (y_syn_hat, y_syn_hat), "real": (y_real_hat, y_real_hat)}[which]


# ----------------------------------------------------------------------------------------------------------
# Training: Algorithm A (DA), B (Ours-Ex), vanilla and oracle in one explicit loop
# ----------------------------------------------------------------------------------------------------------
def pick_device(name="auto"):
    """The one place that decides the device. Under torchrun, "auto" and "cuda" mean this process's own GPU."""
    if name == "auto":
        mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but CUDA is not available; use --device auto or cpu")
    if name == "cuda" and "LOCAL_RANK" in os.environ:                              # torchrun: one GPU per process
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    return dev


# Data parallelism (torchrun): each process runs this file on its own device and batches; DDP averages the gradients in
# backward, so all copies take the same step. Rank 0 logs, evaluates and writes. Without torchrun nothing here acts.
def dist_rank():
    """(rank, world size) of this process; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank0(log):
    """`log` on rank 0, a no-op elsewhere: one process speaks for all."""
    return log if dist_rank()[0] == 0 else (lambda *args, **kwargs: None)


def dist_teardown():
    """Leave the process group once all are done (a barrier first: one tearing down early can abort the others)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def dist_any(flag, device):
    """True on every process if `flag` is true on any of them: so that all stop together, none left waiting."""
    if dist_rank()[1] == 1:
        return bool(flag)
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)                                        # a collective: all ranks call it
    return bool(t.item())


def data_parallel(cfg, G, D, device):
    """Join torchrun's process group (nccl on CUDA, else gloo); wrap G and eps_theta (if trained) in DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if cfg.method in PLUGINS:
        raise ValueError(f"method {cfg.method!r} (a plug-in) trains single-process only: run it without torchrun")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ids = [device.index] if device.type == "cuda" else None
    return DDP(G, device_ids=ids), (DDP(D, device_ids=ids) if METHODS[cfg.method][0] else D)


def pick_precision(precision, device):
    """The autocast dtype, or None for fp32. auto: bf16 on GPUs that compute in it natively (compute capability >= 8:
    A100, H100, RTX 30xx on; it needs no loss scaling), else fp32. An explicit choice is honoured on any device."""
    if precision == "auto":
        cuda = device.type == "cuda"
        precision = "bf16" if cuda and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def fast_path(device):
    """The other switches of the GPU fast path, decided in one place; on CPU all are off (plain fp32).
    channels_last:   NHWC activations, the layout tensor-core convolutions want (CUDA only)
    fused_adam:      one kernel for the whole Adam update instead of a few per tensor (CUDA only)
    cudnn_benchmark: let cuDNN time its convolution algorithms once per shape (patches have one shape)"""
    cuda = device.type == "cuda"
    return {"channels_last": cuda, "fused_adam": cuda, "cudnn_benchmark": cuda}


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# Methods from other modules (baselines.py): register_method(name, loss, make_net) adds `name` to METHODS; train_step
# calls loss(state, data, G, x_syn, y_syn) -> (loss, parts); make_net(cfg) builds a second network as state.D.
PLUGINS = {}                          # name -> (loss, make_net)


def register_method(name, loss, make_net=None):
    METHODS[name] = (False, False, False, None, None)
    PLUGINS[name] = (loss, make_net)


@dataclass
class TrainState:
    """Everything a training run produces and a checkpoint holds."""
    cfg: Config
    G: RestorerUNet                   # the restorer being trained
    G_ema: RestorerUNet               # its exponential moving average (scored and used by restore: see G_eval)
    D: nn.Module                      # eps_theta (unused by vanilla, oracle) or a plug-in's second network
    schedule: NoiseSchedule
    opt: torch.optim.Optimizer        # ONE Adam over G and state.D
    step: int = 0
    history: dict = field(default_factory=dict)

    @property
    def G_eval(self):
        """The restorer that is scored and restores: the EMA of G, or G itself with cfg.eval_ema=False (official)."""
        return self.G_ema if self.cfg.eval_ema else self.G


def init_state(cfg, device, fast=True, G=None):
    """Fresh networks and optimiser, seeded by cfg.seed (fast=False: the bench's plain path; G: a custom restorer)."""
    torch.manual_seed(cfg.seed)
    G_default, D = make_networks(cfg)                                               # same eps_theta init either way
    _, make_net = PLUGINS.get(cfg.method, (None, None))
    D = make_net(cfg) if make_net else D                                            # a plug-in's own network
    if cfg.start != "scratch":
        if G is not None:
            raise ValueError(f"start={cfg.start!r} loads RestorerUNet weights, so it cannot start a custom G; "
                             "pass start='scratch' with G=")
        load_start(G_default, start_path(cfg.world, cfg.sigma_max) if cfg.start == "shipped" else cfg.start)
    G, D = (G_default if G is None else G).to(device), D.to(device)
    switches = fast_path(device)
    if fast and switches["channels_last"]:                                          # faster convs on tensor cores
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    params = list(G.parameters()) + (list(D.parameters()) if METHODS[cfg.method][0] or make_net else [])
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=fast and switches["fused_adam"])
    hist = {k: [] for k in ("step", "loss_res", "loss_dif", "alpha", "hinge",                  # per log step
                            "eval_step", "syn_psnr", "real_psnr", "diag_cos", "hinge_active_frac", "neg_pos_gap")}
    return TrainState(cfg, G, copy.deepcopy(G).requires_grad_(False), D,
                      NoiseSchedule(cfg.T, cfg.beta_start, cfg.beta_end).to(device), opt, 0, hist)


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)


def train_step(state, data, gmodels=None):
    """One step of the training algorithm (Algorithm A; B for da_ex; see the module docstring); returns its losses."""
    cfg, s = state.cfg, state
    G, D = gmodels or (s.G, s.D)                                                    # DDP-wrapped under torchrun
    uses_diffusion, shuffle, contrast, dif_input, conditions = METHODS[cfg.method]
    device = next(s.G.parameters()).device
    amp_dtype = pick_precision(cfg.precision, device)
    # line 1: sample a synthetic pair (the oracle: a real pair) and, independently, an unpaired real image
    x_syn, y_syn = (real_pairs_batch if cfg.method == "oracle" else syn_batch)(data, cfg)  # (B, 3, p, p) each
    with autocast(device, amp_dtype):
        if uses_diffusion:                                                          # the paper's path
            x_real = real_batch(data, cfg)
            # line 2: restore both domains with the same G (one batched pass; G has no batch statistics)
            warm = s.step < cfg.d_warmup                                            # eps_theta alone: G frozen
            with torch.set_grad_enabled(torch.is_grad_enabled() and not warm):     # (no graph through G)
                r_syn, r_real = G(torch.cat([x_syn, x_real])).float().chunk(2)      # residuals R_syn, R_real
            y_syn_hat, y_real_hat = x_syn + r_syn, x_real + r_real
            loss_res = charbonnier(y_syn_hat, y_syn)                                # L_Res on synthetic pairs
            # line 3: the image that is noised: y_syn (Algorithm A) or an unpaired clean image (B)
            y0 = y_syn if dif_input == "syn" else ref_batch(data, cfg)
            # line 4: residual-swapped negatives (RS), if enabled
            neg = residual_swap(x_syn, r_syn, x_real, r_real) if contrast else None
            # lines 5-6: noise, shuffle the condition slots (CS), predict the noise, Eq. (1) and (3)
            c_a, c_b = condition_pair(conditions, y_syn_hat, y_real_hat)            # (y_syn_hat, y_real_hat) for DA
            loss_dif, dparts = diffusion_loss(D, s.schedule, y0, c_a, c_b, neg, shuffle, cfg.margin,
                                              (cfg.t_min, cfg.t_max))
            alpha = alpha_ramp(max(s.step - cfg.d_warmup, 0), cfg.ramp_frac * cfg.steps, cfg.alpha_max)
            # line 7: the total loss, one backward through G and eps_theta (warm-up: L_noise for eps_theta alone)
            loss = loss_dif if warm else loss_res + alpha * loss_dif
            parts = {"loss_res": loss_res.detach(), "loss_dif": loss_dif.detach(), "alpha": alpha,
                     **({"hinge": dparts["hinge"], "gap": dparts["mse_neg"] - dparts["mse"]} if contrast else {})}
        elif cfg.method in PLUGINS:                                                 # e.g. baselines.py
            loss, parts = PLUGINS[cfg.method][0](s, data, G, x_syn, y_syn)
        else:                                                                       # vanilla and oracle
            loss_res = charbonnier((x_syn + G(x_syn)).float(), y_syn)               # L_Res
            loss, parts = loss_res, {"loss_res": loss_res.detach()}
    # line 8: one optimiser step over both networks, then the EMA of G
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    s.opt.step()
    ema_update(s.G_ema, s.G, min(cfg.ema_decay, (1 + s.step) / (10 + s.step)) if cfg.ema_warmup else cfg.ema_decay)
    s.step += 1
    return parts                        # detached loss tensors: no host sync here, .item() only when logging


def mechanism_diagnostic(state, x_syn, y_syn, x_real, y_real, gamma=None, draws=4):
    """Does the diffusion loss push restored real images toward their clean targets? The mean over samples and `draws`
    noise draws of cos(-dL/dR_real, y_real - y_real_hat), L the method's diffusion loss (RS negatives included)."""
    cfg, G, D = state.cfg, state.G, state.D
    _, shuffle, contrast, _, conditions = METHODS[cfg.method]
    was_training = D.training
    D.eval()
    with torch.no_grad():
        r_syn, r_real = G(torch.cat([x_syn, x_real])).float().chunk(2)
    cos = []
    for _ in range(draws):
        r = r_real.clone().requires_grad_(True)
        neg = residual_swap(x_syn, r_syn, x_real, r) if contrast else None
        g = None if gamma is None else gamma.expand(x_syn.shape[0])
        c_a, c_b = condition_pair(conditions, x_syn + r_syn, x_real + r)
        loss, _ = diffusion_loss(D, state.schedule, y_syn, c_a, c_b, neg, shuffle, cfg.margin, (cfg.t_min, cfg.t_max),
                                 gamma=g)
        (grad,) = torch.autograd.grad(loss, r, allow_unused=True)
        grad = torch.zeros_like(r) if grad is None else grad                        # "only_syn": R_real unused
        to_clean = (y_real - (x_real + r_real)).flatten(1)                          # (B, 3*H*W)
        cos.append(F.cosine_similarity(-grad.flatten(1), to_clean, dim=1).mean())
    D.train(was_training)
    return torch.stack(cos).mean().item()


class TrainingDiverged(RuntimeError):
    """A loss term, the gradient norm or an evaluation score went non-finite; the last finite checkpoint is kept."""


class DivergenceGuard:
    """Watches each step's loss terms and gradient norm for NaN/inf without a host sync (on a GPU the loop runs ahead of
    the kernels): the first bad step and its values wait on the device until check() reads them, before any save."""

    def __init__(self, cfg, device, ckpt=None, saved=None):
        self.cfg, self.ckpt, self.saved = cfg, ckpt, saved                         # saved: step of ckpt on disk
        self.amp_dtype = pick_precision(cfg.precision, device)
        self.first = torch.zeros((), dtype=torch.long, device=device)             # first bad step (0: none yet)
        self.names, self.values = [], None                                          # values (K,) at that step

    def update(self, step, terms):
        """terms: {name: 0-d tensor} of step `step` (counted from 1)."""
        self.names = list(terms)
        vals = torch.stack([v.float() for v in terms.values()])                     # (K,)
        new = (self.first == 0) & ~torch.isfinite(vals).all()                       # device-side, no sync
        self.first = torch.where(new, step, self.first)
        self.values = vals if self.values is None else torch.where(new, vals, self.values)

    def check(self):
        if dist_any(int(self.first), self.first.device):                           # the host sync (all processes)
            if not (step := int(self.first)):
                self.fail("training diverged on another process (torchrun)")
            bad = ", ".join(f"{n}={v:g}" for n, v in zip(self.names, self.values.tolist()) if not math.isfinite(v))
            self.fail(f"training diverged at step {step}: {bad}")

    def fail(self, what):
        cause = f"the learning rate is too high (lr={self.cfg.lr:g}; try 10x lower)"
        if self.amp_dtype is not None:                                              # half precision rounds first
            cause += f" or bf16 precision is too coarse (precision={self.cfg.precision}; try --precision fp32)"
        kept = ("nothing was saved" if self.ckpt is None else
                f"this run saved nothing to {os.path.dirname(self.ckpt)}" if self.saved is None else
                f"{self.ckpt} and history.json are kept from step {self.saved}, the last finite evaluation")
        raise TrainingDiverged(f"{what} (not finite). Likely cause: {cause}. Stopped; {kept}.")


def train(cfg, data=None, out=None, resume=False, log=print, G=None, on_eval=None):
    """Train one method (cfg.method) and return its TrainState (with .history); out: a folder for checkpoint.pt and
    history.json (resume: continue from it); G: a restorer to train instead of RestorerUNet; on_eval(state): a hook."""
    cfg.validate()
    device = pick_device(cfg.device)
    rank, world = dist_rank()
    log = rank0(log)
    data = make_data(cfg, device) if data is None else data.to(device)
    if cfg.method == "oracle" and data.real_clean is None:
        raise ValueError("method 'oracle' trains on real pairs, but the real images have no ground truth: "
                         "give --real-dir in the paired layout (input/ + target/) or use the built-in data")
    state = init_state(cfg, device, G=G)
    start = ("a custom G" if G is not None else f"the shipped data/{STARTS[cfg.world, cfg.sigma_max]}"
             if cfg.start == "shipped" else cfg.start)
    log(f"[{cfg.method}] synthetic: " + (f"AWGN sigma <= {cfg.sigma_max:g}/255" if cfg.task == "denoise" else
                                         f"{cfg.task} (TASKS)") + f"; G starts from {start}")
    ckpt = os.path.join(out, "checkpoint.pt") if out else None
    if resume and ckpt and os.path.exists(ckpt):
        was = load_checkpoint(ckpt, state).get("world_size", 1)
        log(f"resumed from {ckpt} at step {state.step}" + ("" if was == world else
            f" (it was trained by {was} process(es), now {world}: the global batch changes from here on)"))
    if fast_path(device)["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = True                                       # fixed patch size: tune once
    gmodels = data_parallel(cfg, state.G, state.D, device) if world > 1 else None  # views sharing the parameters
    if gmodels:
        log(f"[{cfg.method}] data-parallel: {world} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), "
            f"global batch {cfg.batch_size} x {world} = {cfg.batch_size * world} synthetic pairs a step")
    uses_diffusion, _, contrast = METHODS[cfg.method][:3]
    torch.manual_seed(cfg.seed + 1)                 # a fixed batch for the diagnostic (real pairs: the clean half only
    diag = (*syn_batch(data, cfg), *real_pairs_batch(data, cfg)) if data.real_clean is not None else None  # measures)
    torch.manual_seed(cfg.seed + 2 + state.step     # a run resumed at step k draws new batches, not those of 0..k;
                      + 1_000_003 * rank)           # each process its own batches, noise and swaps
    h, t0, start = state.history, time.time(), state.step
    rs_stats = torch.zeros(3, device=device)                                        # [active steps, sum of gaps, steps]
    guard = DivergenceGuard(cfg, device, ckpt, saved=state.step if state.step else None)
    params = [p for g in state.opt.param_groups for p in g["params"]]
    state.G.train(), state.D.train()
    end = cfg.steps + (cfg.d_warmup if uses_diffusion else 0)                     # the warm-up comes first
    for step in range(state.step, end):
        parts = train_step(state, data, gmodels)
        terms = {k: v for k, v in parts.items() if torch.is_tensor(v)}               # alpha is a float
        terms["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        guard.update(step + 1, terms)
        if contrast:                                                                # on the device: no sync
            rs_stats += torch.stack([(parts["hinge"] > 0).float(), parts["gap"].float(), torch.ones((), device=device)])
        last = step + 1 == end
        logging = last or (step + 1) % cfg.log_every == 0
        evaluating = last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)
        if logging or evaluating:
            guard.check()                                                           # raises before any save
        if logging:
            vals = {k: float(v) for k, v in parts.items()}                          # host sync: logging only
            h["step"].append(step + 1)
            for k in ("loss_res", "loss_dif", "alpha", "hinge"):
                h[k].append(vals.get(k, float("nan")))
            eta = (time.time() - t0) / (step + 1 - start) * (end - step - 1)
            log(f"[{cfg.method}] step {step + 1}/{end} " +
                " ".join(f"{k} {v:.4g}" for k, v in vals.items()) + f" | eta {eta:.0f}s")
        if not evaluating:
            continue
        m = evaluate_pools(state.G_eval, data) if rank == 0 else None              # only rank 0 evaluates
        if dist_any(m is not None and not (math.isfinite(m["syn_psnr"]) and math.isfinite(m["real_psnr"])), device):
            guard.fail(f"evaluation at step {step + 1}: " + (f"synthetic PSNR {m['syn_psnr']}, real-like PSNR "
                                                               f"{m['real_psnr']}" if m else "rank 0's was not finite"))
        guard.saved = step + 1 if ckpt else None                                    # rank 0 saves it below
        if rank > 0:
            continue
        cos = mechanism_diagnostic(state, *diag) if uses_diffusion and diag else float("nan")
        active, gap = (rs_stats[:2] / rs_stats[2].clamp(min=1)).tolist() if contrast else (float("nan"),) * 2
        rs_stats.zero_()
        for k, v in (("eval_step", step + 1), ("syn_psnr", m["syn_psnr"]), ("real_psnr", m["real_psnr"]),
                     ("diag_cos", cos), ("hinge_active_frac", active), ("neg_pos_gap", gap)):
            h[k].append(v)
        log(f"[{cfg.method}] eval @ {step + 1}: synthetic PSNR {m['syn_psnr']:.2f} dB, "
            f"real-like PSNR {m['real_psnr']:.2f} dB" + ("" if math.isnan(cos) else f", diagnostic cos {cos:+.3f}")
            + ("" if not contrast else f", hinge active on {active:.0%} of steps (mean gap {gap:.3g})"))
        if ckpt:
            save_checkpoint(ckpt, state)
            atomic_write_text(os.path.join(out, "history.json"), json.dumps(h, indent=1))
        if on_eval:                                                             # after the save: out/ exists
            on_eval(state)
    return state


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (atomic writes; safe loading)
# ----------------------------------------------------------------------------------------------------------
def atomic_write_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_checkpoint(path, state, **entries):
    """Write state's config, step and history plus `entries` to a temporary file, then rename (never a broken file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(state.cfg).items()},
            "step": state.step, "history": state.history, **entries}
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(blob, tmp)                   # plain tensors and Python scalars: torch.load(weights_only=True) reads it
    os.replace(tmp, path)


def save_checkpoint(path, state):
    """Everything a resume needs: the networks themselves (never their DDP wrappers), the optimiser, the RNG."""
    write_checkpoint(path, state, restorer=state.G.state_dict(), restorer_ema=state.G_ema.state_dict(),
                     denoiser=state.D.state_dict(),
                     optimizer=state.opt.state_dict(), rng_cpu=torch.get_rng_state(), world_size=dist_rank()[1])


def read_checkpoint(path):
    """Load a checkpoint safely (weights_only=True refuses arbitrary pickled objects)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a dada-min checkpoint that can be loaded safely: {e}") from e
    if not isinstance(blob, dict) or "restorer" not in blob or "config" not in blob:
        raise ValueError(f"{path!r} is not a dada-min checkpoint (no 'restorer'/'config' entries)")
    return blob


def config_from_dict(d):
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}).validate()


# a resume continues the same run: it may run longer, at another learning rate, report differently or elsewhere
RESUME_MAY_CHANGE = ("steps", "lr", "eval_every", "log_every", "device", "precision")


def load_checkpoint(path, state):
    """Restore a TrainState in place to resume (under any number of processes); other settings than RESUME_MAY_CHANGE
    are an error. Returns the checkpoint."""
    blob = read_checkpoint(path)
    was = blob["config"]
    now = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(state.cfg).items()}
    if changed := [k for k in now if k not in RESUME_MAY_CHANGE and k in was and was[k] != now[k]]:
        raise ValueError(f"cannot resume {path}: it was trained with {', '.join(f'{k}={was[k]!r}' for k in changed)} "
                         f"but this run has {', '.join(f'{k}={now[k]!r}' for k in changed)}; use the same settings "
                         "or another output folder")
    for net, key in ((state.G, "restorer"), (state.G_ema, "restorer_ema"), (state.D, "denoiser")):
        net.load_state_dict(blob[key])
    state.opt.load_state_dict(blob["optimizer"])
    for group in state.opt.param_groups:                                            # this run's lr, not the saved one
        group["lr"] = state.cfg.lr
    state.step, state.history = blob["step"], blob["history"]
    torch.set_rng_state(blob["rng_cpu"])
    return blob


def eval_key(blob):
    """The checkpoint entry that restores: the EMA restorer, or the raw one if its run scored the raw G (eval_ema)."""
    return "restorer_ema" if blob["config"].get("eval_ema", True) else "restorer"


def load_start(G, path):
    """Load a checkpoint's restorer (eval_key) into G (a run's start); a size mismatch is an error naming the file."""
    blob = read_checkpoint(path)
    try:
        G.load_state_dict(blob[eval_key(blob)])
    except RuntimeError as e:
        raise ValueError(f"start checkpoint {path!r} holds a restorer of r_width={blob['config'].get('r_width')}, "
                         f"r_depth={blob['config'].get('r_depth')}, which does not fit this config: {e}") from e
    return G


def load_restorer(path, device="cpu"):
    """(G, config) from a checkpoint, ready for restore(): the restorer its run scored (eval_key)."""
    blob = read_checkpoint(path)
    cfg = config_from_dict(blob["config"])
    G = RESTORERS[cfg.restorer](cfg)
    G.load_state_dict(blob[eval_key(blob)])
    return G.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------------------
# Inference: G alone (the denoiser is thrown away)
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def restore(G, x):
    """y_hat = x + G(x) for images of any size, clamped to [0, 1]. x: (B, 3, H, W) -> (B, 3, H, W)."""
    m = 2 ** (G.depth - 1)
    H, W = x.shape[-2:]
    ph, pw = (-H) % m, (-W) % m
    xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x              # H, W up to a multiple of m
    return (xp + G(xp))[..., :H, :W].clamp(0, 1)                                    # restore, crop back


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------
def rgb_to_y(x):
    """ITU-R BT.601 luma of [0, 1] RGB, in [16/255, 235/255] (the convention of MATLAB's rgb2ycbcr)."""
    w = torch.tensor([65.481, 128.553, 24.966], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) / 255 + 16 / 255


def quantize_8bit(x):
    """Round [0, 1] images to 8 bits, as saved files are: scores are taken on these (as SIDD's benchmark, BasicSR)."""
    return (x.clamp(0, 1) * 255).round() / 255


def psnr(x, y, y_channel=False):
    """Per-image PSNR in dB for [0, 1] images (B, C, H, W) -> (B,). NOTE(simplification): PSNR and SSIM are computed
    in PyTorch, on RGB unless y_channel=True; the paper scores SIDD with MATLAB and SPA on the Y channel."""
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-12))


def ssim(x, y, y_channel=False):
    """Per-image SSIM (Wang et al. 2004) on 'valid' windows, averaged over channels. (B, C, H, W) -> (B,)."""
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    C = x.shape[1]
    g = torch.exp(-(torch.arange(11, dtype=x.dtype, device=x.device) - 5) ** 2 / (2 * 1.5 ** 2))  # 11 px, sigma 1.5
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(C, 1, 11, 11)
    mx, my, xx, yy, xy = (F.conv2d(z, win, groups=C) for z in (x, y, x * x, y * y, x * y))   # local moments
    vx, vy, cxy = xx - mx ** 2, yy - my ** 2, xy - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2                                                   # K1, K2; data range 1
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def evaluate(G, x, y, batch=32):
    """Mean PSNR and SSIM of restore(G, x), rounded to 8 bits, against y (used as given)."""
    was_training = G.training
    G.eval()
    out = quantize_8bit(torch.cat([restore(G, x[i:i + batch]) for i in range(0, len(x), batch)]))
    G.train(was_training)
    return {"psnr": psnr(out, y).mean().item(), "ssim": ssim(out, y).mean().item()}


def evaluate_pools(G, data):
    """Synthetic and real-like test metrics of G, always both: a real-like gain paid in synthetic PSNR is a trade."""
    s = evaluate(G, data.test_syn_noisy, data.test_syn_clean)
    r = evaluate(G, data.test_real_noisy, data.test_real_clean)
    return {"syn_psnr": s["psnr"], "syn_ssim": s["ssim"], "real_psnr": r["psnr"], "real_ssim": r["ssim"]}


def identity_metrics(data):
    """The test metrics of doing nothing (the degraded inputs themselves), in evaluate_pools' keys: the floor."""
    pools = [("syn", data.test_syn_noisy.clamp(0, 1), data.test_syn_clean),
             ("real", data.test_real_noisy, data.test_real_clean)]
    return {f"{p}_{k}": fn(x, y).mean().item() for p, x, y in pools for k, fn in (("psnr", psnr), ("ssim", ssim))}


# ----------------------------------------------------------------------------------------------------------
# The demo: vanilla vs DA vs oracle on the same built-in data
# ----------------------------------------------------------------------------------------------------------
DEMO = dict(steps=300, eval_every=0, log_every=100)   # the demo's protocol under cpu-demo (about 3 min on 2 CPU cores)


def demo(cfg, out="runs/demo", log=print):
    """Train vanilla, DA and the oracle on the same built-in data; print and return the comparison, save it to out/."""
    t0, device = time.time(), pick_device(cfg.device)
    os.makedirs(out, exist_ok=True)
    # DA's numbers depend on float rounding, which depends on the thread count and the CPU's kernels (bench.py --repro)
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    log(f"device {device} ({', '.join(f'{k} {v}' for k, v in machine.items())}); generating built-in data "
        f"({cfg.task}, clean world: {cfg.world}, real-like domain: {cfg.real_noise}) ...")
    data = make_data(cfg, device)
    results = {"config": dataclasses.asdict(cfg), "device": str(device), "machine": machine,
               "identity": identity_metrics(data)}
    results["start"] = {"start": cfg.start, **evaluate_pools(init_state(cfg, device).G_eval, data)}
    models = {}
    for method in ("vanilla", "da", "oracle"):
        state = train(dataclasses.replace(cfg, method=method), data, log=log)
        h = state.history
        active = float(np.nanmean(h["hinge_active_frac"])) if METHODS[method][2] else None
        results[method] = {**evaluate_pools(state.G_eval, data), "history": h, "hinge_active_frac": active}
        models[method] = state.G_eval
    v, d, o = (results[m]["real_psnr"] for m in ("vanilla", "da", "oracle"))
    results.update(da_gain_real_db=d - v, gap_closed=(d - v) / (o - v) if o != v else float("nan"),
                   da_syn_change_db=results["da"]["syn_psnr"] - results["vanilla"]["syn_psnr"],
                   diag_cos_final=results["da"]["history"]["diag_cos"][-1], seconds=time.time() - t0)
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    save_comparison_figure(os.path.join(out, "demo.png"), data, models)
    log("\n" + results_table(results))
    log(f"\nwrote {out}/results.json and {out}/demo.png in {results['seconds']:.0f} s")
    return results


def results_table(r):
    rows = [("identity (input)", r["identity"]), (f"start ({r['start']['start']})", r["start"])]
    lines = [f"{'method':18s} {'syn PSNR':>9s} {'syn SSIM':>9s} {'real PSNR':>10s} {'real SSIM':>10s}"] + [
        f"{name:18s} {m['syn_psnr']:9.2f} {m['syn_ssim']:9.4f} {m['real_psnr']:10.2f} {m['real_ssim']:10.4f}"
        for name, m in rows + [(k, r[k]) for k in ("vanilla", "da", "oracle")]]
    lines.append(f"DA - vanilla on real-like: {r['da_gain_real_db']:+.2f} dB; gap closed {r['gap_closed']:+.2f} "
                 f"(DA synthetic change {r['da_syn_change_db']:+.2f} dB; diagnostic cos {r['diag_cos_final']:+.3f}; "
                 f"RS hinge active on {r['da']['hinge_active_frac']:.0%} of DA's steps)")
    return "\n".join(lines)


def show_image(ax, img, ref=None, title=None, fontsize=8):
    """Draw one (3, H, W) image on a matplotlib axis without ticks, labelled with its PSNR against ref if given."""
    img = img.detach().clamp(0, 1).cpu()
    ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if ref is not None:
        ax.set_xlabel(f"{psnr(img[None], ref.detach().cpu()[None]).item():.2f} dB", fontsize=fontsize)
    if title:
        ax.set_title(title, fontsize=fontsize + 1)


def save_comparison_figure(path, data, models, n=4):
    """Input, each model's output and the ground truth on the first n real-like test images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x, y = data.test_real_noisy[:n], data.test_real_clean[:n]
    cols = [("real-like input", x)] + [(k, restore(G.eval(), x)) for k, G in models.items()] + [("ground truth", y)]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.2 * n), squeeze=False)
    for j, (title, imgs) in enumerate(cols):
        for i in range(n):
            show_image(axes[i, j], imgs[i], ref=None if title == "ground truth" else y[i],
                       title=title if i == 0 else None)
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# CLI: every Config field is a flag (--field value); unknown flags are rejected
# ----------------------------------------------------------------------------------------------------------
def _parse_value(f, text):
    if f.type in (bool, "bool"):
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise argparse.ArgumentTypeError(f"--{f.name} expects true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    if f.type in (tuple, "tuple"):
        return tuple(int(v) for v in text.split(","))
    return {"int": int, "float": float, "str": str}.get(f.type, f.type)(text)


def field_comments():
    """{field: its trailing comment in Config, with the comment lines that continue it}: the one source of --help."""
    comments, name = {}, None
    for line in inspect.getsource(Config).splitlines():
        head, _, comment = line.partition("#")
        if m := re.match(r"\s{4}(\w+): \w+ = ", head):                              # `    name: type = default  # ...`
            name = m.group(1)
            comments[name] = comment.strip()
        elif name and not head.strip() and len(head) > 8 and comment:               # an indented continuation line
            comments[name] += " " + comment.strip()
        else:
            name = None                                                             # section headers, NOTEs, code
    return comments


def config_parser(prog, description):
    """An argparse parser with --preset and one --field flag per Config field, each helped by the field's comment."""
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=description)
    p.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS), help="starting config (default cpu-demo); "
                   "the defaults below follow it: --preset paper --help lists the paper's")
    comments = field_comments()
    for f in dataclasses.fields(Config):
        p.add_argument(f"--{f.name}", dest=f"cfg_{f.name}", default=None, metavar="V",
                       type=lambda text, f=f: _parse_value(f, text), help=comments[f.name].replace("%", "%%"))
    return p


def add_preset_defaults(parser, preset):
    """Append each config flag's default under `preset` to its help (resolved values of `auto` fields after ->)."""
    raw, resolved = Config(**PRESETS[preset]), make_config(preset)
    for a in parser._actions:
        if a.dest.startswith("cfg_"):
            name = a.dest[4:]
            a.comment = getattr(a, "comment", a.help)                              # the field's comment alone
            v, r = getattr(raw, name), getattr(resolved, name)
            shown = ",".join(map(str, v)) if isinstance(v, tuple) else v
            a.help = a.comment + f" [{preset}: {shown}{'' if r == v else f' -> {r}'}]".replace("%", "%%")


def parse_args(parser, argv=None):
    """parser.parse_args, but an unknown flag ends as an error that suggests the nearest known ones."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS))
    known, _ = pre.parse_known_args(argv)                                           # --help shows that preset's
    add_preset_defaults(parser, known.preset)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        opts = [o for a in parser._actions for o in a.option_strings]
        near = [(u, difflib.get_close_matches(u.split("=")[0], opts, 2)) for u in unknown]
        hints = [f"{u} (did you mean {', '.join(c)}?)" if c else u for u, c in near]
        parser.error("unknown argument(s): " + "; ".join(hints) + ". Run with --help for the list.")
    return args


def parse_config(args, preset=None, base=None):
    """The preset (args.preset unless given), then the `base` fields, then the --field flags."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    return make_config(preset or args.preset, **{**(base or {}), **overrides})


def report_divergence(prog, e):
    """A training run that diverged ends as one error line and exit status 1 (its last finite checkpoint kept)."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 1


def build_parser():
    p = config_parser("dada_min.py", "Denoising as Adaptation (ICLR 2025), minimal implementation. Without "
                      "--demo: train one method (--method) on built-in data. Own images: folders.py; the paper's "
                      "experiments: experiments.py; throughput: bench.py.")
    p.add_argument("--demo", action="store_true", help="train vanilla, DA and oracle; print the table")
    p.add_argument("--out", default=None, help="output directory (demo default: runs/demo)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return p


def main(argv=None):
    """The demo, or one training run on built-in data. Bad flags or values: an argparse error (exit status 2)."""
    p = build_parser()
    args = parse_args(p, argv)
    try:
        cfg = parse_config(args, base=DEMO if args.demo and args.preset == "cpu-demo" else None)
    except ValueError as e:
        p.error(str(e))
    if args.demo and dist_rank()[1] > 1:
        p.error("--demo runs in one process; under torchrun train one method (--method da --out DIR)")
    say = rank0(print)
    say("config:", json.dumps(dataclasses.asdict(cfg)))
    try:
        if args.demo:
            demo(cfg, args.out or "runs/demo")
        else:
            state = train(cfg, out=args.out, resume=args.resume)
            say(json.dumps(evaluate_pools(state.G_eval, make_data(cfg, pick_device(cfg.device)))))
    except TrainingDiverged as e:
        return report_divergence("dada_min.py", e)
    except ValueError as e:                           # e.g. a resume with other settings than its checkpoint's
        p.error(str(e))
    finally:
        dist_teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
