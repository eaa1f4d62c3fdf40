"""Your own images for dada_min: read and write image files, build training data from folders, restore
files of any size, score a checkpoint on real pairs, and the three commands that do it:

    python folders.py train --clean-dir DIR --real-dir DIR [--eval-dir DIR] --out runs/mine [--field value ...]
    python folders.py restore --ckpt runs/mine/checkpoint.pt --input PATH --output PATH [--tile 512] [--force]
    python folders.py evaluate --ckpt runs/mine/checkpoint.pt --eval-dir DIR --json FILE [--tile 512] [--force]

docs/own-data.md explains the folder layouts. The method itself is in dada_min.py, which never imports this file.
"""
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import dada_min as dm


# ----------------------------------------------------------------------------------------------------------
# Image files and folders (pillow + numpy only)
# ----------------------------------------------------------------------------------------------------------
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")   # read and written
CROPS_PER_IMAGE = 16          # at most this many random image_size crops are kept from one training image


def read_image(path):
    """One image file as a (H, W, 3) float32 array in [0, 1].
    Grayscale and palette images become RGB; an alpha channel is dropped (the colours are used as
    stored, not composited); 16-bit grayscale (mode I;16) keeps its full precision, while 16-bit colour
    PNGs arrive at 8-bit precision (Pillow decodes them so); the EXIF orientation of camera photos is
    applied, so the array is upright as image viewers show it. A file that cannot be decoded (corrupt,
    truncated, not an image) raises ValueError naming it."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im.load()                                   # decode everything now: a truncated file fails here
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):                 # I;16, I;16B, I: 16-bit integer gray levels
                gray = np.asarray(im).astype(np.float32) / 65535
            elif im.mode == "F":                        # 32-bit float gray levels, taken to be in [0, 1]
                gray = np.asarray(im).astype(np.float32)
            else:                                       # 8-bit modes: L, P, RGB, RGBA, LA, CMYK, 1, ...
                return np.asarray(im.convert("RGB")).astype(np.float32) / 255
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}. Replace or remove this file.") from e
    return np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2)


def write_image(path, img):
    """Save img (3, H, W) in [0, 1] as an 8-bit RGB file in the format its extension names. Written
    to a temporary file and renamed, so an interrupted write never leaves half an image."""
    from PIL import Image
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTS:
        raise ValueError(f"cannot write {path!r}: the file extension must be one of {', '.join(IMAGE_EXTS)}")
    fmt = Image.registered_extensions()[ext]
    arr = img.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    tmp = f"{path}.tmp-{os.getpid()}"
    Image.fromarray(arr).save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    os.replace(tmp, path)


def list_images(folder, log=print):
    """Sorted names of the image files directly inside folder (chosen by extension). Other files and
    subfolders are skipped with a note; a missing folder or one without images is an error."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist or is not a folder")
    entries = sorted(os.listdir(folder))
    images = [n for n in entries if os.path.splitext(n)[1].lower() in IMAGE_EXTS and not n.startswith(".")
              and os.path.isfile(os.path.join(folder, n))]
    skipped = sorted(set(entries) - set(images))
    if skipped:
        log(f"note: {folder}: skipping {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that are not "
            f"image files: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    if not images:
        raise ValueError(f"folder {folder!r} holds no images (looked for {', '.join(IMAGE_EXTS)})")
    return images


def is_paired_folder(folder):
    return os.path.isdir(os.path.join(folder, "input")) and os.path.isdir(os.path.join(folder, "target"))


def paired_names(folder, log=print):
    """The file names of a paired folder, folder/input/NAME (degraded) + folder/target/NAME (clean).
    Names that appear on one side only are an error that lists them."""
    for sub in ("input", "target"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise FileNotFoundError(f"{folder!r} is not a paired folder: {sub}/ is missing (expected "
                                    f"{folder}/input/NAME and {folder}/target/NAME with the same NAMEs)")
    inp = list_images(os.path.join(folder, "input"), log)
    tgt = list_images(os.path.join(folder, "target"), log)
    only_inp, only_tgt = sorted(set(inp) - set(tgt)), sorted(set(tgt) - set(inp))
    problems = [f"only in {side}/: {', '.join(v[:10])}{f' ... ({len(v)} in all)' if len(v) > 10 else ''}"
                for side, v in (("input", only_inp), ("target", only_tgt)) if v]
    if problems:
        raise ValueError(f"{folder!r}: input/ and target/ must hold the same file names; " + "; ".join(problems))
    return inp


def read_pair(folder, name):
    """(input, target) arrays (H, W, 3) of one pair of a paired folder; the two must have one size."""
    a = read_image(os.path.join(folder, "input", name))
    b = read_image(os.path.join(folder, "target", name))
    if a.shape != b.shape:
        raise ValueError(f"{folder!r}: input/{name} is {a.shape[1]}x{a.shape[0]} px but target/{name} is "
                         f"{b.shape[1]}x{b.shape[0]} px; the two images of a pair must have one size")
    return a, b


def image_tiles(img, size, n, gen):
    """Crops (k, C, size, size) of an (H, W, C) array: k = min(n, ceil(H*W / size^2)) crops at random
    positions (enough to cover the image about once), or one centre crop if n is None. An image with a
    side below `size` is first upscaled (bicubic, aspect kept) so that side equals size."""
    x = torch.from_numpy(img).permute(2, 0, 1)                                      # (C, H, W), no copy
    h, w = x.shape[1:]
    if min(h, w) < size:
        s = size / min(h, w)
        x = F.interpolate(x[None], size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                          align_corners=False)[0].clamp(0, 1)
        h, w = x.shape[1:]
    if n is None:
        oy, ox = [(h - size) // 2], [(w - size) // 2]
    else:
        k = min(n, math.ceil(h * w / size ** 2))
        oy = torch.randint(h - size + 1, (k,), generator=gen).tolist()
        ox = torch.randint(w - size + 1, (k,), generator=gen).tolist()
    return torch.stack([x[:, a:a + size, b:b + size] for a, b in zip(oy, ox)])    # copies only the crops


def folder_tiles(folder, size, gen, n=CROPS_PER_IMAGE, paired=False, log=print):
    """All images of a folder as one pool of tiles (N, 3, size, size), or for a paired folder
    (N, 6, size, size) = cat[input, target] along C (one crop position per pair keeps them aligned).
    Images are read one at a time and only their crops are kept, so memory follows the pool size."""
    names = paired_names(folder, log) if paired else list_images(folder, log)
    tiles, small = [], []
    for name in names:
        if paired:
            img = np.concatenate(read_pair(folder, name), 2)                        # (H, W, 6)
        else:
            img = read_image(os.path.join(folder, name))                            # (H, W, 3)
        if min(img.shape[:2]) < size:
            small.append(f"{name} ({img.shape[1]}x{img.shape[0]})")
        tiles.append(image_tiles(img, size, n, gen))
    if small:
        log(f"note: {folder}: {len(small)} image(s) smaller than image_size={size} px were upscaled (bicubic) "
            f"to fit, which also smooths their degradation: {', '.join(small[:5])}{' ...' if len(small) > 5 else ''}")
    pool = torch.cat(tiles)
    log(f"{folder}: {len(pool)} tiles of {size}x{size} px from {len(names)} {'pairs' if paired else 'images'}")
    return pool


def load_folder_data(cfg, clean_dir=None, syn_dir=None, real_dir=None, eval_dir=None, device="cpu", log=print):
    """Data (as make_data returns) from folders of image files; each piece no folder gives comes from
    the built-in generators.
    clean_dir: clean images; synthetic inputs are made from them online by the task's synthetic degradation
    syn_dir:   ready-made synthetic pairs, syn_dir/input/NAME + syn_dir/target/NAME
    real_dir:  real degraded images without ground truth (a plain folder); or real pairs in the paired
               layout, of which DA uses only input/ (target/ serves the oracle and the diagnostic)
    eval_dir:  real pairs (paired layout) for the real test set
    Training images become up to CROPS_PER_IMAGE random crops of cfg.image_size px each (training then
    draws random cfg.patch_size patches from those); each evaluation pair becomes one centre crop (the
    `evaluate` command scores whole images). A corrupt file stops loading with its name."""
    cfg.validate()
    for flag, folder in (("clean-dir", clean_dir), ("syn-dir", syn_dir), ("real-dir", real_dir), ("eval-dir", eval_dir)):
        if folder and not os.path.isdir(folder):                                    # fail before any slow work
            raise FileNotFoundError(f"--{flag} {folder!r} is not a folder")
    task, s = dm.TASKS[cfg.task], cfg.image_size
    gen = torch.Generator().manual_seed(cfg.seed)               # seeds the crops and the offline degradations
    has_syn = bool(clean_dir or syn_dir)
    base = None
    if not (has_syn and real_dir and eval_dir):
        # built-in pools only for the missing pieces (1 image stands in for the pools a folder replaces)
        base = dm.make_data(dataclasses.replace(cfg, n_syn=1 if has_syn else cfg.n_syn,
                                             n_real=1 if real_dir else cfg.n_real,
                                             n_test=1 if has_syn and eval_dir else cfg.n_test))
    # synthetic pairs
    syn_pairs = None
    if clean_dir:
        syn_clean = folder_tiles(clean_dir, s, gen, log=log)                        # (N, 3, s, s)
    if syn_dir:
        syn_pairs = folder_tiles(syn_dir, s, gen, paired=True, log=log)             # (N, 6, s, s)
        if clean_dir:
            # NOTE(simplification): given both folders, the clean images are degraded once here and
            # join the ready-made pairs, instead of getting fresh synthetic noise at every step.
            made = torch.cat([dm.degrade_synthetic(cfg, syn_clean, gen), syn_clean], 1)
            syn_pairs = torch.cat([syn_pairs, made])
        syn_clean = syn_pairs[:, 3:]                                                # a view: no copy
    if has_syn:
        # synthetic test set: n_test pool tiles spread over the pool (they are also trained on, so this
        # measures the fit to the synthetic domain, not generalisation)
        idx = torch.linspace(0, len(syn_clean) - 1, min(cfg.n_test, len(syn_clean))).long()
        test_syn_clean = syn_clean[idx]
        test_syn_noisy = (syn_pairs[idx, :3] if syn_pairs is not None
                          else dm.degrade_synthetic(cfg, test_syn_clean, gen))
    else:
        syn_clean, test_syn_noisy, test_syn_clean = base.syn_clean, base.test_syn_noisy, base.test_syn_clean
    # unpaired real images (and their ground truth, when the folder has it)
    if real_dir and is_paired_folder(real_dir):
        both = folder_tiles(real_dir, s, gen, paired=True, log=log)
        real_noisy, real_clean = both[:, :3], both[:, 3:]
    elif real_dir:
        real_noisy, real_clean = folder_tiles(real_dir, s, gen, log=log), None
    else:
        real_noisy, real_clean = base.real_noisy, base.real_clean
    # the real test set
    if eval_dir:
        both = folder_tiles(eval_dir, s, gen, n=None, paired=True, log=log)
        test_real_noisy, test_real_clean = both[:, :3], both[:, 3:]
    else:
        test_real_noisy, test_real_clean = base.test_real_noisy, base.test_real_clean
    builtin = f"built-in ({cfg.task}, real-like domain {cfg.real_noise})"
    log(f"data: synthetic <- {' + '.join(d for d in (clean_dir, syn_dir) if d) or builtin}; "
        f"real <- {real_dir or builtin}; real test set <- {eval_dir or builtin}")
    return dm.Data(syn_clean=syn_clean, real_noisy=real_noisy, real_clean=real_clean, test_syn_noisy=test_syn_noisy,
                test_syn_clean=test_syn_clean, test_real_noisy=test_real_noisy, test_real_clean=test_real_clean,
                syn_pairs=syn_pairs).to(device)


# ----------------------------------------------------------------------------------------------------------
# Statistics of clean images, and where they sit on the smoothness axis (docs/effect.md)
# ----------------------------------------------------------------------------------------------------------
def box5(x):
    """5x5 box blur with replicate padding: the low-pass reference of hf (below) and of experiments.hf_ratio."""
    return F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


# At cpu-demo scale, whether DA helps is set by how smooth the clean images are at the pixel scale. Three statistics
# of clean 32 px crops (the training crop) describe that:
#   hf:    energy of x - box5(x), the same high-pass band as hf_ratio: how much of a crop is edges and texture
#   edges: share of pixels whose luma gradient (central differences) exceeds 0.1 per pixel
#   slope: slope of the radially averaged power spectrum of the luma on log-log axes (natural images: about -2)
def luma(x):
    return (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def spectrum_slope(x):
    """Mean over images of the log-log slope of the radially averaged power spectrum of luma(x), fitted between 2 and
    n/2 cycles per image (n: the side; the mean and the lowest frequency are left out). x: (B, 3, n, n)."""
    y = luma(x)[:, 0]
    y = y - y.mean((1, 2), keepdim=True)
    n = y.shape[-1]
    power = torch.fft.fft2(y).abs() ** 2                                          # (B, n, n)
    f = torch.fft.fftfreq(n) * n
    r = torch.sqrt(f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).round().long()        # radius in cycles per image
    radii = torch.arange(2, n // 2 + 1)
    radial = torch.stack([power[:, r == k].mean(1) for k in radii], 1)            # (B, K)
    lx, ly = torch.log(radii.float()), torch.log(radial.clamp(min=1e-20))
    lx = lx - lx.mean()
    return float(((ly - ly.mean(1, keepdim=True)) * lx).sum(1).div((lx ** 2).sum()).mean())


def clean_stats(x, crop=32):
    """The three statistics of clean images x (B, 3, H, W), measured on their centre crops of `crop` px."""
    top, left = (x.shape[-2] - crop) // 2, (x.shape[-1] - crop) // 2
    x = x[..., top:top + crop, left:left + crop]
    y = luma(x)
    gy, gx = y[..., 2:, 1:-1] - y[..., :-2, 1:-1], y[..., 1:-1, 2:] - y[..., 1:-1, :-2]   # central differences
    grad = torch.sqrt(gx ** 2 + gy ** 2) / 2
    return {"hf": float(((x - box5(x)) ** 2).mean()), "edges": float((grad > 0.1).float().mean()),
            "slope": spectrum_slope(x)}


@torch.no_grad()
def noise_sigma(x):
    """Blind estimate of each image's noise level, in 0-255 units: the median absolute deviation of the finest diagonal
    Haar band over 0.6745 (Donoho's rule), the channels averaged. x: (B, 3, H, W) -> (B,). Edges barely move a median,
    so clean detail reads as a few units; noise that is smooth across neighbouring pixels (demosaiced camera noise)
    reads low, since this band sees only its finest scale."""
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2].float()
    hh = (x[..., ::2, ::2] - x[..., ::2, 1::2] - x[..., 1::2, ::2] + x[..., 1::2, 1::2]) / 2   # (B, 3, H/2, W/2)
    return 255 * (hh.flatten(2).abs().median(-1).values / 0.6745).mean(1)



def noise_line(cfg, real_noisy):
    """One log line: the real training images' noise estimate beside the synthetic range, so a user sees whether the
    range covers the real noise."""
    est = float(noise_sigma(real_noisy[:256]).median())
    cover = ("inside the synthetic range" if est <= cfg.sigma_max else
             "ABOVE the synthetic range: the gap DA is meant to close; --sigma_max 75 (the paper's) would cover it")
    return (f"real training images: noise sigma ~ {est:.1f}/255 (noise_sigma, median), {cover} "
            f"(AWGN sigma <= {cfg.sigma_max:g}/255)")


AXIS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "effect", "axis", "axis.json")


def axis_line(hf, path=AXIS_JSON):
    """What the smoothness axis (`python experiments.py axis`, docs/effect.md) measured near clean images of this hf:
    the two photograph cells nearest on a log scale, with DA - vanilla there. '' if the axis file is missing."""
    if not os.path.isfile(path):
        return ""
    cells = [c for c in json.load(open(path))["cells"].values() if c["kind"] == "photographs"]
    near = sorted(cells, key=lambda c: abs(math.log(c["hf"] / hf)))[:2]
    said = "; ".join(f"{c['name']} (hf {c['hf']:.5f}): {c['da_gain_real_db']['mean']:+.2f} dB" for c in near)
    lo, hi = min(c["hf"] for c in cells), max(c["hf"] for c in cells)
    beyond = "" if lo <= hf <= hi else f" (this hf lies {'above' if hf > hi else 'below'} every measured set)"
    return f"on the smoothness axis (docs/effect.md), DA - vanilla nearest this hf: {said}{beyond}"


# ----------------------------------------------------------------------------------------------------------
# Restoring image files of any size (tiles, so memory stays bounded)
# ----------------------------------------------------------------------------------------------------------
def ramp(n, overlap):
    """(n,) blending weights of a tile: rising linearly over `overlap` px from each end, 1 in between."""
    i = torch.arange(n, dtype=torch.float32) + 0.5
    return (torch.minimum(i, n - i) / overlap).clamp(max=1)


@torch.no_grad()
def restore_tiled(G, x, tile=512, overlap=32):
    """restore() for images of any size in bounded memory: G only ever sees tiles of at most tile x tile
    px, which overlap by at least `overlap` px; where they overlap they are blended with linear ramps,
    so no seams show. x: (B, 3, H, W) on the CPU (the whole image stays there; tiles go to G's device)
    -> (B, 3, H, W) on the CPU."""
    if tile <= 2 * overlap:
        raise ValueError(f"tile ({tile} px) must be more than twice the overlap ({overlap} px)")
    device = next(G.parameters()).device
    H, W = x.shape[-2:]
    if H <= tile and W <= tile:
        return dm.restore(G, x.to(device)).cpu()

    def starts(n):                                       # tile origins covering 0..n with >= overlap shared px
        return [0] if n <= tile else list(range(0, n - tile, tile - overlap)) + [n - tile]
    h, w = min(tile, H), min(tile, W)
    weight = ramp(h, overlap)[:, None] * ramp(w, overlap)[None, :]                   # (h, w)
    out = torch.zeros(x.shape)                                                      # sum of weighted tiles
    total = torch.zeros(H, W)                                                       # sum of weights
    for top in starts(H):
        for left in starts(W):
            y = dm.restore(G, x[..., top:top + h, left:left + w].to(device)).cpu()    # (B, 3, h, w)
            out[..., top:top + h, left:left + w] += weight * y
            total[top:top + h, left:left + w] += weight
    return out / total


def restore_files(ckpt, inp, output, force=False, tile=512, device="auto", log=print):
    """The `restore` command: restore one image file, or every image of a folder, with the restorer of a
    checkpoint. inp is a file (output: a file path, or an existing folder to write into) or a folder
    (output: a folder; each result keeps its input's name). The output format follows the output's
    extension; the size is the input's. Existing outputs are only replaced when force is set.
    Returns the written paths."""
    G, cfg = dm.load_restorer(ckpt, dm.pick_device(device))
    log(f"restorer from {ckpt}: task {cfg.task}, method {cfg.method}, {dm.n_params(G):,} parameters")
    if os.path.isdir(inp):
        if os.path.isfile(output):
            raise ValueError(f"--input {inp!r} is a folder, so --output must be a folder, but {output!r} is a file")
        jobs = [(os.path.join(inp, n), os.path.join(output, n)) for n in list_images(inp, log)]
    elif os.path.isfile(inp):
        jobs = [(inp, os.path.join(output, os.path.basename(inp)) if os.path.isdir(output) else output)]
    else:
        raise FileNotFoundError(f"--input {inp!r} does not exist")
    for _, dst in jobs:                                  # check everything before the first (slow) image
        if os.path.splitext(dst)[1].lower() not in IMAGE_EXTS:
            raise ValueError(f"cannot write {dst!r}: give an output file ending in one of {', '.join(IMAGE_EXTS)} "
                             "(or an existing folder)")
    existing = [dst for _, dst in jobs if os.path.exists(dst)]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {len(existing)} existing file(s): {', '.join(existing[:5])}"
                              f"{' ...' if len(existing) > 5 else ''}; pass --force to replace them")
    for src, dst in jobs:
        t0 = time.time()
        x = torch.from_numpy(read_image(src)).permute(2, 0, 1)[None]               # (1, 3, H, W)
        y = restore_tiled(G, x, tile)
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        write_image(dst, y[0])
        log(f"{src} -> {dst} ({x.shape[-1]}x{x.shape[-2]} px, {time.time() - t0:.1f} s)")
    return [dst for _, dst in jobs]


# ----------------------------------------------------------------------------------------------------------
# Scoring a checkpoint on a folder of real pairs
# ----------------------------------------------------------------------------------------------------------
def evaluate_folder(G, folder, tile=512, log=print):
    """Score G on every pair of a paired folder (folder/input/NAME, folder/target/NAME), on whole images
    restored as the restore command does and rounded to 8 bits, as the files it writes. Returns
    {"mean_psnr", "mean_ssim", "input_mean_psnr", "input_mean_ssim",
     "per_image": [{"name", "psnr", "ssim", "input_psnr", "input_ssim"}, ...]}."""
    rows = []
    for name in paired_names(folder, log):
        x, y = (torch.from_numpy(a).permute(2, 0, 1)[None] for a in read_pair(folder, name))  # (1, 3, H, W)
        out = dm.quantize_8bit(restore_tiled(G, x, tile))                             # what restore would write
        rows.append({"name": name, "psnr": dm.psnr(out, y).item(), "ssim": dm.ssim(out, y).item(),
                     "input_psnr": dm.psnr(x, y).item(), "input_ssim": dm.ssim(x, y).item()})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim", "input_psnr", "input_ssim")}
    return {"mean_psnr": mean["psnr"], "mean_ssim": mean["ssim"], "input_mean_psnr": mean["input_psnr"],
            "input_mean_ssim": mean["input_ssim"], "per_image": rows}


def folder_table(r):
    """evaluate_folder's results as a text table: one row per image, then the means."""
    lines = [f"{'image':30s} {'input PSNR':>10s} {'input SSIM':>10s} {'PSNR':>8s} {'SSIM':>8s}"]
    for row in r["per_image"] + [{"name": "mean", **{k: r[f"mean_{k}"] for k in ("psnr", "ssim")},
                                  **{f"input_{k}": r[f"input_mean_{k}"] for k in ("psnr", "ssim")}}]:
        lines.append(f"{row['name'][:30]:30s} {row['input_psnr']:10.2f} {row['input_ssim']:10.4f} "
                     f"{row['psnr']:8.2f} {row['ssim']:8.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Example folders made by the built-in generators
# ----------------------------------------------------------------------------------------------------------
def write_example_folders(root, task="denoise", n_clean=200, n_real=200, n_eval=32, size=96, seed=0,
                          force=False, log=print):
    """Folders of PNG files made by the built-in generators and laid out as your own data would be, so
    the own-data commands of the README run without downloading anything:
        root/clean/NNNN.png                   clean images (the synthetic pairs are made from them)
        root/real/NNNN.png                    real-like degraded images, without ground truth
        root/eval/input/NNNN.png, eval/target real-like pairs, for evaluation only
    The three sets show different clean images; the degradation is the task's first real-like domain."""
    if os.path.isdir(root) and os.listdir(root) and not force:
        raise FileExistsError(f"{root!r} is not empty; pass force=True to write into it anyway")
    gen = torch.Generator().manual_seed(seed)
    real_fn = next(iter(dm.TASKS[task]["real"].values()))
    clean = dm.dead_leaves(n_clean + n_real + n_eval, size, gen)                       # (N, 3, size, size)
    c, r, e = clean.split([n_clean, n_real, n_eval])
    for sub, imgs in {"clean": c, "real": real_fn(r, gen), "eval/input": real_fn(e, gen), "eval/target": e}.items():
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for i, img in enumerate(imgs):
            write_image(os.path.join(root, sub, f"{i:04d}.png"), img)
    log(f"wrote {n_clean} clean, {n_real} real-like and {n_eval} evaluation pairs of {size}x{size} px to {root}")


# ----------------------------------------------------------------------------------------------------------
# The commands: train | restore | evaluate
# ----------------------------------------------------------------------------------------------------------
# command -> (the flags it requires, the command-only flags it accepts)
COMMAND_FLAGS = {
    "train": (("out",), ("clean_dir", "syn_dir", "real_dir", "eval_dir", "force", "resume")),
    "restore": (("ckpt", "input", "output"), ("tile", "force")),
    "evaluate": (("ckpt", "eval_dir", "json"), ("tile", "force")),
}


def check_command(parser, args):
    """Reject a flag given to a command that does not use it, and a missing required flag."""
    required, accepted = COMMAND_FLAGS[args.command]
    command_only = {f for req, acc in COMMAND_FLAGS.values() for f in req + acc}
    given = {f for f in command_only if getattr(args, f) not in (None, False)}
    extra = sorted(given - set(required) - set(accepted))
    if extra:
        parser.error(", ".join("--" + f.replace("_", "-") for f in extra) + f" cannot be used with {args.command}")
    missing = [f for f in required if getattr(args, f) is None]
    if missing:
        parser.error(f"{args.command} needs " + ", ".join("--" + f.replace("_", "-") for f in missing))


def train_command(cfg, args, log=print):
    """`train`: built-in data or folders (load_folder_data) -> OUT/checkpoint.pt and OUT/history.json."""
    out, log = args.out, dm.rank0(log)                   # under torchrun: rank 0 reports
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r} is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out) and not (args.resume or args.force):
        raise FileExistsError(f"--out {out!r} is not empty: pass --resume to continue the run saved there, or "
                              "--force to start a new run that replaces its checkpoint.pt and history.json")
    dirs = {k: getattr(args, k) for k in ("clean_dir", "syn_dir", "real_dir", "eval_dir")}
    device = dm.pick_device(cfg.device)
    data = load_folder_data(cfg, **dirs, device=device, log=log) if any(dirs.values()) else dm.make_data(cfg, device)
    if cfg.task == "denoise" and (dirs["clean_dir"] or dirs["syn_dir"]):            # where these images sit
        hf = clean_stats(data.syn_clean[:1024].float().cpu(), cfg.patch_size)["hf"]
        log(f"clean images: hf {hf:.5f} (energy of x - box5(x) on {cfg.patch_size} px crops); {axis_line(hf)}".rstrip("; "))
    if cfg.task == "denoise":
        log(noise_line(cfg, data.real_noisy))
    state = dm.train(cfg, data, out=out, resume=args.resume, log=log)
    log(json.dumps(dm.evaluate_pools(state.G_eval, data)))
    log(f"wrote {os.path.join(out, 'checkpoint.pt')} and {os.path.join(out, 'history.json')}")
    return 0


def evaluate_command(args, log=print):
    """`evaluate`: score a checkpoint's restorer on a folder of real pairs; print a table, write JSON."""
    if os.path.exists(args.json) and not args.force:
        raise FileExistsError(f"{args.json!r} exists; pass --force to replace it")
    G, cfg = dm.load_restorer(args.ckpt, dm.pick_device(args.cfg_device or "auto"))
    r = evaluate_folder(G, args.eval_dir, args.tile or 512, log)
    log(folder_table(r))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    dm.atomic_write_text(args.json, json.dumps(r, indent=1))
    log(f"wrote {args.json}")
    return 0


def folder_defaults(args):
    """Config defaults that follow the folders: real degraded images from a folder (denoising) get the paper's
    synthetic range sigma <= 75, and with it the start data/start-awgn75.pt, instead of the built-in `white` domain's
    sigma <= 15, which exists to leave that domain's noise uncovered. --sigma_max or --real_noise overrides it."""
    denoise = (args.cfg_task or dm.make_config(args.preset).task) == "denoise"
    if args.real_dir and denoise and args.cfg_sigma_max is None and args.cfg_real_noise is None:
        return {"sigma_max": 75.0}
    return {}


def build_parser():
    p = dm.config_parser("folders.py", "dada_min on your own image folders: train, restore or evaluate.")
    p.add_argument("command", choices=sorted(COMMAND_FLAGS), help="what to do")
    p.add_argument("--out", default=None, help="train: output directory for checkpoint.pt and history.json")
    p.add_argument("--resume", action="store_true", help="train: continue from OUT/checkpoint.pt")
    paths = [("--clean-dir", "DIR", "train: folder of clean images"),                   # (flag, metavar, help)
             ("--syn-dir", "DIR", "train: synthetic pairs DIR/input + DIR/target"),
             ("--real-dir", "DIR", "train: folder of real degraded images"),
             ("--eval-dir", "DIR", "train, evaluate: real pairs DIR/input + DIR/target"),
             ("--ckpt", "FILE", "restore, evaluate: a checkpoint.pt from train"),
             ("--input", "PATH", "restore: an image file or a folder of images"),
             ("--output", "PATH", "restore: output file (format from its extension) or folder"),
             ("--json", "FILE", "evaluate: where to write the results")]
    for flag, metavar, what in paths:
        p.add_argument(flag, default=None, metavar=metavar, help=what)
    p.add_argument("--tile", default=None, type=int, metavar="PX", help="restore, evaluate: tile side for large images (512)")
    p.add_argument("--force", action="store_true", help="train, restore, evaluate: replace existing outputs")
    return p


def main(argv=None):
    """Bad flags, values and files end as an argparse error (exit status 2); a training run that diverges
    ends as one error line and exit status 1, its last finite checkpoint kept."""
    parser = build_parser()
    args = dm.parse_args(parser, argv)
    check_command(parser, args)
    try:                                                 # bad files and folders end as one clear error line
        if args.command == "restore":
            restore_files(args.ckpt, args.input, args.output, args.force, args.tile or 512, args.cfg_device or "auto")
            return 0
        if args.command == "evaluate":
            return evaluate_command(args)
        cfg = dm.parse_config(args, base=folder_defaults(args))
        dm.rank0(print)("config:", json.dumps(dataclasses.asdict(cfg)))
        return train_command(cfg, args)
    except dm.TrainingDiverged as e:
        return dm.report_divergence("folders.py", e)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))
    finally:
        dm.dist_teardown()


if __name__ == "__main__":
    sys.exit(main())
