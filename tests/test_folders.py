"""folders.py: image files of every common kind, folder datasets, tiled restore, the example folders and the
train / restore / evaluate commands. Images are made in tmp_path with pillow; sizes are tiny."""
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import dada_min as dm
import folders


# --- helpers ----------------------------------------------------------------------------------------------
def save_rgb(path, arr):
    """Save an (H, W, 3) float array in [0, 1] as an 8-bit image (format from the extension)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(path)


def random_images(n, h, w, seed=0):
    return list(np.random.default_rng(seed).random((n, h, w, 3)))


def make_folder(folder, images, ext=".png"):
    for i, a in enumerate(images):
        save_rgb(os.path.join(folder, f"{i:03d}{ext}"), a)
    return str(folder)


def make_pairs(folder, inputs, targets):
    make_folder(os.path.join(folder, "input"), inputs)
    make_folder(os.path.join(folder, "target"), targets)
    return str(folder)


def png16_rgb(path, arr):
    """Write a 16-bit-per-channel RGB PNG by hand (Pillow cannot write one): arr (H, W, 3) uint16."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))       # filter 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def noisy(images, sigma=0.1, seed=1):
    rng = np.random.default_rng(seed)
    return [np.clip(a + sigma * rng.standard_normal(a.shape), 0, 1) for a in images]


class Log(list):
    def __call__(self, msg):
        self.append(str(msg))

    def text(self):
        return "\n".join(self)


@pytest.fixture
def cfg():
    return dm.make_config("tiny", device="cpu", steps=3)


@pytest.fixture
def own(tmp_path):
    """A tiny own-data layout: clean images, unpaired real noisy images, real evaluation pairs."""
    clean = random_images(4, 40, 44, seed=0)
    real = noisy(random_images(4, 36, 40, seed=1))
    ev = random_images(3, 33, 35, seed=2)
    return {"clean_dir": make_folder(tmp_path / "clean", clean),
            "real_dir": make_folder(tmp_path / "real", real),
            "eval_dir": make_pairs(tmp_path / "eval", noisy(ev, seed=3), ev)}


# --- hard inputs: file kinds ------------------------------------------------------------------------------
def test_grayscale_palette_rgba_and_8bit_rgb_read_as_float_rgb(tmp_path):
    gray = np.array([[0, 64], [128, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    a = folders.read_image(str(tmp_path / "l.png"))
    assert a.shape == (2, 2, 3) and a.dtype == np.float32
    np.testing.assert_allclose(a[..., 1], gray / 255, atol=1e-6)
    np.testing.assert_array_equal(a[..., 0], a[..., 2])

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)                              # 0 = red, 1 = blue
    pal.save(tmp_path / "p.png")
    p = folders.read_image(str(tmp_path / "p.png"))
    np.testing.assert_allclose(p[0, 0], [1, 0, 0]), np.testing.assert_allclose(p[0, 1], [0, 0, 1])

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]]
    rgba[..., 3] = [[0, 255], [128, 255]]                                           # alpha is dropped
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(folders.read_image(str(tmp_path / "a.png")), rgba[..., :3] / 255, atol=1e-6)

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    np.testing.assert_allclose(folders.read_image(str(tmp_path / "c.bmp")), rgb / 255, atol=1e-6)


def test_exif_orientation_and_other_modes(tmp_path):
    im = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6                                                                # "rotate 90 degrees to view"
    im.save(tmp_path / "photo.jpg", exif=exif)
    assert folders.read_image(str(tmp_path / "photo.jpg")).shape == (30, 10, 3)          # upright, as viewers show it
    Image.new("CMYK", (4, 3), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("1", (4, 3), 1).save(tmp_path / "bw.png")
    Image.new("LA", (4, 3), (100, 7)).save(tmp_path / "la.png")
    for name, value in (("cmyk.jpg", 1.0), ("bw.png", 1.0), ("la.png", 100 / 255)):
        a = folders.read_image(str(tmp_path / name))
        assert a.shape == (3, 4, 3) and np.allclose(a, value, atol=2 / 255), name


def test_16bit_pngs_keep_their_range(tmp_path):
    # 16-bit grayscale: full precision (a naive convert("RGB") would clip everything above 255 to white)
    g = np.array([[0, 1000, 30000, 65535]], np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    a = folders.read_image(str(tmp_path / "g16.png"))
    np.testing.assert_allclose(a[..., 0], g / 65535, atol=1e-6)
    np.testing.assert_array_equal(a[..., 0], a[..., 2])
    # 16-bit colour: the right values at 8-bit precision
    c = np.array([[[0, 32768, 65535], [1000, 20000, 65000]]], np.uint16)
    png16_rgb(tmp_path / "c16.png", c)
    np.testing.assert_allclose(folders.read_image(str(tmp_path / "c16.png")), c / 65535, atol=1 / 255)


def test_corrupt_and_truncated_files_are_named(tmp_path, cfg):
    save_rgb(str(tmp_path / "good" / "ok.png"), np.full((40, 40, 3), 0.5))
    full = (tmp_path / "good" / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[:len(full) // 2])                        # truncated
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all" * 10)                # corrupt
    for name in ("cut.png", "junk.jpg"):
        with pytest.raises(ValueError, match=name):
            folders.read_image(str(tmp_path / name))
    # in training, a corrupt file stops the loading with its name
    bad = tmp_path / "clean"
    make_folder(bad, random_images(2, 40, 40))
    (bad / "zzz.png").write_bytes(full[:60])
    with pytest.raises(ValueError, match="zzz.png"):
        folders.load_folder_data(cfg, clean_dir=str(bad), log=Log())


def test_non_image_files_are_skipped_with_a_note(tmp_path):
    folder = make_folder(tmp_path / "imgs", random_images(2, 20, 20))
    (tmp_path / "imgs" / "notes.txt").write_text("hello")
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"\0\1")
    os.makedirs(tmp_path / "imgs" / "subfolder")
    log = Log()
    assert folders.list_images(folder, log) == ["000.png", "001.png"]
    assert "notes.txt" in log.text() and "skipping 3" in log.text()


def test_empty_and_missing_folders_are_clear_errors(tmp_path, cfg):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        folders.list_images(str(tmp_path / "empty"), Log())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        folders.load_folder_data(cfg, real_dir=str(tmp_path / "nowhere"), log=Log())
    with pytest.raises(FileNotFoundError, match="input/ is missing"):
        folders.paired_names(str(tmp_path / "empty"), Log())


def test_mismatched_pair_names_are_listed(tmp_path):
    imgs = random_images(3, 20, 20)
    make_pairs(tmp_path, imgs, imgs)
    os.rename(tmp_path / "input" / "001.png", tmp_path / "input" / "in_only.png")
    os.rename(tmp_path / "target" / "002.png", tmp_path / "target" / "tgt_only.png")
    with pytest.raises(ValueError) as e:
        folders.paired_names(str(tmp_path), Log())
    msg = str(e.value)
    assert "only in input/: 002.png, in_only.png" in msg and "only in target/: 001.png, tgt_only.png" in msg


def test_pairs_of_different_sizes_are_named(tmp_path, cfg):
    save_rgb(str(tmp_path / "input" / "a.png"), np.zeros((20, 30, 3)))
    save_rgb(str(tmp_path / "target" / "a.png"), np.zeros((20, 31, 3)))
    with pytest.raises(ValueError, match="a.png is 30x20 px but target/a.png is 31x20"):
        folders.load_folder_data(cfg, eval_dir=str(tmp_path), log=Log())


def test_images_smaller_than_the_patch_are_upscaled_with_a_note(tmp_path, cfg):
    folder = make_folder(tmp_path / "small", random_images(2, 10, 12))             # patch 16, image 32
    log = Log()
    pool = folders.folder_tiles(folder, cfg.image_size, torch.Generator().manual_seed(0), log=log)
    assert pool.shape[1:] == (3, cfg.image_size, cfg.image_size) and len(pool) >= 2
    assert 0 <= pool.min() and pool.max() <= 1
    assert "smaller than image_size" in log.text() and "000.png (12x10)" in log.text()


def test_large_images_give_several_true_crops_and_pairs_stay_aligned(tmp_path):
    img = np.random.default_rng(0).random((70, 90, 3))
    make_pairs(tmp_path, [np.clip(img + 0.1, 0, 1)], [img])
    stored = folders.read_image(str(tmp_path / "target" / "000.png"))
    pool = folders.folder_tiles(str(tmp_path), 32, torch.Generator().manual_seed(0), paired=True, log=Log())
    assert pool.shape == (min(folders.CROPS_PER_IMAGE, 7), 6, 32, 32)                   # ceil(70*90 / 32^2) = 7
    t = torch.from_numpy(stored).permute(2, 0, 1)
    for tile in pool:                                                               # each is a crop of the file
        hits = [(a, b) for a in range(70 - 31) for b in range(90 - 31)
                if torch.equal(t[:, a:a + 32, b:b + 32], tile[3:])]
        assert len(hits) == 1
    diff = (pool[:, :3] - pool[:, 3:])[pool[:, 3:] < 0.85]                          # input = target + 0.1
    assert diff.sub(0.1).abs().max() < 1.5 / 255


# --- folder data and training -----------------------------------------------------------------------------
def test_folder_data_fills_missing_pieces_from_builtin(own, cfg):
    d = folders.load_folder_data(cfg, clean_dir=own["clean_dir"], log=Log())
    b = dm.make_data(cfg)
    assert d.syn_clean.shape[1:] == (3, 32, 32) and d.syn_pairs is None
    assert d.real_noisy.shape == b.real_noisy.shape and d.test_real_clean.shape == b.test_real_clean.shape
    d = folders.load_folder_data(cfg, **own, log=Log())
    assert d.real_clean is None                                                     # unpaired real folder
    assert len(d.test_real_noisy) == 3 and len(d.real_noisy) >= 4


def test_syn_dir_pairs_are_used_as_given(tmp_path, cfg):
    clean = random_images(3, 40, 40)
    folder = make_pairs(tmp_path, [np.clip(c + 0.2, 0, 1) for c in clean], clean)
    d = folders.load_folder_data(cfg, syn_dir=folder, log=Log())
    x, y = dm.syn_batch(d, cfg)
    ok = y < 0.75
    assert ((x - y)[ok] - 0.2).abs().max() < 1.5 / 255                              # not AWGN: the folder's pairs


@pytest.mark.parametrize("method", ["vanilla", "da"])
def test_training_on_folders(own, cfg, method):
    c = dm.make_config("tiny", device="cpu", steps=3, method=method)
    d = folders.load_folder_data(c, **own, log=Log())
    state = dm.train(c, d, log=Log())
    assert state.step == 3 and len(state.history["real_psnr"]) == 1
    assert np.isnan(state.history["diag_cos"][-1])                                  # no real ground truth
    assert np.isfinite(state.history["loss_res"][-1])


def test_oracle_needs_real_ground_truth(own, cfg, tmp_path):
    c = dm.make_config("tiny", device="cpu", steps=2, method="oracle")
    with pytest.raises(ValueError, match="paired layout"):
        dm.train(c, folders.load_folder_data(c, **own, log=Log()), log=Log())
    real = random_images(3, 40, 40, seed=5)                                         # paired real folder: works
    pairs = make_pairs(tmp_path / "realpairs", noisy(real), real)
    d = folders.load_folder_data(c, clean_dir=own["clean_dir"], real_dir=pairs, eval_dir=own["eval_dir"], log=Log())
    assert dm.train(c, d, log=Log()).step == 2


# --- example folders --------------------------------------------------------------------------------------


def test_example_folders(tmp_path, cfg):
    folders.write_example_folders(str(tmp_path / "ex"), n_clean=2, n_real=2, n_eval=2, size=32, log=Log())
    assert sorted(os.listdir(tmp_path / "ex" / "eval" / "input")) == ["0000.png", "0001.png"]
    assert folders.load_folder_data(cfg, clean_dir=str(tmp_path / "ex" / "clean"), real_dir=str(tmp_path / "ex" / "real"),
                               eval_dir=str(tmp_path / "ex" / "eval"), log=Log()).real_clean is None
    with pytest.raises(FileExistsError):
        folders.write_example_folders(str(tmp_path / "ex"), log=Log())


# --- restore ----------------------------------------------------------------------------------------------
def random_restorer(width=4, depth=2, seed=0):
    """An untrained G whose residual head is NOT zero, so restoring changes the image. PyTorch's default conv
    initialisation (weights ~0.4x Kaiming's) keeps the residual small and local, closer to a trained G's."""
    torch.manual_seed(seed)
    G = dm.RestorerUNet(width, depth)
    for m in G.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    torch.nn.init.normal_(G.last.weight, std=0.05)
    return G.eval()


def test_tiled_restore_matches_whole_image_restore():
    G = random_restorer()
    x = torch.rand(1, 3, 101, 77)
    whole = dm.restore(G, x)
    tiled = folders.restore_tiled(G, x, tile=40, overlap=12)
    assert tiled.shape == x.shape
    assert (tiled - whole).abs().mean() < 2e-3 and (tiled - whole).abs().max() < 0.05
    assert (whole - x).abs().mean() > 0.01                                          # the test is not trivial


def test_restore_4000x3000_in_bounded_tiles(tmp_path):
    G = random_restorer(width=2, depth=1)                                           # the smallest G: fast
    seen = []
    G.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    big = np.zeros((3000, 4000, 3), np.uint8)
    big[::7] = 200
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    x = torch.from_numpy(folders.read_image(str(tmp_path / "big.jpg"))).permute(2, 0, 1)[None]
    y = folders.restore_tiled(G, x, tile=512)
    assert y.shape == (1, 3, 3000, 4000) and 0 <= y.min() and y.max() <= 1
    assert max(h * w for h, w in seen) <= 512 * 512 and len(seen) > 40              # G never saw the whole image
    folders.write_image(str(tmp_path / "big_out.png"), y[0])
    assert Image.open(tmp_path / "big_out.png").size == (4000, 3000)


def checkpoint(tmp_path, cfg):
    state = dm.init_state(cfg, torch.device("cpu"))
    torch.nn.init.normal_(state.G_ema.last.weight, std=0.05)
    path = str(tmp_path / "ckpt" / "checkpoint.pt")
    dm.save_checkpoint(path, state)
    return path


def test_restore_command_keeps_size_and_refuses_to_overwrite(tmp_path, cfg, capsys):
    ckpt = checkpoint(tmp_path, cfg)
    save_rgb(str(tmp_path / "odd.png"), np.random.default_rng(0).random((37, 53, 3)))
    out = str(tmp_path / "out" / "odd.jpg")
    assert folders.main(["restore", "--ckpt", ckpt, "--input", str(tmp_path / "odd.png"), "--output", out]) == 0
    im = Image.open(out)
    assert im.size == (53, 37) and im.format == "JPEG"
    with pytest.raises(SystemExit):
        folders.main(["restore", "--ckpt", ckpt, "--input", str(tmp_path / "odd.png"), "--output", out])
    assert "--force" in capsys.readouterr().err
    before = os.path.getmtime(out)
    assert folders.main(["restore", "--ckpt", ckpt, "--input", str(tmp_path / "odd.png"), "--output", out, "--force"]) == 0
    assert os.path.getmtime(out) >= before
    # a folder in, a folder out, names kept; the non-image file is skipped
    folder = make_folder(tmp_path / "photos", random_images(2, 21, 30))
    (tmp_path / "photos" / "list.txt").write_text("x")
    assert folders.main(["restore", "--ckpt", ckpt, "--input", folder, "--output", str(tmp_path / "restored")]) == 0
    assert sorted(os.listdir(tmp_path / "restored")) == ["000.png", "001.png"]
    assert Image.open(tmp_path / "restored" / "001.png").size == (30, 21)


# --- the commands -----------------------------------------------------------------------------------------
def test_train_evaluate_restore_commands(own, tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["--preset", "tiny", "--steps", "3", "--device", "cpu", "--out", out,
              "--clean-dir", own["clean_dir"], "--real-dir", own["real_dir"], "--eval-dir", own["eval_dir"]]
    assert folders.main(["train", "--method", "da"] + common) == 0
    assert {"checkpoint.pt", "history.json"} <= set(os.listdir(out))
    assert json.load(open(os.path.join(out, "history.json")))["step"][-1] == 3
    with pytest.raises(SystemExit):                                                 # a non-empty --out
        folders.main(["train"] + common)
    assert "--resume" in capsys.readouterr().err
    assert folders.main(["train", "--force", "--method", "vanilla"] + common) == 0
    # evaluate: a table on stdout and the JSON
    js = str(tmp_path / "eval.json")
    assert folders.main(["evaluate", "--ckpt", os.path.join(out, "checkpoint.pt"), "--eval-dir", own["eval_dir"],
                    "--json", js]) == 0
    r = json.load(open(js))
    assert isinstance(r["mean_psnr"], float) and isinstance(r["mean_ssim"], float) and len(r["per_image"]) == 3
    assert r["mean_psnr"] == pytest.approx(np.mean([p["psnr"] for p in r["per_image"]]))
    assert "mean" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        folders.main(["evaluate", "--ckpt", os.path.join(out, "checkpoint.pt"), "--eval-dir", own["eval_dir"], "--json", js])


def test_command_flag_errors(capsys):
    for argv, msg in [(["restore", "--ckpt", "a.pt"], "restore needs --input, --output"),
                      (["--clean-dir", "x"], "the following arguments are required: command"),
                      (["restore", "--ckpt", "a", "--input", "b", "--output", "c", "--resume"],
                       "--resume cannot be used with restore"),
                      (["evaluate", "--ckpt", "a", "--eval-dir", "b", "--json", "c", "--real-dir", "d"],
                       "--real-dir cannot be used with evaluate"),
                      (["trian"], "invalid choice: 'trian'"),
                      (["train"], "train needs --out")]:
        with pytest.raises(SystemExit):
            folders.main(argv)
        assert msg in capsys.readouterr().err


# --- scores and crashes -----------------------------------------------------------------------------------
def psnr_of_files(a, b):
    """Independent reference: PSNR in dB of two 8-bit image files, in numpy float64."""
    x, y = (np.asarray(Image.open(p).convert("RGB"), np.float64) / 255 for p in (a, b))
    return 10 * np.log10(1 / np.mean((x - y) ** 2))


def test_scores_are_those_of_the_8bit_files_restore_writes(tmp_path):
    clean = random_images(3, 33, 35, seed=2)
    ev = make_pairs(tmp_path / "eval", noisy(clean, sigma=0.005, seed=3), clean)   # ~46 dB: rounding shows
    run = str(tmp_path / "run")
    dm.train(dm.make_config("tiny", device="cpu", steps=3, method="vanilla", lr=1e-2), out=run, log=Log())
    ckpt, restored, js = os.path.join(run, "checkpoint.pt"), str(tmp_path / "restored"), str(tmp_path / "eval.json")
    assert folders.main(["restore", "--ckpt", ckpt, "--input", os.path.join(ev, "input"), "--output", restored]) == 0
    assert folders.main(["evaluate", "--ckpt", ckpt, "--eval-dir", ev, "--json", js]) == 0
    rows = json.load(open(js))["per_image"]
    ref = [psnr_of_files(os.path.join(restored, r["name"]), os.path.join(ev, "target", r["name"])) for r in rows]
    np.testing.assert_allclose([r["psnr"] for r in rows], ref, atol=0.01)
    G, _ = dm.load_restorer(ckpt)
    x, y = (torch.stack([torch.from_numpy(folders.read_image(os.path.join(ev, side, r["name"]))).permute(2, 0, 1)
                         for r in rows]) for side in ("input", "target"))                 # (3, 3, 33, 35)
    assert abs(dm.evaluate(G, x, y)["psnr"] - np.mean(ref)) < 0.01                  # training-time scores too
    floats = dm.psnr(dm.restore(G, x), y).numpy()                                   # the unrounded output
    assert np.abs(floats - ref).max() > 0.01                                        # would have failed the check


def test_a_run_killed_between_evaluations_resumes_from_its_checkpoint(tmp_path, capsys):
    """SIGKILL (no clean-up, as a crash or a lost machine) after the first checkpoint, then --resume."""
    out, N, K = str(tmp_path / "run"), 50, 10                                     # N: still running at K
    ckpt = os.path.join(out, "checkpoint.pt")
    args = ["train", "--preset", "tiny", "--method", "vanilla", "--device", "cpu", "--steps", str(N),
            "--eval_every", str(K), "--log_every", "25", "--out", out]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(tmp_path / "first.log", "w") as log:                                 # -u: the log survives the kill
        first = subprocess.Popen([sys.executable, "-u", "folders.py"] + args, cwd=repo, stdout=log,
                                 stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while not os.path.exists(ckpt) and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        running = first.poll() is None
        if running:
            first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    text = (tmp_path / "first.log").read_text()
    assert running and os.path.exists(ckpt), f"the first run ended or wrote no checkpoint in time:\n{text}"
    assert first.returncode == -signal.SIGKILL
    killed = torch.load(ckpt, weights_only=True)                                    # complete, despite the kill
    k = killed["step"]
    assert 0 < k < N and k % K == 0
    config = json.loads(text.split("config: ", 1)[1].splitlines()[0])               # the first run's config
    assert killed["config"] == config
    assert folders.main(args + ["--resume"]) == 0                                        # the same command, resumed
    assert f"resumed from {ckpt} at step {k}" in capsys.readouterr().out
    final = torch.load(ckpt, weights_only=True)
    assert final["step"] == N and final["config"] == config
    assert final["history"]["eval_step"] == list(range(K, N + 1, K))               # none lost, none repeated
    assert json.load(open(os.path.join(out, "history.json")))["eval_step"] == list(range(K, N + 1, K))


def test_real_photo_folders_default_to_the_papers_noise_range_and_its_start(tmp_path, capsys):
    """The SIDD-style recipe of docs/own-data.md (clean, real and eval folders, task denoise) trains against the
    paper's sigma <= 75 from data/start-awgn75.pt, and says so in one line beside the real images' noise estimate."""
    root = str(tmp_path / "ex")
    folders.write_example_folders(root, n_clean=2, n_real=2, n_eval=2, size=48, log=Log())
    out = str(tmp_path / "run")
    cmd = ["train", "--task", "denoise", "--clean-dir", os.path.join(root, "clean"), "--real-dir",
           os.path.join(root, "real"), "--eval-dir", os.path.join(root, "eval"), "--out", out, "--steps", "1",
           "--n_test", "2", "--device", "cpu"]
    assert folders.main(cmd) == 0
    cfg = json.loads(capsys.readouterr().out.split("config: ", 1)[1].splitlines()[0])
    assert cfg["sigma_max"] == 75.0 and cfg["start"] == "shipped" and cfg["real_noise"] == "white"
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["config"]
    assert saved["sigma_max"] == 75.0 and saved["start"] == "shipped"
    assert folders.main(cmd + ["--force", "--sigma_max", "15"]) == 0          # an explicit range wins
    text = capsys.readouterr().out
    assert '"sigma_max": 15.0' in text and "start-awgn15-phone.pt" in text and "ABOVE the synthetic range" in text
    assert "clean images: hf " in text                                        # where the clean folder sits
    assert folders.main(cmd[:3] + cmd[7:] + ["--force", "--n_syn", "16", "--n_real", "16"]) == 0  # no real folder
    assert '"sigma_max": 15.0' in capsys.readouterr().out


def test_axis_line_names_the_nearest_measured_photographs(tmp_path):
    path = str(tmp_path / "axis.json")
    assert folders.axis_line(0.001, path) == ""                                  # no axis measured: nothing said
    cell = lambda name, kind, hf, g: {"name": name, "kind": kind, "hf": hf, "da_gain_real_db": {"mean": g}}  # noqa: E731
    cells = [cell("A x1", "photographs", 0.003, -1.0), cell("A x3", "photographs", 0.0003, 2.0),
             cell("B x2", "photographs", 0.0008, 1.1), cell("world: phone", "built-in world", 0.00027, 5.0)]
    json.dump({"cells": {c["name"]: c for c in cells}}, open(path, "w"))
    line = folders.axis_line(0.00035, path)
    assert "A x3 (hf 0.00030): +2.00 dB" in line and "B x2" in line and "A x1" not in line
    assert "phone" not in line and "lies" not in line                            # only photographs are quoted
    assert "lies above every measured set" in folders.axis_line(0.01, path)      # no extrapolation unsaid
    assert "lies below every measured set" in folders.axis_line(0.00025, path)   # the world's 0.00027 does not count


def test_noise_sigma_estimates_white_noise_and_ignores_flat_images():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((4, 3, 64, 64), 0.5)
    assert folders.noise_sigma(flat).abs().max() < 1e-3
    for sigma in (10.0, 30.0, 60.0):
        est = folders.noise_sigma(flat + sigma / 255 * torch.randn(flat.shape, generator=gen))
        assert est.shape == (4,) and ((est - sigma).abs() < 0.1 * sigma).all()
    odd = torch.rand(2, 3, 33, 35, generator=gen)                   # odd sizes: the last row/column is left out
    assert folders.noise_sigma(odd).shape == (2,)


def test_the_noise_line_says_whether_the_synthetic_range_covers_the_real_noise():
    data = dm.make_data(dm.make_config("tiny"))                                 # the white domain: sigma 30-60
    line = folders.noise_line(dm.make_config("tiny"), data.real_noisy)
    assert "noise sigma ~" in line and "ABOVE the synthetic range" in line and "sigma <= 15/255" in line
    assert "inside the synthetic range" in folders.noise_line(dm.make_config("tiny", sigma_max=75.0), data.real_noisy)
    lines = []
    dm.train(dm.make_config("tiny", steps=1), data, log=lines.append)           # the method's own line: range, start
    assert any("synthetic: AWGN sigma <= 15/255; G starts from scratch" in x for x in lines)
