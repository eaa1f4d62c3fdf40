"""Writes the student template notebooks notebooks/exercises/exN_<name>.ipynb (valid nbformat v4, no outputs).

    python notebooks/exercises/_make_templates.py

The notebooks are committed; edit the text here and rerun, never the .ipynb files by hand
(tests/test_exercise_grading.py checks that the committed notebooks equal what this script writes).
Every template has the same skeleton:
  1. setup (code): find the repository root, import dada_min
  2. the exercise (markdown): what it teaches, the context, the task
  3. hints (markdown)
  4. the SOLUTION cell (code, tagged "solution"): the stub that raises NotImplementedError("Exercise N").
     The grader runs only cells that start with "# SOLUTION" (or carry the tag), so they must be self-contained.
  5. try it (code): run the function and compare with dada_min
  6. grade it (code): the grading command, run on this (saved) notebook
"""
import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''# Exercise {n}: {title}. Setup: find the repository root (the folder with dada_min.py) and import dada_min.
import os
import sys

ROOT = os.path.abspath("")
while not os.path.isfile(os.path.join(ROOT, "dada_min.py")):
    if os.path.dirname(ROOT) == ROOT:
        raise FileNotFoundError(f"no dada_min.py in {{os.path.abspath('')}} or above: open this notebook "
                                "from inside the dada-min repository")
    ROOT = os.path.dirname(ROOT)
sys.path.insert(0, ROOT)

import torch
import dada_min as dm

torch.manual_seed(0)
print("using", dm.__file__)'''

GRADE = '''# Grade your work: SAVE the notebook first (the grader reads the saved file), then run this cell.
# The same command works in a terminal from the repository root.
import subprocess

cmd = [sys.executable, "-m", "pytest", "-q", "tests/exercises", "-m", "{ex}",
       "--solution", os.path.abspath("{stem}.ipynb")]
print(" ".join(cmd[2:]))
res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
print(res.stdout[-4000:], res.stderr[-2000:])'''

HEAD = '''# SOLUTION {ex}: your code goes in this cell. The grader runs only the cells that start with "# SOLUTION",
# so keep every import and helper you need in them.'''

EXERCISES = []


def exercise(**kw):
    EXERCISES.append(kw)


# ----------------------------------------------------------------------------------------------------------
exercise(
    ex="ex1", name="q_sample", minutes=15, title="forward diffusion and the continuous noise level",
    intro=r"""
**You will learn** how a diffusion model turns a clean image into a noisy one in a single step, and how
dada-min (after SR3 and the official code) draws a *continuous* noise level $\gamma$ instead of an integer step $t$.

The forward process of DDPM has a closed form: for a clean image $y_0$ and Gaussian noise $\epsilon \sim \mathcal N(0, I)$,

$$y_t = \sqrt{\gamma}\, y_0 + \sqrt{1-\gamma}\,\epsilon, \qquad \gamma = \bar\alpha_t = \prod_{s \le t}(1 - \beta_s).$$

`dm.NoiseSchedule` stores $\bar\alpha$ as `alphas_cumprod` (a decreasing tensor of length `T`; the Python index `i`
holds $\bar\alpha_{i+1}$). During training the denoiser is not told $t$ but $\gamma$ itself, and $\gamma$ is drawn
*between* two neighbouring levels: first a step `t` uniformly from `t_min..t_max`, then
$\gamma$ uniformly between `alphas_cumprod[t]` and `alphas_cumprod[t-1]`. Every value in $(\bar\alpha_T, 1)$ can occur,
which is why the network needs a continuous embedding of $\gamma$.

**Your task.** Write
- `q_sample(y0, gamma, eps)`: `y0`, `eps` of shape `(B, C, H, W)`, `gamma` of shape `(B,)` (one level per image);
  return $y_t$ with `y0`'s shape and dtype.
- `sample_gamma(alphas_cumprod, n, t_min=1, t_max=None)`: `n` levels, shape `(n,)`, on `alphas_cumprod`'s device;
  `t_max=None` means `T - 1`.

The grader compares with `dada_min.NoiseSchedule.q_sample` / `.sample_gamma` on random inputs, and for
`sample_gamma` it seeds `torch.manual_seed` identically before both calls, so your random draws must come in the
same order: **first** `torch.randint` for `t`, **then** one `torch.rand(n)`.""",
    hints=r"""
- `gamma.view(-1, 1, 1, 1)` makes `(B,)` broadcast against `(B, C, H, W)`.
- Convert `gamma` to `y0.dtype` before the square roots, so float64 images stay float64.
- `torch.randint(low, high, size)` excludes `high`: to include `t_max` use `t_max + 1`.
- Indexing a tensor with a tensor of indices, `alphas_cumprod[t]`, gives one value per sample.""",
    code='''import torch


def q_sample(y0, gamma, eps):
    """y_t = sqrt(gamma) * y0 + sqrt(1 - gamma) * eps. y0, eps: (B, C, H, W); gamma: (B,)."""
    raise NotImplementedError("Exercise 1")


def sample_gamma(alphas_cumprod, n, t_min=1, t_max=None):
    """t ~ U{t_min..t_max} (t_max=None: T-1), then gamma ~ U(alphas_cumprod[t], alphas_cumprod[t-1]). Returns (n,)."""
    raise NotImplementedError("Exercise 1")''',
    tryit='''schedule = dm.NoiseSchedule()
y0, eps, gamma = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([1.0, 0.9, 0.5, 0.01])
y_t = q_sample(y0, gamma, eps)
print("std of y_t per image:", y_t.flatten(1).std(1))          # grows as gamma falls
torch.testing.assert_close(y_t, dm.NoiseSchedule.q_sample(y0, gamma, eps))

torch.manual_seed(1); mine = sample_gamma(schedule.alphas_cumprod, 5, 900, 999)
torch.manual_seed(1); ref = schedule.sample_gamma(5, 900, 999)
print(mine, ref, sep="\\n")
torch.testing.assert_close(mine, ref)
print("matches dada_min")''')

# ----------------------------------------------------------------------------------------------------------
exercise(
    ex="ex2", name="alpha_ramp", minutes=10, title="the ramp of the diffusion-loss weight",
    intro=r"""
**You will learn** why the diffusion loss is switched on gradually, and how to write the ramp that does it.

The total loss of the method is $L = L_\text{Res} + \alpha\, L_\text{noise}$. At the start of training the denoiser
$\epsilon_\theta$ is random, so the gradient $L_\text{noise}$ sends into the restorer $G$ carries no information yet;
with full weight it would only disturb $G$ while $G$ learns from its synthetic pairs. dada-min therefore raises $\alpha$
from 0 with the sigmoid schedule known from domain-adversarial training (DANN):

$$p = \min\!\left(\frac{\text{step}}{\text{total\_ramp\_steps}},\ 1\right), \qquad \alpha = \left(\frac{2}{1 + e^{-5p}} - 1\right)\alpha_\text{max}.$$

It is 0 at step 0, rises fast, then flattens: after the ramp it stays at about $0.987\,\alpha_\text{max}$ (it never
quite reaches $\alpha_\text{max}$). `dm.train_step` calls it with `total_ramp_steps = cfg.ramp_frac * cfg.steps`.

**Your task.** Write `alpha_ramp(step, total_ramp_steps, alpha_max=0.2)` returning a Python float. A ramp of
length 0 must not divide by zero: treat it as already finished.""",
    hints=r"""
- `math.exp` works on Python floats; no tensors are needed here.
- `max(total_ramp_steps, 1)` in the denominator handles a zero-length ramp.
- Cap the progress `p` at 1, not the result.""",
    code='''import math


def alpha_ramp(step, total_ramp_steps, alpha_max=0.2):
    """(2 / (1 + exp(-5 p)) - 1) * alpha_max with p = min(step / total_ramp_steps, 1). Returns a float."""
    raise NotImplementedError("Exercise 2")''',
    tryit='''for step in (0, 30, 150, 300, 1000):
    print(step, round(alpha_ramp(step, 300), 5), round(dm.alpha_ramp(step, 300), 5))
assert all(abs(alpha_ramp(s, 300) - dm.alpha_ramp(s, 300)) < 1e-12 for s in range(0, 600, 7))
print("matches dada_min")''')

# ----------------------------------------------------------------------------------------------------------
exercise(
    ex="ex3", name="channel_shuffle", minutes=15, title="the channel-shuffling layer (CS)",
    intro=r"""
**You will learn** the first of the two tricks that keep the joint training honest.

The denoiser $\epsilon_\theta$ sees the noisy target $y_t$ together with two conditions, the restored synthetic image
$\hat y^s$ and the restored real image $\hat y^r$, stacked as `cat[y_t, c1, c2]` (9 channels). Only $\hat y^s$ is the
restoration of the image that was noised. If $\hat y^s$ were always in slot 1, $\epsilon_\theta$ could simply learn
"use slot 1, ignore slot 2": the diffusion loss would then send no useful gradient to $\hat y^r$ and $G$ would never adapt
to real images. This is a *shortcut*.

The channel-shuffling layer removes it: for **each sample independently**, with probability 1/2, it swaps which slot
holds which condition. It is redrawn on every call, swaps whole 3-channel images (never the RGB channels inside
them), and leaves $y_t$ in front. Now $\epsilon_\theta$ cannot know from the position which condition belongs to $y_t$;
to do well it has to compare content, and both restorations get gradient.

**Your task.** Write `channel_shuffle(c_syn, c_real, enabled=True)` returning `(c1, c2, swapped)`: the two slot
contents, each `(B, C, H, W)`, and `swapped`, a `(B,)` bool tensor saying which samples were swapped. With
`enabled=False` return the inputs unchanged and an all-False mask (that is the `no_shuffle` ablation). The
grader seeds the generator before your call and before dada_min's, so draw the coins with **one**
`torch.rand(B) < 0.5`.""",
    hints=r"""
- Make the mask broadcast over an image: `swapped.view(-1, 1, 1, 1)`.
- `torch.where(mask, a, b)` picks `a` where the mask is True, keeps gradients flowing to both inputs, and does not
  modify anything in place.
- Create tensors on the inputs' device (`device=c_syn.device`) so the function also works on a GPU.""",
    code='''import torch


def channel_shuffle(c_syn, c_real, enabled=True):
    """Per sample, with probability 1/2, swap the two condition slots. Returns (c1, c2, swapped)."""
    raise NotImplementedError("Exercise 3")''',
    tryit='''a, b = torch.zeros(6, 3, 2, 2), torch.ones(6, 3, 2, 2)         # "synthetic" = 0, "real" = 1
c1, c2, swapped = channel_shuffle(a, b)
print("swapped:", swapped.tolist())
print("slot 1 holds the real image:", (c1.flatten(1).mean(1) == 1).tolist())
torch.manual_seed(3); mine = channel_shuffle(a, b)
torch.manual_seed(3); ref = dm.channel_shuffle(a, b)
assert torch.equal(mine[2], ref[2]) and torch.equal(mine[0], ref[0]) and torch.equal(mine[1], ref[1])
print("matches dada_min")''')

# ----------------------------------------------------------------------------------------------------------
exercise(
    ex="ex4", name="residual_swap", minutes=20, title="residual-swapped negatives and the triplet hinge",
    intro=r"""
**You will learn** the second anti-shortcut trick: contrastive learning with *residual-swapped* negatives.

Channel shuffling hides *where* each condition is, but $\epsilon_\theta$ may still find an easy cue, for example
how similar a condition looks to $y_t$ pixel by pixel. The restorer is residual: $\hat y = x + R(x)$. The method
builds two *wrong* conditions by giving each input the other domain's residual, Eq. (2):

$$n^s = x^s + R^r, \qquad n^r = x^r + R^s.$$

These negatives look like plausible images with plausible noise removed, but the removed noise belongs to another
image. A second pass of $\epsilon_\theta$ on the **same** $y_t$, $\epsilon$ and $\gamma$ with $(n^s, n^r)$ as conditions gives
$\hat\epsilon_\text{neg}$, and a triplet hinge, Eq. (3), asks the true conditions to help more than the wrong ones by a
margin $\delta$:

$$L_\text{hinge} = \max\big(0,\ \text{MSE}(\hat\epsilon_\text{pos}, \epsilon) - \text{MSE}(\hat\epsilon_\text{neg}, \epsilon) + \delta\big).$$

As in the official code, each MSE is a mean over the **whole batch**, so there is one hinge per batch, not one
per sample. Nothing is detached: the hinge also trains $G$, through the residuals inside the negatives.

**Your task.** Write `residual_swap(x_syn, r_syn, x_real, r_real)` returning `(x_syn + r_real, x_real + r_syn)`, and
`triplet_hinge(eps, eps_pos, eps_neg, margin=0.1)` returning a scalar tensor.""",
    hints=r"""
- `torch.nn.functional.mse_loss(a, b)` averages over every element of the batch: exactly the distance needed.
- `F.relu(z)` is `max(0, z)` and has a gradient.
- Check your hinge on a two-sample batch where one sample is good and the other bad: the batch-level and the
  per-sample versions give different numbers.""",
    code='''import torch
import torch.nn.functional as F


def residual_swap(x_syn, r_syn, x_real, r_real):
    """Eq. (2): the negatives (x_syn + r_real, x_real + r_syn). Do not detach."""
    raise NotImplementedError("Exercise 4")


def triplet_hinge(eps, eps_pos, eps_neg, margin=0.1):
    """Eq. (3): relu(MSE(eps_pos, eps) - MSE(eps_neg, eps) + margin), MSEs over the whole batch."""
    raise NotImplementedError("Exercise 4")''',
    tryit='''xs, rs, xr, rr = (torch.rand(2, 3, 4, 4) for _ in range(4))
for mine, ref in zip(residual_swap(xs, rs, xr, rr), dm.residual_swap(xs, rs, xr, rr)):
    torch.testing.assert_close(mine, ref)
eps = torch.randn(4, 3, 8, 8)
pos, neg = eps + 0.1 * torch.randn_like(eps), eps + 0.2 * torch.randn_like(eps)
print("hinge:", triplet_hinge(eps, pos, neg).item(), "dada_min:", dm.triplet_hinge(eps, pos, neg).item())
torch.testing.assert_close(triplet_hinge(eps, pos, neg), dm.triplet_hinge(eps, pos, neg))
print("matches dada_min")''')

# ----------------------------------------------------------------------------------------------------------
exercise(
    ex="ex5", name="restore", minutes=20, title="restoring images of any size",
    intro=r"""
**You will learn** what happens at test time: the denoiser is thrown away and restoring is one pass of $G$,
$\hat y = x + G(x)$ (`G(x)` returns the residual). Real images rarely have a convenient size, though.

`dm.RestorerUNet` halves the resolution `depth - 1` times with average pooling and doubles it back in the decoder,
concatenating skip connections. If the height or width is not a multiple of $m = 2^{\text{depth}-1}$, the upsampled
map and its skip differ by a pixel and the concatenation fails. The fix used by the official code:
1. pad the **bottom and right** edges by **replication** (repeat the border pixels) up to the next multiple of $m$,
2. restore the padded image,
3. crop back to the original `H x W`,
4. clamp to $[0, 1]$.

Inference needs no gradients, so it runs under `torch.no_grad()`: no graph is built and no memory is kept for it.

**Your task.** Write `restore(G, x)` for `x` of shape `(B, 3, H, W)` with any `H, W`, returning `(B, 3, H, W)`.
The grader uses restorers of depth 1 to 4 with random weights and checks the exact output, the size `G` sees
(the smallest multiple, no more) and that no graph is built.""",
    hints=r"""
- `G.depth` is the number of levels.
- `(-H) % m` is the padding that makes `H` a multiple of `m` (0 when it already is).
- `F.pad(x, (left, right, top, bottom), mode="replicate")` pads the last two dimensions; the order is width first.
- Decorate the function with `@torch.no_grad()` (or use `with torch.no_grad():`).""",
    code='''import torch
import torch.nn.functional as F


def restore(G, x):
    """y_hat = x + G(x) for x: (B, 3, H, W) of any size: replicate-pad to a multiple of 2^(G.depth-1),
    restore, crop back, clamp to [0, 1]. No gradients."""
    raise NotImplementedError("Exercise 5")''',
    tryit='''G = dm.RestorerUNet(4, 3)
torch.nn.init.normal_(G.last.weight, std=0.1)            # a fresh G is the identity; make it do something
x = torch.rand(1, 3, 37, 23)
y = restore(G, x)
print(tuple(x.shape), "->", tuple(y.shape))
torch.testing.assert_close(y, dm.restore(G, x))
print("matches dada_min")''')

# ----------------------------------------------------------------------------------------------------------
exercise(
    ex="ex6", name="diffusion_loss", minutes=30, title="the noise-space loss",
    intro=r"""
**You will learn** how the pieces of exercises 1, 3 and 4 combine into the loss that adapts the restorer:
denoising *as* adaptation.

For a clean synthetic target $y_0 = y^s$, the two restored images $\hat y^s$, $\hat y^r$ and optionally the negatives:
1. draw $\gamma$ (`schedule.sample_gamma(B, *t_range)`) unless given, and $\epsilon$ (`torch.randn_like(y0)`) unless given;
2. $y_t$ = `schedule.q_sample(y0, gamma, eps)`;
3. shuffle the condition slots: `c1, c2, _ = dm.channel_shuffle(cond_syn, cond_real, shuffle)`;
4. $\hat\epsilon_\text{pos} = \epsilon_\theta(\text{cat}[y_t, c_1, c_2], \gamma)$ and Eq. (1): `mse = MSE(eps_pos, eps)`;
5. without negatives, return `(mse, {"mse": mse.detach()})`;
6. with `neg = (n_syn, n_real)`: shuffle **them with their own independent draw**, run $\epsilon_\theta$ again on the
   **same** $y_t$ and $\gamma$, compute the hinge (Eq. (3), `dm.triplet_hinge`), and return
   `((mse + hinge) / 2, {"mse": ..., "mse_neg": MSE(eps_neg, eps), "hinge": ...})`, every part detached.

Why does this adapt $G$? $\hat y^r$ enters $\epsilon_\theta$ as an input, so $\partial L / \partial \hat y^r$ flows into $G$.
Lowering the noise-prediction error is easiest when the conditions are clean images; channel shuffling makes
$\epsilon_\theta$ rely on both, so the gradient pushes real restorations toward clean ones too.

**Your task.** Write `diffusion_loss(...)` with the signature in the cell below, returning `(loss, parts)`. You may
use `dm.channel_shuffle`, `dm.triplet_hinge` and the schedule's `sample_gamma` / `q_sample` (you wrote them in
exercises 1-4). The grader compares values with dada_min given fixed `gamma`/`eps`, and also with all random draws
seeded: draw in the order **gamma, eps, positive swap, negative swap**.""",
    hints=r"""
- `denoiser(x, gamma)` takes `x` of shape `(B, 9, H, W)`: concatenate along dimension 1.
- Call `.float()` on the denoiser's output before the MSE (under mixed precision it may be half precision).
- `t_range` is `(t_min, t_max)`; `schedule.sample_gamma(B, *t_range)` unpacks it.
- Do not detach the conditions: gradients must reach `cond_syn`, `cond_real` and both negatives.""",
    code='''import torch
import torch.nn.functional as F

import dada_min as dm


def diffusion_loss(denoiser, schedule, y0, cond_syn, cond_real, neg=None, shuffle=True, margin=0.1,
                   t_range=(1, None), gamma=None, eps=None):
    """L_noise: Eq. (1), and with neg=(n_syn, n_real) the mean of Eq. (1) and Eq. (3). Returns (loss, parts)."""
    raise NotImplementedError("Exercise 6")''',
    tryit='''D, schedule = dm.ConditionalDenoiser(8, (1, 2)), dm.NoiseSchedule()
y0, cs, cr, n1, n2 = (torch.rand(4, 3, 8, 8) for _ in range(5))
torch.manual_seed(2); mine = diffusion_loss(D, schedule, y0, cs, cr, (n1, n2))
torch.manual_seed(2); ref = dm.diffusion_loss(D, schedule, y0, cs, cr, (n1, n2))
print("loss", mine[0].item(), "dada_min", ref[0].item())
print({k: round(v.item(), 5) for k, v in mine[1].items()})
torch.testing.assert_close(mine[0], ref[0])
print("matches dada_min")''')

# ----------------------------------------------------------------------------------------------------------
exercise(
    ex="ex7", name="train_step", minutes=35, title="one joint training step (Algorithm A)",
    intro=r"""
**You will learn** the heart of the method: one optimisation step that trains the restorer $G$ and the denoiser
$\epsilon_\theta$ **together**, from one loss, with one optimiser.

Given a synthetic pair $(x^s, y^s)$, an unpaired real input $x^r$ and the current weight $\alpha$:
1. restore both domains with the **same** $G$: the residuals $R^s = G(x^s)$, $R^r = G(x^r)$ (one batched pass on
   `torch.cat([x_syn, x_real])`, split with `.chunk(2)`), and $\hat y^s = x^s + R^s$, $\hat y^r = x^r + R^r$;
2. $L_\text{Res}$ = `dm.charbonnier(y_syn_hat, y_syn)`, the supervised loss on synthetic pairs only;
3. the RS negatives `dm.residual_swap(x_syn, r_syn, x_real, r_real)`;
4. $L_\text{noise}$ = `dm.diffusion_loss(D, schedule, y_syn, y_syn_hat, y_real_hat, neg, True, margin, t_range)`
   (with channel shuffling);
5. $L = L_\text{Res} + \alpha L_\text{noise}$; clear old gradients, backpropagate once, take one optimiser step.

Nothing is detached: the diffusion loss trains $\epsilon_\theta$ **and** sends gradients into $G$ through both
conditions and the negatives. `dm.train_step` does exactly this (plus sampling the batches, the $\alpha$ schedule of
exercise 2 and an EMA copy of $G$); read it after you have written yours.

**Your task.** Write `da_step(G, D, schedule, opt, x_syn, y_syn, x_real, alpha, margin=0.1, t_range=(1, None))`
returning a dict with the floats `"loss"`, `"loss_res"` and `"loss_dif"`. The grader draws the batches exactly as
`dm.train_step` does, runs both on identical copies (with stale gradients left in the parameters) and compares the
losses and every parameter after the step. Call `dm.diffusion_loss` once, after `G`, so the random draws match.""",
    hints=r"""
- `opt` already holds the parameters of both networks; you only call `opt.zero_grad()`, `loss.backward()`,
  `opt.step()`.
- Forgetting `opt.zero_grad()` adds the stale gradients to the new ones: the grader checks for it.
- `.item()` turns a 0-d tensor into a float (do it after the step; the values are those before the update).""",
    code='''import torch

import dada_min as dm


def da_step(G, D, schedule, opt, x_syn, y_syn, x_real, alpha, margin=0.1, t_range=(1, None)):
    """One step of Algorithm A on given batches. Returns {"loss", "loss_res", "loss_dif"} as floats."""
    raise NotImplementedError("Exercise 7")''',
    tryit='''cfg = dm.make_config("tiny", device="cpu")
data = dm.make_data(cfg)
state = dm.init_state(cfg, torch.device("cpu"))
for step in range(10):
    x_syn, y_syn = dm.syn_batch(data, cfg)
    x_real = dm.real_batch(data, cfg)
    out = da_step(state.G, state.D, state.schedule, state.opt, x_syn, y_syn, x_real, alpha=0.2)
    print(step, {k: round(v, 4) for k, v in out.items()})''')

# ----------------------------------------------------------------------------------------------------------
exercise(
    ex="ex8", name="mechanism_diagnostic", minutes=40, title="the mechanism diagnostic",
    intro=r"""
**You will learn** to *measure* the claim behind the method instead of believing it: does the diffusion loss push
restored real images toward their clean versions?

On real data we could not check this, since real images have no ground truth. On dada-min's built-in data the
clean version $y^r$ of every real-like image is known (the method never uses it), so we can compare two directions
for the real residual $R^r$:
- the direction the diffusion loss moves it: $-\partial L_\text{noise} / \partial R^r$;
- the direction that would make it right: $y^r - \hat y^r$.

Their cosine similarity, averaged over the samples (and over a few draws of the noise), is the diagnostic.
Positive means the loss moves real restorations toward clean; near 0 means it does not help. `dm.train` logs it
during training.

Steps: take `cfg, G, D = state.cfg, state.G, state.D` and the method's switches
`shuffle, contrast = dm.METHODS[cfg.method][1:3]`. Put `D` in eval mode (no dropout while measuring) and restore
its mode at the end. Compute the residuals once without gradients. Then for each draw: make a fresh leaf copy
`r = r_real.clone().requires_grad_(True)`, build the negatives from `r` if `contrast`, compute
`dm.diffusion_loss(D, state.schedule, y_syn, x_syn + r_syn, x_real + r, neg, shuffle, cfg.margin, (cfg.t_min, cfg.t_max), gamma=g)`,
take `torch.autograd.grad(loss, r)` and the per-sample cosine with `y_real - (x_real + r_real)`.

**Your task.** Write `mechanism_diagnostic(state, x_syn, y_syn, x_real, y_real, gamma=None, draws=4)` returning a
Python float. `gamma`, if given, has shape `(1,)`: use it for every sample. The function must have no side effects:
no `.grad` left on any parameter, `D`'s train/eval mode restored, no weight changed.""",
    hints=r"""
- `torch.autograd.grad(loss, r)` returns a tuple; unlike `loss.backward()` it fills no `.grad` attribute.
- `gamma.expand(B)` turns a `(1,)` level into `(B,)`.
- `F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)` gives one cosine per sample.
- Keep the random draws in the order dada_min uses (one `dm.diffusion_loss` call per draw, nothing random in
  between): the grader seeds both runs identically and compares the value.""",
    code='''import torch
import torch.nn.functional as F

import dada_min as dm


def mechanism_diagnostic(state, x_syn, y_syn, x_real, y_real, gamma=None, draws=4):
    """Mean cos(-dL_noise/dR_real, y_real - y_real_hat) over samples and draws. Returns a float."""
    raise NotImplementedError("Exercise 8")''',
    tryit='''cfg = dm.make_config("tiny", device="cpu", steps=60, eval_every=0)
data = dm.make_data(cfg)
state = dm.train(cfg, data, log=lambda s: None)
torch.manual_seed(0)
batch = (*dm.syn_batch(data, cfg), *dm.real_pairs_batch(data, cfg))
torch.manual_seed(1); mine = mechanism_diagnostic(state, *batch)
torch.manual_seed(1); ref = dm.mechanism_diagnostic(state, *batch)
print(f"diagnostic after {cfg.steps} steps: {mine:+.4f} (dada_min: {ref:+.4f})")''')

# ----------------------------------------------------------------------------------------------------------
exercise(
    ex="ex9", name="open_experiment", minutes=90, title="design a domain gap and measure DA on it (open-ended)",
    intro=r"""
**You will learn** to run an experiment end to end: choose a synthetic-to-real gap, train the vanilla restorer and
the DA restorer on it with `dada_min.train`, and report what happened, honestly.

The built-in gaps are a narrow synthetic range (AWGN, `sigma_max=15`) against stronger white real noise (the default,
`real_noise="white"`), and the paper's range (`sigma_max=75`) against a simulated camera (`real_noise="camera"`:
correlated, brightness-dependent noise). Design your own. Some ideas:
- noise shared by the three colour channels (grey noise), or only in some channels;
- brightness-dependent noise, noise at a fixed coarser scale (upsampled), salt-and-pepper pixels.

To change the real-like domain, build the data with `dm.make_data(cfg)` and replace its real pools with your own
degradation of the clean images, e.g. `dataclasses.replace(data, real_noisy=my_noise(data.real_clean),
test_real_noisy=my_noise(data.test_real_clean))`. Both methods must train on the **same** data.

**Your task.** Write `run_experiment(steps=60, seed=0)` that returns a dict with
- `"description"`: one sentence describing your gap;
- `"identity"`: `{"syn_psnr", "real_psnr"}` of the unrestored test inputs against their clean versions;
- `"vanilla"` and `"da"`: `dm.evaluate_pools(state.G_ema, data)` of the states `dm.train` returned;
- `"da_gain_real_db"`: `da["real_psnr"] - vanilla["real_psnr"]`.

Use the `"tiny"` preset and pass `steps` to every training run: the grader calls `run_experiment(steps=3)` to check
the plumbing in seconds, so it grades the *form* (keys, types, ranges, that `dm.train` trained both methods on the
same data, that the reported numbers are those of the trained models, that the gap is not the built-in one), not
whether DA helps. Whether it helps is for you to find out below, with a longer run.""",
    hints=r"""
- `dm.make_config("tiny", steps=steps, seed=seed, device="cpu", eval_every=0)`, then
  `dataclasses.replace(cfg, method="vanilla")` and `method="da"`.
- `dm.train(cfg, data, log=lambda s: None)` keeps the output quiet.
- `dm.psnr(x, y).mean().item()` gives a float; clamp the synthetic test inputs to [0, 1] first (AWGN is not clipped).
- Use a `torch.Generator` for your degradation so it is reproducible.
- One run proves little: the gain of a tiny run changes with the seed. Repeat with 2-3 seeds before you conclude.""",
    code='''import dataclasses

import torch

import dada_min as dm


def run_experiment(steps=60, seed=0):
    """Design a domain gap, train vanilla and DA on it with dm.train, return the results dict."""
    raise NotImplementedError("Exercise 9")''',
    tryit='''# A longer run to see the effect (a few minutes on a laptop CPU). Repeat with other seeds before concluding.
for seed in (0, 1):
    r = run_experiment(steps=400, seed=seed)
    print(f"seed {seed}: input {r['identity']['real_psnr']:.2f} dB, vanilla {r['vanilla']['real_psnr']:.2f} dB, "
          f"DA {r['da']['real_psnr']:.2f} dB, gain {r['da_gain_real_db']:+.2f} dB")''')


# ----------------------------------------------------------------------------------------------------------
def build(e):
    n = e["ex"][2:]
    stem = f"{e['ex']}_{e['name']}"
    cells = [
        new_code_cell(SETUP.format(n=n, title=e["title"])),
        new_markdown_cell(f"# Exercise {n}: {e['title']}\n\n*About {e['minutes']} minutes. Exercise id `{e['ex']}`: "
                          f"the stub, the pytest marker and the grading tests share it.*\n" + e["intro"]),
        new_markdown_cell("## Hints\n" + e["hints"]),
        new_code_cell(HEAD.format(ex=e["ex"]) + "\n" + e["code"], metadata={"tags": ["solution"]}),
        new_markdown_cell("## Try it\nRun your function and compare it with dada_min's."),
        new_code_cell(e["tryit"]),
        new_markdown_cell(f"## Grade it\nThe grader runs the tests marked `{e['ex']}` on the SOLUTION cell(s) of "
                          f"this notebook:\n\n    python -m pytest tests/exercises -m {e['ex']} --solution "
                          f"notebooks/exercises/{stem}.ipynb"),
        new_code_cell(GRADE.format(ex=e["ex"], stem=stem)),
    ]
    for i, c in enumerate(cells):                       # stable cell ids: regenerating changes nothing
        c["id"] = f"{e['ex']}-{i}"
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    nbformat.validate(nb)
    return stem, nb


def main(out=HERE):
    paths = []
    for e in EXERCISES:
        stem, nb = build(e)
        path = os.path.join(out, f"{stem}.ipynb")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            nbformat.write(nb, f)
        os.replace(tmp, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in main(sys.argv[1] if len(sys.argv) > 1 else HERE):
        print("wrote", os.path.relpath(p))
