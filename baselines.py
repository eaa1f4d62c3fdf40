"""The two baselines of the paper's Tables 1-3 in their simplest form: feature-space DA (DANN: a domain
classifier on G's bottleneck features) and pixel-space DA (a discriminator on restored outputs). Importing
this module registers them as the methods "dann" and "pixel_da" through dada_min's plug-in hook
(dada_min.register_method): dada_min.train then trains them like any other method.

    import baselines, dada_min as dm
    state = dm.train(dm.make_config(method="dann"))

NOTE(simplification): the paper retrains published DANN / PixelDA models; these are the smallest versions
of the two ideas that share G, the data, the one Adam optimiser, the step budget and the weight ramp
alpha(step) with DA, so the comparison isolates WHERE the domains are aligned (features, pixels, noise).
Both play their minimax game through a gradient-reversal layer, so they fit the same one-backward loop:
the critic minimises its classification loss while G, receiving the reversed gradient, maximises it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import dada_min as dm

ADVERSARIAL = ("dann", "pixel_da")                          # the methods of this module, each with a critic


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
        return nn.Sequential(dm.conv3(c, c), act, nn.Conv2d(c, 1, 1))
    if cfg.method == "pixel_da":
        w = cfg.r_width
        return nn.Sequential(nn.Conv2d(3, w, 4, 2, 1), act, nn.Conv2d(w, 2 * w, 4, 2, 1), act, dm.conv3(2 * w, 1))
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
    loss_res = dm.charbonnier(x_syn + r_syn, y_syn)                                    # L_Res on synthetic pairs
    return loss_res + adv, {"loss_res": loss_res.detach(), "loss_adv": adv.detach(), "alpha": lam}


def baseline_loss(state, data, G, x_syn, y_syn):
    """The plug-in loss of both baselines (see dada_min.PLUGINS; the critic is state.D): the critic's weight lam follows the same
    ramp as DA's alpha, and the unpaired real batch is drawn here, after the synthetic one."""
    cfg = state.cfg
    lam = dm.alpha_ramp(state.step, cfg.ramp_frac * cfg.steps, cfg.alpha_max)
    return adversarial_loss(cfg.method, G, state.D, x_syn, y_syn, dm.real_batch(data, cfg), lam)


for _name in ADVERSARIAL:
    dm.register_method(_name, baseline_loss, make_critic)
