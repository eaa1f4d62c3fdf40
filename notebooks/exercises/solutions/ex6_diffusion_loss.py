"""Reference solution of exercise 6: the noise-space loss, Eq. (1) and, with negatives, Eq. (3)."""
import torch
import torch.nn.functional as F

import dada_min as dm


def diffusion_loss(denoiser, schedule, y0, cond_syn, cond_real, neg=None, shuffle=True, margin=0.1,
                   t_range=(1, None), gamma=None, eps=None):
    """Noise y0, let the denoiser predict the noise from cat[y_t, c1, c2], return (loss, parts).
    Without negatives: loss = MSE(eps_hat, eps). With neg = (n_syn, n_real): a second pass on the SAME y_t,
    eps and gamma with the negatives as conditions, and loss = (MSE + hinge) / 2."""
    B = y0.shape[0]
    gamma = schedule.sample_gamma(B, *t_range) if gamma is None else gamma    # random draws 1-2
    eps = torch.randn_like(y0) if eps is None else eps                        # random draw 3
    y_t = schedule.q_sample(y0, gamma, eps)                                   # (B, 3, H, W)
    c1, c2, _ = dm.channel_shuffle(cond_syn, cond_real, shuffle)              # random draw 4
    eps_pos = denoiser(torch.cat([y_t, c1, c2], 1), gamma).float()            # input (B, 9, H, W)
    mse_pos = F.mse_loss(eps_pos, eps)                                        # Eq. (1)
    if neg is None:
        return mse_pos, {"mse": mse_pos.detach()}
    n1, n2, _ = dm.channel_shuffle(neg[0], neg[1], shuffle)                   # random draw 5: its own swap
    eps_neg = denoiser(torch.cat([y_t, n1, n2], 1), gamma).float()
    hinge = dm.triplet_hinge(eps, eps_pos, eps_neg, margin)                   # Eq. (3)
    parts = {"mse": mse_pos.detach(), "mse_neg": F.mse_loss(eps_neg, eps).detach(), "hinge": hinge.detach()}
    return (mse_pos + hinge) / 2, parts
