"""dada-min: Denoising as Adaptation, in one readable file.

Implements "Denoising as Adaptation: Noise-Space Domain Adaptation for Image Restoration"
(Liao, Yue, Wang, Loy; ICLR 2025, arXiv 2406.18516).

The idea in four lines:
  1. A restorer G (residual UNet, y_hat = x + R(x)) is trained on synthetic pairs (x_syn, y_syn).
  2. A conditional diffusion denoiser eps_theta is trained *jointly* on noised synthetic targets,
     conditioned on BOTH restored images (y_syn_hat, y_real_hat); its loss flows back into G.
  3. Two tricks stop shortcuts: channel shuffle (random per-sample swap of the two condition slots)
     and residual-swapping contrastive learning (negatives x_syn + R_real and x_real + R_syn).
  4. At test time the denoiser is thrown away: restoring is one pass of G.

Read top to bottom: config, data, networks, noise schedule, the two anti-shortcut tricks, losses,
the training algorithm, inference, metrics, experiments, CLI.

    python dada_min.py --demo          # vanilla vs DA vs oracle on built-in data (~3 min on 2 CPU cores)
    python dada_min.py --help          # every config field is a flag
"""

# ----------------------------------------------------------------------------------------------------------
# Imports
# ----------------------------------------------------------------------------------------------------------
import argparse
import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
METHODS = {
    # name:        (diffusion loss?, channel shuffle?, contrastive?, diffusion input, conditions)
    "vanilla":     (False, False, False, None, None),       # G on synthetic pairs only (the paper's "Vanilla")
    "da":          (True, True, True, "syn", "both"),       # the paper's full method, Algorithm A in PAPER.md §7
    "no_shuffle":  (True, False, True, "syn", "both"),      # ablation: without channel shuffle (CS)
    "no_contrast": (True, True, False, "syn", "both"),      # ablation: without residual swapping (RS)
    "naive":       (True, False, False, "syn", "both"),     # naive joint training, Table 4 (d)
    "da_ex":       (True, True, False, "ref", "both"),      # "Ours-Ex": noise an unpaired clean image, CS only
    "oracle":      (False, False, False, None, None),       # G on REAL pairs: an upper bound using ground truth
                                                            # that the method itself never sees
    # Table 4's last two rows; the paper does not say how they were built, so this is our reading:
    "only_syn":    (True, False, False, "syn", "syn"),      # both condition slots hold y_syn_hat: real images
                                                            # never reach eps_theta (their gradient is zero)
    "only_real":   (True, False, False, "syn", "real"),     # both slots hold y_real_hat: the noised y_syn is
                                                            # conditioned only on unrelated real outputs
    # simplified baselines for Tables 1-3 (no diffusion model; see "Baselines" below)
    "dann":        (False, False, False, None, None),       # feature-space DA: domain classifier + grad reversal
    "pixel_da":    (False, False, False, None, None),       # pixel-space DA: discriminator on restored outputs
}
ADVERSARIAL = ("dann", "pixel_da")                          # methods that train a critic network alongside G


@dataclass
class Config:
    # --- run ---
    method: str = "da"            # one of METHODS
    task: str = "denoise"         # restoration task; built-in domains exist for: denoise
    seed: int = 0                 # seeds data generation, initialisation and sampling
    device: str = "auto"          # auto (cuda > mps > cpu) | cpu | cuda | mps
    precision: str = "auto"       # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    compile: bool = False         # torch.compile the networks (opt-in; CUDA only)
    # --- built-in data (all images in [0, 1], as the official denoising config) ---
    image_size: int = 48          # side of each generated clean image, px
    patch_size: int = 32          # side of the random training crops, px
    n_syn: int = 512              # clean images behind the synthetic training pairs
    n_real: int = 512             # unpaired real-like training images (from OTHER clean images)
    n_test: int = 64              # images in each of the synthetic and real-like test sets
    sigma_max: float = 50.0       # synthetic AWGN: sigma ~ U[0, sigma_max] / 255 per image (paper: 75)
    real_noise: str = "camera"    # real-like domain: camera (Bayer pipeline, correlated) | white (sRGB Poisson-Gauss)
    # --- restorer G (residual UNet) ---
    r_width: int = 16             # channels at the first level (paper: 64)
    r_depth: int = 3              # UNet levels; inputs are padded to a multiple of 2^(depth-1) (paper: 4)
    # --- conditional denoiser eps_theta ---
    d_width: int = 16             # base channels (paper: 64)
    d_mults: tuple = (1, 2)       # channel multiplier per level (paper: 1,2,4,8)
    d_res_blocks: int = 1         # residual blocks per level (paper: 2)
    d_attn: bool = False          # self-attention at the bottleneck (paper: yes)
    d_dropout: float = 0.0        # dropout inside residual blocks (paper: 0.2)
    # --- noise schedule (DDPM, PAPER.md §3.1) ---
    T: int = 1000                 # diffusion steps
    beta_start: float = 1e-6      # first beta of the linear schedule
    beta_end: float = 1e-2        # last beta of the linear schedule
    t_min: int = 1                # training draws t ~ U{t_min..t_max} (Table 4 ablates this range)
    t_max: int = 999              # at most T-1 (gamma is drawn between alphas_cumprod[t] and [t-1])
    # --- the method ---
    alpha_max: float = 0.2        # final weight of the diffusion loss (official diff_weight)
    ramp_frac: float = 0.5        # fraction of training over which alpha ramps up (official: 300 epochs)
    margin: float = 0.1           # triplet hinge margin, Eq. (3) (official: 0.1)
    # --- optimisation ---
    steps: int = 1200             # training steps
    batch_size: int = 16          # synthetic pairs per step (and as many real images)
    lr: float = 1e-3              # Adam learning rate, constant, shared by G and eps_theta (paper: 1e-4)
    ema_decay: float = 0.995      # EMA of G's weights; evaluation uses the EMA copy (paper: 0.9999)
    eval_every: int = 300         # evaluate PSNR and the mechanism diagnostic every N steps (0: only at the end)
    log_every: int = 100          # print losses every N steps

    def validate(self):
        """Reject values that would fail later with an obscure error."""
        def bad(name, why):
            raise ValueError(f"config: {name}={getattr(self, name)!r} {why}")
        if self.method not in METHODS:
            bad("method", f"is not one of {sorted(METHODS)}")
        if self.task not in TASKS:
            bad("task", f"is not one of {sorted(TASKS)}")
        if self.real_noise not in TASKS[self.task]["real"]:
            bad("real_noise", f"is not one of {sorted(TASKS[self.task]['real'])} for task {self.task!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            bad("precision", "must be auto, fp32, bf16 or fp16")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            bad("device", "must be auto, cpu, cuda, cuda:N or mps")
        if self.patch_size > self.image_size:
            bad("patch_size", f"must be <= image_size ({self.image_size})")
        if self.patch_size % 2 ** (self.r_depth - 1) or self.patch_size % 2 ** (len(self.d_mults) - 1):
            bad("patch_size", "must be divisible by 2^(r_depth-1) and 2^(len(d_mults)-1)")
        if not 1 <= self.t_min <= self.t_max <= self.T - 1:
            bad("t_max", f"needs 1 <= t_min ({self.t_min}) <= t_max <= T-1 ({self.T - 1})")
        for name in ("steps", "batch_size", "n_syn", "n_real", "n_test", "r_width", "d_width", "r_depth"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        return self


PRESETS = {
    # Finishes `--demo` (three trainings) in about 3 minutes on 2 CPU cores.
    "cpu-demo": dict(),
    # A few seconds: used by the tests and quick CI runs.
    "tiny": dict(image_size=32, patch_size=16, n_syn=32, n_real=32, n_test=8, r_width=8, r_depth=2,
                 d_width=8, d_mults=(1, 2), steps=20, batch_size=4, eval_every=10, log_every=10),
    # A larger run for one GPU (minutes).
    "gpu": dict(image_size=96, patch_size=64, n_syn=4096, n_real=4096, n_test=128, r_width=32, r_depth=4,
                d_width=64, d_mults=(1, 2, 4), d_res_blocks=2, steps=6000, batch_size=32, lr=5e-4,
                ema_decay=0.999, eval_every=1000, log_every=250),
    # The official network sizes (PAPER.md §9): G depth 4 width 64, eps_theta base 64, mults 1,2,4,8,
    # two residual blocks per level, bottleneck attention, dropout 0.2, 128 px patches, lr 1e-4.
    "paper": dict(image_size=160, patch_size=128, n_syn=1024, n_real=1024, n_test=64, sigma_max=75.0,
                  r_width=64, r_depth=4, d_width=64, d_mults=(1, 2, 4, 8), d_res_blocks=2, d_attn=True,
                  d_dropout=0.2, batch_size=3, lr=1e-4, ema_decay=0.9999, steps=100000, eval_every=5000,
                  log_every=500),
}


def make_config(preset="cpu-demo", **overrides):
    """A validated Config: the preset's values, then the overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
    return Config(**{**PRESETS[preset], **overrides}).validate()


# ----------------------------------------------------------------------------------------------------------
# Data: clean images, the two degradations, four pools
# ----------------------------------------------------------------------------------------------------------
def dead_leaves(n, size, gen, n_discs=250, min_radius=3.0, device="cpu", chunk=32):
    """Clean images with natural-image statistics: the dead-leaves model (occluding discs whose radii
    follow p(r) ~ r^-3, the scale-invariant choice, each with a gentle shading ramp). min_radius (px)
    keeps the finest detail distinguishable from noise for a tiny restorer. Rendered at 2x and
    box-downsampled for soft edges. Random numbers come from `gen` on the CPU, so the images are the
    same on every device. Returns (n, 3, size, size) in [0, 1]."""
    s = 2 * size
    r_min, r_max = 2.0 * min_radius, s / 2                                           # in render pixels
    u = torch.rand(n, n_discs, generator=gen)
    # inverse-CDF sampling of p(r) ~ r^-3 on [r_min, r_max]
    radius = ((r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5).to(device)   # (n, K)
    centre = (torch.rand(n, n_discs, 2, generator=gen) * s).to(device)              # (n, K, 2) as (y, x)
    colour = (torch.rand(n, n_discs, 3, generator=gen) ** 1.5).to(device)           # (n, K, 3), darker bias
    slope = ((torch.rand(n, n_discs, 2, generator=gen) - 0.5) * 0.6 / s).to(device) # (n, K, 2) shading
    background = torch.rand(n, 3, generator=gen).to(device)                         # (n, 3)
    ar = torch.arange(s, dtype=torch.float32, device=device)
    yx = torch.stack(torch.meshgrid(ar, ar, indexing="ij"), -1).view(1, s * s, 2)  # (1, s*s, 2) pixel coords
    out = []
    for i in range(0, n, chunk):                  # chunks bound the (m, K, s, s) memory
        c, r = centre[i:i + chunk], radius[i:i + chunk]
        dy = ar.view(1, 1, s, 1) - c[:, :, 0, None, None]                           # (m, K, s, 1)
        dx = ar.view(1, 1, 1, s) - c[:, :, 1, None, None]                           # (m, K, 1, s)
        inside = (dy ** 2 + dx ** 2 < r[:, :, None, None] ** 2).flatten(2)          # (m, K, s*s)
        # dead leaves: each pixel shows the FIRST disc that covers it (argmax returns the first max)
        front = inside.to(torch.uint8).argmax(1)                                    # (m, s*s)

        def pick(v):                                                                # per-pixel disc parameter
            return v[i:i + chunk].gather(1, front[..., None].expand(-1, -1, v.shape[-1]))
        shade = 1 + (pick(slope) * (yx - pick(centre))).sum(-1, keepdim=True)       # (m, s*s, 1)
        img = torch.where(inside.any(1)[..., None], pick(colour) * shade, background[i:i + chunk, None])
        out.append(img.view(-1, s, s, 3).permute(0, 3, 1, 2))                       # (m, 3, s, s)
    return F.avg_pool2d(torch.cat(out), 2).clamp(0, 1)


def add_awgn(y, sigma_max, gen=None):
    """Synthetic degradation: x = y + N(0, sigma^2), sigma ~ U[0, sigma_max]/255 per image, no clipping
    (as the official denoising code)."""
    sigma = torch.rand(y.shape[0], 1, 1, 1, generator=gen, device=y.device) * sigma_max / 255
    return y + sigma * torch.randn(y.shape, generator=gen, device=y.device)


def srgb_to_linear(x):
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x):
    x = x.clamp(min=0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp(min=1e-8) ** (1 / 2.4) - 0.055)


# camera RGB -> linear sRGB colour-correction matrix (rows sum to 1, typical saturation boost)
CCM = torch.tensor([[1.75, -0.55, -0.20],
                    [-0.25, 1.55, -0.30],
                    [0.05, -0.60, 1.55]])


def bayer_masks(h, w, device=None):
    """RGGB mosaic: (3, h, w) 0/1 masks saying which colour each photosite measures."""
    m = torch.zeros(3, h, w, device=device)
    m[0, 0::2, 0::2] = 1
    m[1, 0::2, 1::2] = 1
    m[1, 1::2, 0::2] = 1
    m[2, 1::2, 1::2] = 1
    return m


def demosaic_bilinear(raw, masks):
    """Bilinear demosaicing of (n, 1, h, w) raw data into (n, 3, h, w). Interpolation spreads each
    photosite's noise over its neighbours: the source of the spatial correlation of camera noise."""
    k_rb = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]], device=raw.device) / 4
    k_g = torch.tensor([[0., 1., 0.], [1., 4., 1.], [0., 1., 0.]], device=raw.device) / 4
    kernels = torch.stack([k_rb, k_g, k_rb])[:, None]                               # (3, 1, 3, 3)
    planes = F.pad(raw * masks, (1, 1, 1, 1), mode="reflect")                       # (n, 3, h+2, w+2)
    return F.conv2d(planes, kernels, groups=3)


def camera_noise(y, gen=None, shot=(1e-3, 1e-2), read=(1e-6, 1e-4)):
    """Real-like degradation: signal-dependent Poisson-Gaussian noise added on a Bayer mosaic in linear
    camera space, then demosaiced, white-balanced, colour-corrected and gamma-encoded, so the noise in
    the sRGB image is spatially correlated, colour-correlated and depends on brightness.
    shot, read: log-uniform ranges of the per-image shot gain a and read variance b (var = a*x + b).
    Only the noise goes through the pipeline: x = y + P(raw + n) - P(raw), so that without noise the
    image is unchanged and the clean target stays y (as a real dataset's ground truth is made by the
    same pipeline from a noise-free capture)."""
    n, _, h, w = y.shape
    dev = y.device

    def log_uniform(lo, hi):
        return torch.exp(math.log(lo) + torch.rand(n, 1, 1, 1, generator=gen).to(dev) * math.log(hi / lo))
    a, b = log_uniform(*shot), log_uniform(*read)
    wb = 1.6 + 0.8 * torch.rand(n, 3, 1, 1, generator=gen).to(dev)                 # red/blue white-balance gains
    wb[:, 1] = 1.0
    ccm = CCM.to(dev)
    masks = bayer_masks(h, w, dev)

    def to_srgb(raw):                                                               # the camera's processing P
        lin = torch.einsum("ij,njhw->nihw", ccm, demosaic_bilinear(raw, masks) * wb)
        return linear_to_srgb(lin)
    cam = torch.einsum("ij,njhw->nihw", torch.linalg.inv(ccm), srgb_to_linear(y)) / wb  # undo CCM and WB
    raw = (cam.clamp(0, 1) * masks).sum(1, keepdim=True)                            # (n, 1, h, w) mosaic
    noisy_raw = raw + torch.sqrt(a * raw + b) * torch.randn(raw.shape, generator=gen).to(dev)
    return (y + to_srgb(noisy_raw) - to_srgb(raw)).clamp(0, 1)


def white_noise(y, gen=None, sigma=(30.0, 60.0)):
    """A second real-like domain whose residual is high-frequency: spatially and colour-white
    Poisson-Gaussian noise in sRGB (variance grows with brightness), per-image effective sigma in
    `sigma`/255, clipped to [0, 1]. Pair it with a narrow synthetic range (e.g. sigma_max=15)."""
    n = y.shape[0]
    s = (sigma[0] + (sigma[1] - sigma[0]) * torch.rand(n, 1, 1, 1, generator=gen, device=y.device)) / 255
    var = s ** 2 * (0.25 + 1.5 * y)          # mean of (0.25 + 1.5 y) is ~1 for y ~ U[0, 1]
    return (y + var.sqrt() * torch.randn(y.shape, generator=gen, device=y.device)).clamp(0, 1)


# task -> its synthetic degradation and its built-in real-like degradations
TASKS = {
    "denoise": {"synthetic": add_awgn, "real": {"camera": camera_noise, "white": white_noise}},
}


@dataclass
class Data:
    """The four pools, each (N, 3, H, W) in [0, 1] and already on the training device.
    syn_clean:  clean images; synthetic inputs are made from them online (fresh noise every step)
    real_noisy: unpaired real-like training images (their clean versions are never used by DA)
    real_clean: ONLY for the oracle and for the mechanism diagnostic (the method never sees it)
    test_*:     synthetic and real-like test sets with ground truth"""
    syn_clean: torch.Tensor
    real_noisy: torch.Tensor
    real_clean: torch.Tensor
    test_syn_noisy: torch.Tensor
    test_syn_clean: torch.Tensor
    test_real_noisy: torch.Tensor
    test_real_clean: torch.Tensor

    def to(self, device):
        return Data(**{k: v.to(device) for k, v in vars(self).items()})


def make_data(cfg, device="cpu"):
    """Deterministic built-in data from cfg.seed: four disjoint sets of clean images."""
    gen = torch.Generator().manual_seed(cfg.seed)
    task = TASKS[cfg.task]
    real_fn = task["real"][cfg.real_noise]
    n, s = cfg.n_syn + cfg.n_real + 2 * cfg.n_test, cfg.image_size
    clean = dead_leaves(n, s, gen)
    syn_clean, real_clean, test_syn_clean, test_real_clean = clean.split(
        [cfg.n_syn, cfg.n_real, cfg.n_test, cfg.n_test])
    data = Data(syn_clean=syn_clean,
                real_noisy=real_fn(real_clean, gen),
                real_clean=real_clean,
                test_syn_noisy=task["synthetic"](test_syn_clean, cfg.sigma_max, gen),
                test_syn_clean=test_syn_clean,
                test_real_noisy=real_fn(test_real_clean, gen),
                test_real_clean=test_real_clean)
    return data.to(device)


def dihedral(x, k):
    """The k-th of the 8 dihedral transforms (k in 0..7): rotate by 90*(k % 4) degrees, flip if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def random_crops(pool, n, patch):
    """n random patches (n, C, patch, patch) from a pool (N, C, H, W), each with its own random crop
    and one of the 8 dihedral transforms. Channels stay together, so stacking (input, target) along C
    keeps pairs aligned."""
    N, C, H, W = pool.shape
    dev = pool.device
    idx = torch.randint(N, (n,), device=dev)
    oy = torch.randint(H - patch + 1, (n,), device=dev)
    ox = torch.randint(W - patch + 1, (n,), device=dev)
    ar = torch.arange(patch, device=dev)
    iy = (oy[:, None] + ar)[:, :, None]                                             # (n, p, 1)
    ix = (ox[:, None] + ar)[:, None, :]                                             # (n, 1, p)
    out = pool[idx[:, None, None], :, iy, ix].permute(0, 3, 1, 2)                   # (n, C, p, p)
    k = torch.randint(8, (n,), device=dev)
    for t in range(8):
        sel = k == t
        if sel.any():
            out[sel] = dihedral(out[sel], t)
    return out


def syn_batch(data, cfg):
    """Synthetic pairs (x_syn, y_syn), both (B, 3, p, p): crop + augment the clean image, then degrade."""
    y_syn = random_crops(data.syn_clean, cfg.batch_size, cfg.patch_size)
    return TASKS[cfg.task]["synthetic"](y_syn, cfg.sigma_max), y_syn


def real_batch(data, cfg):
    """Unpaired real-like inputs x_real (B, 3, p, p), cropped and augmented independently of syn_batch."""
    return random_crops(data.real_noisy, cfg.batch_size, cfg.patch_size)


def real_pairs_batch(data, cfg):
    """(x_real, y_real) pairs for the oracle and the diagnostic: same crop and transform for both."""
    both = random_crops(torch.cat([data.real_noisy, data.real_clean], 1), cfg.batch_size, cfg.patch_size)
    return both[:, :3], both[:, 3:]


def ref_batch(data, cfg):
    """Unpaired clean images y_c for "Ours-Ex": drawn independently of the synthetic batch (the
    official code's default reference list is the synthetic ground truth, shuffled separately)."""
    return random_crops(data.syn_clean, cfg.batch_size, cfg.patch_size)


# ----------------------------------------------------------------------------------------------------------
# Networks: the restorer G and the conditional denoiser eps_theta
# ----------------------------------------------------------------------------------------------------------
def conv3(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class RestorerUNet(nn.Module):
    """G: the official RestorationNet in miniature. Each level: two 3x3 convs + LeakyReLU(0.2), then
    average pooling; the decoder upsamples bilinearly, concatenates the skip and applies two convs.
    No normalisation. forward() returns the RESIDUAL R(x); the restored image is x + R(x)."""

    def __init__(self, width=16, depth=3):
        super().__init__()
        self.depth = depth
        chans = [width * 2 ** i for i in range(depth)]                              # e.g. 16, 32, 64
        act = nn.LeakyReLU(0.2)
        self.down = nn.ModuleList()
        c_prev = 3
        for c in chans:
            self.down.append(nn.Sequential(conv3(c_prev, c), act, conv3(c, c), act))
            c_prev = c
        self.up_conv = nn.ModuleList()
        self.up_block = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up_conv.append(conv3(c_prev, c))                                   # after bilinear x2
            self.up_block.append(nn.Sequential(conv3(2 * c, c), act, conv3(c, c), act))
            c_prev = c
        self.last = conv3(c_prev, 3)
        # NOTE(simplification): the residual head starts at zero, so G starts as the identity map
        # (y_hat = x) and short CPU runs never begin worse than the input. The official code uses
        # Kaiming initialisation everywhere.
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
        # residual R(x): (B, 3, H, W); the bottleneck features only for the feature-space baseline (DANN)
        return (self.last(x), features) if return_features else self.last(x)


def gamma_embedding(gamma, dim, max_period=10000):
    """Sinusoidal embedding of the continuous noise level gamma in (0, 1] (SR3/Palette: the network is
    told gamma itself, not the step index t). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=gamma.device) / half)
    args = gamma.float()[:, None] * freqs[None]                                     # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


def norm(c):
    return nn.GroupNorm(math.gcd(32, c), c)


class ResBlock(nn.Module):
    """Guided-diffusion residual block: GroupNorm-SiLU-conv, then the noise-level embedding applied as
    scale-shift (FiLM) after the second norm, SiLU, dropout, conv; optional 2x down/upsampling."""

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
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        h = self.conv1(self._resample(self.in_layers(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, 1)                  # (B, c, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift                                     # FiLM by gamma
        return self.skip(self._resample(x)) + self.out_layers(h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (used at the bottleneck only, as in the official
    denoiser, where attn_res never matches any other level)."""

    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # (B, HW, C)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]        # (B, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class ConditionalDenoiser(nn.Module):
    """eps_theta: a guided-diffusion style UNet. Input cat[y_t, c1, c2] (B, 9, H, W) and gamma (B,);
    output the predicted noise eps_hat (B, 3, H, W)."""

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
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout),
                                  AttnBlock(c) if attn else nn.Identity(),
                                  ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, c_out in reversed(list(enumerate(chans))):
            for j in range(res_blocks + 1):
                self.up.append(ResBlock(c + skip_ch.pop(), c_out, emb_dim, dropout))
                c = c_out
                if i > 0 and j == res_blocks:                                       # upsample by a ResBlock
                    self.up.append(ResBlock(c, c, emb_dim, dropout, resample="up"))
        self.out = nn.Sequential(norm(c), nn.SiLU(), conv3(c, 3))

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


def make_networks(cfg):
    """G and eps_theta as the config describes them (on the CPU, in float32)."""
    G = RestorerUNet(cfg.r_width, cfg.r_depth)
    D = ConditionalDenoiser(cfg.d_width, tuple(cfg.d_mults), cfg.d_res_blocks, cfg.d_attn, cfg.d_dropout)
    return G, D


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# Noise schedule (DDPM), PAPER.md §3.1
# ----------------------------------------------------------------------------------------------------------
class NoiseSchedule(nn.Module):
    """Linear betas, computed in float64 and stored as float32 buffers (so .to(device) moves them and
    autocast never touches them). alphas_cumprod[i] is the paper's alpha_bar_{i+1}; the code calls the
    continuous version of it gamma."""

    def __init__(self, T=1000, beta_start=1e-6, beta_end=1e-2):
        super().__init__()
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.T = T
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())             # (T,), decreasing, in (0, 1)

    def sample_gamma(self, n, t_min=1, t_max=None):
        """SR3-style continuous noise level: t ~ U{t_min..t_max}, gamma ~ U(abar[t], abar[t-1]).
        The official code uses t in 1..T-1; Table 4 restricts this range. Returns (n,)."""
        t_max = self.T - 1 if t_max is None else t_max
        ac = self.alphas_cumprod
        t = torch.randint(t_min, t_max + 1, (n,), device=ac.device)
        lo, hi = ac[t], ac[t - 1]
        return lo + (hi - lo) * torch.rand(n, device=ac.device)

    @staticmethod
    def q_sample(y0, gamma, eps):
        """Forward diffusion: y_t = sqrt(gamma) * y0 + sqrt(1 - gamma) * eps (gamma: (B,))."""
        g = gamma.view(-1, 1, 1, 1).to(y0.dtype)
        return g.sqrt() * y0 + (1 - g).sqrt() * eps

    @torch.no_grad()
    def sample(self, denoiser, cond, stride=1):
        """Ancestral DDPM sampling of y0 given the two conditions cond = cat[c1, c2] (B, 6, H, W).
        The official code never samples; this exists so notebooks can show what eps_theta learned.
        stride > 1 visits every stride-th step (a respaced DDPM, same posterior formulas)."""
        ac_all = self.alphas_cumprod
        ts = list(range(self.T - 1, -1, -stride))
        y = torch.randn(cond.shape[0], 3, *cond.shape[2:], device=cond.device)
        for i, t in enumerate(ts):
            ac = ac_all[t]
            ac_prev = ac_all[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(ac)
            alpha = ac / ac_prev                                                    # this (respaced) step's 1 - beta
            gamma = ac.expand(y.shape[0])
            eps = denoiser(torch.cat([y, cond], 1), gamma).float()
            mean = (y - (1 - alpha) / (1 - ac).sqrt() * eps) / alpha.sqrt()
            if i + 1 < len(ts):                                                     # no noise at the last step
                var = (1 - alpha) * (1 - ac_prev) / (1 - ac)
                y = mean + var.sqrt() * torch.randn_like(y)
            else:
                y = mean
        return y


# ----------------------------------------------------------------------------------------------------------
# The two anti-shortcut tricks
# ----------------------------------------------------------------------------------------------------------
def channel_shuffle(c_syn, c_real, enabled=True):
    """Channel-shuffling layer (CS): for each sample independently, with probability 1/2, swap which
    condition slot holds the synthetic and which the real image, so eps_theta cannot learn "slot 2 is
    always the real one". Redrawn on every call. The noisy y_t is not touched (it stays in front).
    Returns (c1, c2, swapped) with swapped: (B,) bool."""
    if not enabled:
        return c_syn, c_real, torch.zeros(c_syn.shape[0], dtype=torch.bool, device=c_syn.device)
    swapped = torch.rand(c_syn.shape[0], device=c_syn.device) < 0.5                 # (B,)
    m = swapped.view(-1, 1, 1, 1)
    return torch.where(m, c_real, c_syn), torch.where(m, c_syn, c_real), swapped


def residual_swap(x_syn, r_syn, x_real, r_real):
    """Residual-swapping (RS) negatives, Eq. (2): each input gets the OTHER domain's predicted residual,
    x_syn + R(x_real) and x_real + R(x_syn). Nothing is detached: the hinge also trains G."""
    return x_syn + r_real, x_real + r_syn


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
def charbonnier(pred, target, eps=1e-3):
    """L_Res: mean sqrt((pred - target)^2 + eps^2), a smooth L1."""
    return torch.sqrt((pred - target) ** 2 + eps ** 2).mean()


def triplet_hinge(eps, eps_pos, eps_neg, margin=0.1):
    """Eq. (3) as in the official code: relu(MSE(eps, eps_pos) - MSE(eps, eps_neg) + margin), with each
    MSE averaged over the WHOLE batch, so there is one hinge per batch, not one per sample."""
    return F.relu(F.mse_loss(eps_pos, eps) - F.mse_loss(eps_neg, eps) + margin)


def diffusion_loss(denoiser, schedule, y0, cond_syn, cond_real, neg=None, shuffle=True, margin=0.1,
                   t_range=(1, None), gamma=None, eps=None):
    """The noise-space loss L_noise.
    y0:        (B, 3, H, W) clean image that is noised (y_syn; an unpaired clean image for Ours-Ex)
    cond_syn, cond_real: (B, 3, H, W) restored images y_syn_hat = x_syn + R_syn, y_real_hat = x_real + R_real
    neg:       None, or the RS negatives (x_syn + R_real, x_real + R_syn)
    Eq. (1): MSE(eps, eps_theta(cat[y_t, c1, c2], gamma)). With negatives, the negative pass uses the SAME
    y_t, eps and gamma with its own slot swap, and the loss is (Eq. (1) + Eq. (3)) / 2.
    Returns (loss, parts) with parts a dict of detached scalars."""
    B = y0.shape[0]
    gamma = schedule.sample_gamma(B, *t_range) if gamma is None else gamma          # (B,)
    eps = torch.randn_like(y0) if eps is None else eps
    y_t = schedule.q_sample(y0, gamma, eps)                                         # (B, 3, H, W)
    c1, c2, _ = channel_shuffle(cond_syn, cond_real, shuffle)
    eps_pos = denoiser(torch.cat([y_t, c1, c2], 1), gamma).float()                  # input (B, 9, H, W)
    mse_pos = F.mse_loss(eps_pos, eps)                                              # Eq. (1)
    if neg is None:
        return mse_pos, {"mse": mse_pos.detach()}
    n1, n2, _ = channel_shuffle(neg[0], neg[1], shuffle)                            # its own, independent swap
    eps_neg = denoiser(torch.cat([y_t, n1, n2], 1), gamma).float()
    hinge = triplet_hinge(eps, eps_pos, eps_neg, margin)                            # Eq. (3)
    return (mse_pos + hinge) / 2, {"mse": mse_pos.detach(), "mse_neg": F.mse_loss(eps_neg, eps).detach(),
                                   "hinge": hinge.detach()}


def alpha_ramp(step, total_ramp_steps, alpha_max=0.2):
    """Weight of the diffusion loss: DANN-style sigmoid ramp (2 / (1 + exp(-5 p)) - 1) * alpha_max,
    p = step / total_ramp_steps clipped to 1. Starts at 0, reaches 0.987 * alpha_max."""
    p = min(step / max(total_ramp_steps, 1), 1.0)
    return (2 / (1 + math.exp(-5 * p)) - 1) * alpha_max


def condition_pair(which, y_syn_hat, y_real_hat):
    """The two restored images that fill eps_theta's condition slots C(c1, c2). "both" is the method:
    (y_syn_hat, y_real_hat). "syn" and "real" are our reading of Table 4's "only syn" / "only real" rows:
    the same image in both slots, so the other domain never reaches eps_theta."""
    return {"both": (y_syn_hat, y_real_hat), "syn": (y_syn_hat, y_syn_hat), "real": (y_real_hat, y_real_hat)}[which]


# ----------------------------------------------------------------------------------------------------------
# Baselines: feature-space DA (DANN) and pixel-space DA, in their simplest form (Tables 1-3 in miniature)
# ----------------------------------------------------------------------------------------------------------
# NOTE(simplification): the paper retrains published DANN / PixelDA models; these are the smallest versions
# of the two ideas that share G, the data, the one Adam optimiser, the step budget and the weight ramp
# alpha(step) with DA, so the comparison isolates WHERE the domains are aligned (features, pixels, noise).
# Both play their minimax game through a gradient-reversal layer, so they fit the same one-backward loop:
# the critic minimises its classification loss while G, receiving the reversed gradient, maximises it.
class GradReverse(torch.autograd.Function):
    """Identity on the way forward; multiplies the gradient by -lam on the way back (Ganin & Lempitsky)."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def make_critic(cfg):
    """The adversary of an ADVERSARIAL method (None for the others), sized from the restorer's width.
    dann:     domain classifier on G's bottleneck features (B, C, h, w) -> per-location logits (B, 1, h, w),
              "is this location from a synthetic input?"
    pixel_da: PatchGAN-style discriminator on images (B, 3, p, p) -> per-patch logits (B, 1, p/4, p/4),
              "is this patch a clean image?" (each logit sees an 18 px window: enough for noise texture)"""
    act = nn.LeakyReLU(0.2)
    if cfg.method == "dann":
        c = cfg.r_width * 2 ** (cfg.r_depth - 1)                                    # bottleneck channels
        return nn.Sequential(conv3(c, c), act, nn.Conv2d(c, 1, 1))
    if cfg.method == "pixel_da":
        w = cfg.r_width
        return nn.Sequential(nn.Conv2d(3, w, 4, 2, 1), act, nn.Conv2d(w, 2 * w, 4, 2, 1), act, conv3(2 * w, 1))
    return None


def bce_logits(logits, label):
    """Binary cross-entropy of logits against a constant label (0. or 1.)."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), label))


def adversarial_loss(method, G, critic, x_syn, y_syn, x_real, lam):
    """L_Res + the critic's loss, with the critic's input passed through gradient reversal (weight lam).
    dann:     the critic tells synthetic (label 1) from real (label 0) bottleneck features of G; reversed,
              this makes G's features domain-invariant (feature-space DA).
    pixel_da: the critic tells clean synthetic targets y_syn (label 1) from restored real outputs
              y_real_hat (label 0); reversed, this makes restored real images look clean (pixel-space DA;
              NOTE(simplification): no image-to-image translation network as in PixelDA / CycleGAN, the
              restorer itself is the generator, as in output-space adaptation).
    Returns (loss, parts)."""
    B = x_syn.shape[0]
    if method == "dann":
        r, feats = G(torch.cat([x_syn, x_real]), return_features=True)             # (2B, 3, p, p), (2B, C, h, w)
        # the critic sees layer-normalised features: otherwise G "wins" the game by inflating their scale
        # without bound (G has no normalisation layers) and training diverges
        feats = F.layer_norm(feats.float(), feats.shape[1:])
        logits = critic(GradReverse.apply(feats, lam))                              # (2B, 1, h, w)
        adv = (bce_logits(logits[:B], 1.0) + bce_logits(logits[B:], 0.0)) / 2
        r_syn = r[:B].float()
    else:
        r_syn, r_real = G(torch.cat([x_syn, x_real])).float().chunk(2)              # residuals R_syn, R_real
        y_real_hat = x_real + r_real
        adv = (bce_logits(critic(y_syn), 1.0) + bce_logits(critic(GradReverse.apply(y_real_hat, lam)), 0.0)) / 2
    loss_res = charbonnier(x_syn + r_syn, y_syn)                                    # L_Res on synthetic pairs
    return loss_res + adv, {"loss_res": loss_res.detach(), "loss_adv": adv.detach(), "alpha": lam}


# ----------------------------------------------------------------------------------------------------------
# Training: Algorithm A (DA), B (Ours-Ex), vanilla and oracle in one explicit loop
# ----------------------------------------------------------------------------------------------------------
def pick_device(name="auto"):
    """The one place that decides the device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but CUDA is not available; use --device auto or cpu")
    return dev


def pick_precision(precision, device):
    """(autocast dtype or None, needs GradScaler). bf16 where the GPU supports it, fp16 + GradScaler on
    older GPUs, plain fp32 on CPU and MPS (autocast there would only slow tiny networks down)."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    return torch.float16, device.type == "cuda"


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class TrainState:
    """Everything a training run produces and a checkpoint holds."""
    cfg: Config
    G: RestorerUNet                   # the restorer being trained
    G_ema: RestorerUNet               # its exponential moving average (used for evaluation and restore)
    D: ConditionalDenoiser            # eps_theta (unused by vanilla and oracle; thrown away after training)
    schedule: NoiseSchedule
    opt: torch.optim.Optimizer        # ONE Adam over G and eps_theta (and the critic, if any)
    step: int = 0
    history: dict = field(default_factory=dict)
    critic: nn.Module = None          # the adversary of the ADVERSARIAL baselines (None for the other methods)


def init_state(cfg, device):
    """Fresh networks and optimiser, seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)
    G, D = make_networks(cfg)
    G, D = G.to(device), D.to(device)
    if device.type == "cuda":                                                       # faster convs on tensor cores
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    critic = make_critic(cfg)
    critic = critic.to(device) if critic is not None else None
    uses_diffusion = METHODS[cfg.method][0]
    params = list(G.parameters()) + (list(D.parameters()) if uses_diffusion else [])
    params += list(critic.parameters()) if critic is not None else []
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=device.type == "cuda")
    hist = {"step": [], "loss_res": [], "loss_dif": [], "alpha": [], "hinge": [],
            "eval_step": [], "syn_psnr": [], "real_psnr": [], "diag_cos": []}
    return TrainState(cfg, G, copy.deepcopy(G).requires_grad_(False), D,
                      NoiseSchedule(cfg.T, cfg.beta_start, cfg.beta_end).to(device), opt, 0, hist, critic)


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)


def train_step(state, data, gmodels=None):
    """One step of the training algorithm (PAPER.md §7, Algorithm A; B for da_ex). Returns a dict of
    detached loss tensors (no host synchronisation here: .item() happens only when logging)."""
    cfg, s = state.cfg, state
    G, D = gmodels or (s.G, s.D)                                                    # possibly compiled copies
    uses_diffusion, shuffle, contrast, dif_input, conditions = METHODS[cfg.method]
    device = next(s.G.parameters()).device
    amp_dtype, _ = pick_precision(cfg.precision, device)
    # line 1: sample a synthetic pair and, independently, an unpaired real image
    if cfg.method == "oracle":
        x_syn, y_syn = real_pairs_batch(data, cfg)                                  # ground truth: upper bound
    else:
        x_syn, y_syn = syn_batch(data, cfg)                                         # (B, 3, p, p) each
    with autocast(device, amp_dtype):
        if cfg.method in ADVERSARIAL:                                               # the simplified baselines
            lam = alpha_ramp(s.step, cfg.ramp_frac * cfg.steps, cfg.alpha_max)     # same ramp as DA's alpha
            loss, parts = adversarial_loss(cfg.method, G, s.critic, x_syn, y_syn, real_batch(data, cfg), lam)
        elif not uses_diffusion:
            y_syn_hat = x_syn + G(x_syn)
            loss_res = charbonnier(y_syn_hat.float(), y_syn)                        # L_Res
            loss, parts = loss_res, {"loss_res": loss_res.detach()}
        else:
            x_real = real_batch(data, cfg)
            # line 2: restore both domains with the same G (one batched pass; G has no batch statistics)
            r_syn, r_real = G(torch.cat([x_syn, x_real])).float().chunk(2)          # residuals R_syn, R_real
            y_syn_hat, y_real_hat = x_syn + r_syn, x_real + r_real
            loss_res = charbonnier(y_syn_hat, y_syn)                                # L_Res on synthetic pairs
            # line 3: the image that is noised: y_syn (Algorithm A) or an unpaired clean image (B)
            y0 = y_syn if dif_input == "syn" else ref_batch(data, cfg)
            # line 4: residual-swapped negatives (RS), if enabled
            neg = residual_swap(x_syn, r_syn, x_real, r_real) if contrast else None
            # lines 5-6: noise, shuffle the condition slots (CS), predict the noise, Eq. (1) and (3)
            c_a, c_b = condition_pair(conditions, y_syn_hat, y_real_hat)            # (y_syn_hat, y_real_hat) for DA
            loss_dif, dparts = diffusion_loss(D, s.schedule, y0, c_a, c_b, neg, shuffle,
                                              cfg.margin, (cfg.t_min, cfg.t_max))
            alpha = alpha_ramp(s.step, cfg.ramp_frac * cfg.steps, cfg.alpha_max)
            # line 7: the total loss, one backward through G and eps_theta (nothing detached)
            loss = loss_res + alpha * loss_dif
            parts = {"loss_res": loss_res.detach(), "loss_dif": loss_dif.detach(), "alpha": alpha,
                     **({"hinge": dparts["hinge"]} if contrast else {})}
    # line 8: one optimiser step over both networks, then the EMA of G
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    s.opt.step()
    ema_update(s.G_ema, s.G, min(cfg.ema_decay, (1 + s.step) / (10 + s.step)))   # warm-up: early EMA follows G
    s.step += 1
    return parts


def mechanism_diagnostic(state, x_syn, y_syn, x_real, y_real, gamma=None, draws=4):
    """Does the diffusion loss push restored real images toward their clean targets?
    Returns the mean over samples (and `draws` noise draws) of cos(-dL/dR_real, y_real - y_real_hat),
    where L is the method's diffusion loss and R_real the residual G predicts for x_real (so the push
    through the RS negatives is included). Positive: the loss moves real outputs toward clean.
    Only possible on built-in data, where the real-like clean images are known."""
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
        loss, _ = diffusion_loss(D, state.schedule, y_syn, c_a, c_b, neg, shuffle,
                                 cfg.margin, (cfg.t_min, cfg.t_max), gamma=g)
        (grad,) = torch.autograd.grad(loss, r, allow_unused=True)
        grad = torch.zeros_like(r) if grad is None else grad                        # "only_syn": R_real unused
        to_clean = (y_real - (x_real + r_real)).flatten(1)                          # (B, 3*H*W)
        cos.append(F.cosine_similarity(-grad.flatten(1), to_clean, dim=1).mean())
    D.train(was_training)
    return torch.stack(cos).mean().item()


def train(cfg, data=None, out=None, resume=False, log=print, on_eval=None):
    """Train one method (cfg.method) and return its TrainState (with .history).
    out:     directory for checkpoint.pt and history.json (written atomically), or None
    resume:  continue from out/checkpoint.pt if it exists
    on_eval: optional on_eval(state), called after each evaluation (e.g. to keep sample restorations)"""
    cfg.validate()
    device = pick_device(cfg.device)
    data = make_data(cfg, device) if data is None else data.to(device)
    state = init_state(cfg, device)
    ckpt = os.path.join(out, "checkpoint.pt") if out else None
    if resume and ckpt and os.path.exists(ckpt):
        load_checkpoint(ckpt, state)
        log(f"resumed from {ckpt} at step {state.step}")
    gmodels = (torch.compile(state.G), torch.compile(state.D)) if cfg.compile and device.type == "cuda" else None
    uses_diffusion = METHODS[cfg.method][0]
    # a fixed batch for the mechanism diagnostic (real pairs: the clean half is used only to measure)
    torch.manual_seed(cfg.seed + 1)
    diag = (*syn_batch(data, cfg), *real_pairs_batch(data, cfg))
    torch.manual_seed(cfg.seed + 2 + state.step)
    h, t0, start = state.history, time.time(), state.step
    state.G.train(), state.D.train()
    for step in range(state.step, cfg.steps):
        parts = train_step(state, data, gmodels)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            vals = {k: float(v) for k, v in parts.items()}                          # host sync: logging only
            h["step"].append(step + 1)
            for k in ("loss_res", "loss_dif", "alpha", "hinge"):
                h[k].append(vals.get(k, float("nan")))
            eta = (time.time() - t0) / (step + 1 - start) * (cfg.steps - step - 1)
            log(f"[{cfg.method}] step {step + 1}/{cfg.steps} " +
                " ".join(f"{k} {v:.4g}" for k, v in vals.items()) + f" | eta {eta:.0f}s")
        last = step + 1 == cfg.steps
        if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            m = evaluate_pools(state.G_ema, data)
            cos = mechanism_diagnostic(state, *diag) if uses_diffusion else float("nan")
            h["eval_step"].append(step + 1)
            h["syn_psnr"].append(m["syn_psnr"])
            h["real_psnr"].append(m["real_psnr"])
            h["diag_cos"].append(cos)
            log(f"[{cfg.method}] eval @ {step + 1}: synthetic PSNR {m['syn_psnr']:.2f} dB, "
                f"real-like PSNR {m['real_psnr']:.2f} dB" + ("" if math.isnan(cos) else f", diagnostic cos {cos:+.3f}"))
            if on_eval:
                on_eval(state)
            if ckpt:
                save_checkpoint(ckpt, state)
                atomic_write_text(os.path.join(out, "history.json"), json.dumps(h, indent=1))
    return state


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (atomic writes; safe loading)
# ----------------------------------------------------------------------------------------------------------
def atomic_write_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: an interrupted save never leaves a broken checkpoint.
    Holds plain tensors and Python scalars only, so torch.load(weights_only=True) can read it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(state.cfg).items()},
            "step": state.step, "history": state.history,
            "restorer": state.G.state_dict(), "restorer_ema": state.G_ema.state_dict(),
            "denoiser": state.D.state_dict(), "optimizer": state.opt.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            **({"critic": state.critic.state_dict()} if state.critic is not None else {})}
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)


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
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
    return Config(**d).validate()


def load_checkpoint(path, state):
    """Restore a TrainState in place (for resuming)."""
    blob = read_checkpoint(path)
    state.G.load_state_dict(blob["restorer"])
    state.G_ema.load_state_dict(blob["restorer_ema"])
    state.D.load_state_dict(blob["denoiser"])
    if state.critic is not None:
        state.critic.load_state_dict(blob["critic"])
    state.opt.load_state_dict(blob["optimizer"])
    state.step, state.history = blob["step"], blob["history"]
    torch.set_rng_state(blob["rng_cpu"])
    return state


def load_restorer(path, device="cpu"):
    """(G_ema, config) from a checkpoint, ready for restore()."""
    blob = read_checkpoint(path)
    cfg = config_from_dict(blob["config"])
    G = RestorerUNet(cfg.r_width, cfg.r_depth)
    G.load_state_dict(blob["restorer_ema"])
    return G.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------------------
# Inference: G alone (the denoiser is thrown away)
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def restore(G, x):
    """y_hat = x + G(x) for images of any size: replicate-pad H and W up to a multiple of 2^(depth-1),
    restore, crop back, clamp to [0, 1]. x: (B, 3, H, W) -> (B, 3, H, W)."""
    m = 2 ** (G.depth - 1)
    H, W = x.shape[-2:]
    ph, pw = (-H) % m, (-W) % m
    xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
    return (xp + G(xp))[..., :H, :W].clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------
def rgb_to_y(x):
    """ITU-R BT.601 luma of [0, 1] RGB, in [16/255, 235/255] (the convention of MATLAB's rgb2ycbcr)."""
    w = torch.tensor([65.481, 128.553, 24.966], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) / 255 + 16 / 255


def psnr(x, y, y_channel=False):
    """Per-image PSNR in dB for [0, 1] images (B, C, H, W) -> (B,)."""
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-12))


def ssim(x, y, y_channel=False):
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data
    range 1, 'valid' windows only, averaged over channels. (B, C, H, W) -> (B,)."""
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    C = x.shape[1]
    g = torch.exp(-(torch.arange(11, dtype=x.dtype, device=x.device) - 5) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(C, 1, 11, 11)

    def filt(z):
        return F.conv2d(z, win, groups=C)
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def evaluate(G, x, y, batch=32):
    """Mean PSNR and SSIM of restore(G, x) against y."""
    was_training = G.training
    G.eval()
    out = torch.cat([restore(G, x[i:i + batch]) for i in range(0, len(x), batch)])
    G.train(was_training)
    return {"psnr": psnr(out, y).mean().item(), "ssim": ssim(out, y).mean().item()}


def evaluate_pools(G, data):
    """Synthetic and real-like test metrics of G."""
    s = evaluate(G, data.test_syn_noisy, data.test_syn_clean)
    r = evaluate(G, data.test_real_noisy, data.test_real_clean)
    return {"syn_psnr": s["psnr"], "syn_ssim": s["ssim"], "real_psnr": r["psnr"], "real_ssim": r["ssim"]}


# ----------------------------------------------------------------------------------------------------------
# Experiments: the demo
# ----------------------------------------------------------------------------------------------------------
def demo(cfg, out="runs/demo", log=print):
    """Train vanilla, DA and the oracle on the same built-in data, then print and save a comparison:
    out/results.json and out/demo.png. Returns the results dict."""
    t0 = time.time()
    device = pick_device(cfg.device)
    os.makedirs(out, exist_ok=True)
    log(f"device {device}; generating built-in data ({cfg.task}, real-like domain: {cfg.real_noise}) ...")
    data = make_data(cfg, device)
    ident = {"syn_psnr": psnr(data.test_syn_noisy.clamp(0, 1), data.test_syn_clean).mean().item(),
             "real_psnr": psnr(data.test_real_noisy, data.test_real_clean).mean().item(),
             "syn_ssim": ssim(data.test_syn_noisy.clamp(0, 1), data.test_syn_clean).mean().item(),
             "real_ssim": ssim(data.test_real_noisy, data.test_real_clean).mean().item()}
    results = {"config": dataclasses.asdict(cfg), "device": str(device), "identity": ident}
    models = {}
    for method in ("vanilla", "da", "oracle"):
        state = train(dataclasses.replace(cfg, method=method), data, log=log)
        results[method] = evaluate_pools(state.G_ema, data)
        results[method]["history"] = state.history
        models[method] = state.G_ema
    v, d, o = (results[m]["real_psnr"] for m in ("vanilla", "da", "oracle"))
    results["da_gain_real_db"] = d - v
    results["gap_closed"] = (d - v) / (o - v) if o != v else float("nan")
    results["da_syn_change_db"] = results["da"]["syn_psnr"] - results["vanilla"]["syn_psnr"]
    results["diag_cos_final"] = results["da"]["history"]["diag_cos"][-1]
    results["seconds"] = time.time() - t0
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    save_comparison_figure(os.path.join(out, "demo.png"), data, models)
    log("\n" + results_table(results))
    log(f"\nwrote {out}/results.json and {out}/demo.png in {results['seconds']:.0f} s")
    return results


# name -> function(cfg, out, quick) -> results dict; each writes out/NAME.json and at least one PNG
EXPERIMENTS = {}


def experiment(fn=None, *, size=None, quick=None):
    """Register fn as `python dada_min.py --experiment NAME` (NAME = fn's name without 'exp_').
    size:  config fields its default run changes from the cpu-demo preset so that it finishes in <= 10 min
           on 2 CPU cores (used only with the cpu-demo preset; --field flags still win)
    quick: config fields its --quick run changes from the tiny preset (seconds; used by the tests)
    Use as @experiment or @experiment(size=..., quick=...)."""
    def register(f):
        f.size, f.quick = dict(size or {}), dict(quick or {})
        EXPERIMENTS[f.__name__.removeprefix("exp_")] = f
        return f
    return register(fn) if fn is not None else register


def results_table(r):
    rows = [("identity (input)", r["identity"])] + [(m, r[m]) for m in ("vanilla", "da", "oracle")]
    lines = [f"{'method':18s} {'syn PSNR':>9s} {'syn SSIM':>9s} {'real PSNR':>10s} {'real SSIM':>10s}"]
    for name, m in rows:
        lines.append(f"{name:18s} {m['syn_psnr']:9.2f} {m['syn_ssim']:9.4f} {m['real_psnr']:10.2f} {m['real_ssim']:10.4f}")
    lines.append(f"DA - vanilla on real-like: {r['da_gain_real_db']:+.2f} dB; gap closed {r['gap_closed']:+.2f} "
                 f"(DA synthetic change {r['da_syn_change_db']:+.2f} dB; diagnostic cos {r['diag_cos_final']:+.3f})")
    return "\n".join(lines)


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
            ax = axes[i, j]
            ax.imshow(imgs[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(f"{psnr(imgs[i:i + 1], y[i:i + 1]).item():.2f} dB", fontsize=8)
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Experiments: the paper's evidence in miniature (Tables 1-4, Fig. 1a, Fig. 2), one command each
# ----------------------------------------------------------------------------------------------------------
# Every experiment trains with fixed seeds cfg.seed + i (a new seed also means new built-in data), reports
# mean and sample standard deviation over the seeds, writes out/NAME.json and PNG figures, and prints a
# table and its runtime (wall clock and CPU seconds of this process).
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


def identity_metrics(data):
    """Metrics of doing nothing (the degraded input itself), the floor every method should beat."""
    syn_in = data.test_syn_noisy.clamp(0, 1)
    return {"syn_psnr": psnr(syn_in, data.test_syn_clean).mean().item(),
            "syn_ssim": ssim(syn_in, data.test_syn_clean).mean().item(),
            "real_psnr": psnr(data.test_real_noisy, data.test_real_clean).mean().item(),
            "real_ssim": ssim(data.test_real_noisy, data.test_real_clean).mean().item()}


def summarize(runs, base=None):
    """Per-seed metric dicts -> mean_std per metric; with `base` (the same seeds' vanilla runs) also the
    paired per-seed gain in real-like PSNR, whose spread is smaller than that of the PSNR itself."""
    keys = ("syn_psnr", "syn_ssim", "real_psnr", "real_ssim")
    s = {k: mean_std([r[k] for r in runs]) for k in keys}
    if base is not None:
        s["real_gain_db"] = mean_std([r["real_psnr"] - b["real_psnr"] for r, b in zip(runs, base)])
    return s


def seed_log(log, seed):
    return lambda msg: log(f"  seed {seed} {msg}")


def finish(name, out, results, t0, c0, log):
    """Stamp the runtime, write out/NAME.json atomically and print the runtime."""
    results["wall_seconds"], results["cpu_seconds"] = time.time() - t0, time.process_time() - c0
    atomic_write_text(os.path.join(out, f"{name}.json"), json.dumps(results, indent=1))
    log(f"\nwrote {out}/{name}.json; runtime {results['wall_seconds']:.0f} s wall, "
        f"{results['cpu_seconds']:.0f} s CPU ({torch.get_num_threads()} threads)")
    return results


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@experiment(size=dict(steps=500, batch_size=8, eval_every=0, log_every=250),
            quick=dict(steps=8, eval_every=0, log_every=8))
def exp_compare(cfg, out, quick, log=print):
    """Tables 1-3 in miniature: vanilla, feature-space DA (DANN), pixel-space DA, DA (ours) and the
    oracle on cfg.task's built-in real-like domain (cfg.real_noise); one task per call (--task NAME).
    All share G, the data, the Adam optimiser, the step budget and the alpha ramp. Writes
    out/compare.json, out/compare.png (PSNR per method) and out/compare_samples.png (restorations of
    real-like test images, first seed)."""
    t0, c0 = time.time(), time.process_time()
    os.makedirs(out, exist_ok=True)
    device = pick_device(cfg.device)
    methods = ("vanilla", "dann", "pixel_da", "da", "oracle")
    runs, ident, models = {m: [] for m in methods}, [], {}
    seeds = exp_seeds(cfg, quick)
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed)
        data = make_data(c, device)
        ident.append(identity_metrics(data))
        for m in methods:
            state = train(dataclasses.replace(c, method=m), data, log=seed_log(log, seed))
            runs[m].append(evaluate_pools(state.G_ema, data))
            if seed == seeds[0]:
                models[m], sample_data = state.G_ema, data
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
    save_comparison_figure(os.path.join(out, "compare_samples.png"), sample_data, models)
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
    t0, c0 = time.time(), time.process_time()
    os.makedirs(out, exist_ok=True)
    device = pick_device(cfg.device)
    seeds = exp_seeds(cfg, quick, n=2)   # 8 trainings per seed: two seeds fit the 10-minute CPU budget
    runs = {label: [] for label, _, _ in ABLATION_ROWS}
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed)
        data = make_data(c, device)
        for label, method, t_range in ABLATION_ROWS:
            t_min, t_max = t_range or (c.t_min, c.t_max)
            state = train(dataclasses.replace(c, method=method, t_min=t_min, t_max=t_max), data,
                          log=seed_log(log, f"{seed} {label}"))
            runs[label].append(evaluate_pools(state.G_ema, data))
    base = runs[ABLATION_ROWS[0][0]]
    rows = []
    for label, method, t_range in ABLATION_ROWS:
        uses_dif, cs, rs, _, conds = METHODS[method]
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
    Protocol (the paper leaves it open, PAPER.md §12.1): a ConditionalDenoiser with in_ch=6 takes
    cat[y_t, c], where y_t is the noised clean image and c the SAME clean image plus AWGN of level sigma.
    It is trained alone (no restorer) for cfg.steps Adam steps on clean synthetic crops, with sigma drawn
    per sample from U[0, 80]/255 so every tested condition level is in distribution, and t from the full
    range [cfg.t_min, cfg.t_max]. Then the error on the clean synthetic test images is measured at
    sigma = 0, 10, ..., 80 with fixed (gamma, eps, condition-noise) draws. Writes out/condition.json and
    out/condition.png."""
    t0, c0 = time.time(), time.process_time()
    os.makedirs(out, exist_ok=True)
    device = pick_device(cfg.device)
    seeds = exp_seeds(cfg, quick)
    per_seed = []
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed)
        data = make_data(c, device)
        torch.manual_seed(seed)
        # NOTE(simplification): one condition slot (in_ch=6) instead of the method's two; Fig. 1a is about
        # how the error depends on ONE condition's quality.
        D = ConditionalDenoiser(c.d_width, tuple(c.d_mults), c.d_res_blocks, c.d_attn, c.d_dropout, in_ch=6)
        D = D.to(device)
        schedule = NoiseSchedule(c.T, c.beta_start, c.beta_end).to(device)
        opt = torch.optim.Adam(D.parameters(), lr=c.lr)
        for step in range(c.steps):
            y = random_crops(data.syn_clean, c.batch_size, c.patch_size)              # (B, 3, p, p)
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
    fig.tight_layout()
    fig.savefig(os.path.join(out, "condition.png"), dpi=100)
    plt.close(fig)
    return finish("condition", out, results, t0, c0, log)


@experiment(size=dict(steps=800, batch_size=8, eval_every=80, log_every=400),
            quick=dict(steps=8, eval_every=2, log_every=8))
def exp_shortcut(cfg, out, quick, log=print):
    """Fig. 2 in miniature: synthetic and real-like PSNR over training for naive joint training (no CS,
    no RS) and for DA (both tricks), with restorations of one synthetic and one real-like test image at
    several steps. The paper's shortcut signature is a real-like curve that rises, peaks and falls while
    the synthetic one keeps rising. Writes out/shortcut.json, out/shortcut.png (curves) and
    out/shortcut_samples.png (images, first seed)."""
    t0, c0 = time.time(), time.process_time()
    os.makedirs(out, exist_ok=True)
    device = pick_device(cfg.device)
    seeds = exp_seeds(cfg, quick, n=2)   # two long-enough curves fit the 10-minute CPU budget better than three short
    methods = ("naive", "da")
    curves, samples = {m: [] for m in methods}, {m: [] for m in methods}
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed)
        data = make_data(c, device)
        x_show = torch.cat([data.test_syn_noisy[:1], data.test_real_noisy[:1]])       # (2, 3, H, W)
        for m in methods:
            keep = samples[m] if seed == seeds[0] else None

            def on_eval(state, keep=keep):                                            # restorations at this step
                if keep is not None:
                    keep.append((state.step, restore(state.G_ema.eval(), x_show).cpu()))
            state = train(dataclasses.replace(c, method=m), data, log=seed_log(log, seed), on_eval=on_eval)
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
    fig.tight_layout()
    fig.savefig(os.path.join(out, "shortcut.png"), dpi=100)
    plt.close(fig)
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
            ax.imshow(img[0].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if title != "ground truth":
                ax.set_xlabel(f"{psnr(img.clamp(0, 1), gt.cpu()).item():.2f} dB", fontsize=7)
            if r == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{m}, {('synthetic', 'real-like')[d]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "shortcut_samples.png"), dpi=100)
    plt.close(fig)
    return finish("shortcut", out, results, t0, c0, log)


# ----------------------------------------------------------------------------------------------------------
# CLI: every Config field is a flag (--field value); unknown flags are rejected
# ----------------------------------------------------------------------------------------------------------
def _parse_value(f, text):
    if f.type in (bool, "bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"--{f.name} expects true/false, got {text!r}")
    if f.type in (tuple, "tuple"):
        return tuple(int(v) for v in text.split(","))
    return {"int": int, "float": float, "str": str}.get(f.type, f.type)(text)


def build_parser():
    p = argparse.ArgumentParser(prog="dada_min.py", allow_abbrev=False,
                                description="Denoising as Adaptation (ICLR 2025), minimal implementation.")
    p.add_argument("--demo", action="store_true", help="train vanilla, DA and oracle; print the table")
    p.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS), help="starting config")
    p.add_argument("--out", default=None, help="output directory (demo default: runs/demo)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--experiment", default=None, metavar="NAME", help="run a registered experiment (see README)")
    p.add_argument("--quick", action="store_true", help="with --experiment: the small size used by the tests")
    for f in dataclasses.fields(Config):
        p.add_argument(f"--{f.name}", dest=f"cfg_{f.name}", default=None, metavar="V",
                       type=lambda text, f=f: _parse_value(f, text),
                       help=f"config {f.name} (default from the preset)")
    return p


def parse_config(args, preset=None, base=None):
    """The preset (args.preset unless given), then the `base` fields, then the --field flags."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    return make_config(preset or args.preset, **{**(base or {}), **overrides})


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        opts = [o for a in parser._actions for o in a.option_strings]
        hints = [f"{u} (did you mean {', '.join(difflib.get_close_matches(u.split('=')[0], opts, 2))}?)"
                 if difflib.get_close_matches(u.split("=")[0], opts, 2) else u for u in unknown]
        parser.error("unknown argument(s): " + "; ".join(hints) + ". Run with --help for the list.")
    if args.experiment and args.experiment not in EXPERIMENTS:
        parser.error(f"unknown experiment {args.experiment!r}; choose one of {sorted(EXPERIMENTS)}")
    exp = EXPERIMENTS.get(args.experiment)
    try:
        if exp and args.quick:                       # the experiment's seconds-long size, on the tiny preset
            cfg = parse_config(args, "tiny", exp.quick)
        elif exp and args.preset == "cpu-demo":      # its default size: <= 10 min on 2 CPU cores
            cfg = parse_config(args, base=exp.size)
        else:
            cfg = parse_config(args)
    except ValueError as e:
        parser.error(str(e))
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    if args.demo:
        demo(cfg, args.out or "runs/demo")
        return 0
    if exp:
        exp(cfg, args.out or f"runs/{args.experiment}", args.quick)
        return 0
    state = train(cfg, out=args.out, resume=args.resume)
    m = evaluate_pools(state.G_ema, make_data(cfg, pick_device(cfg.device)))
    print(json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
