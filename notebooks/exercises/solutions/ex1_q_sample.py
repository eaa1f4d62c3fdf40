"""Reference solution of exercise 1: forward diffusion q_sample and the continuous noise level gamma."""
import torch


def q_sample(y0, gamma, eps):
    """Noise clean images to level gamma: y_t = sqrt(gamma) * y0 + sqrt(1 - gamma) * eps.
    y0, eps: (B, C, H, W); gamma: (B,), one noise level per image. Returns (B, C, H, W) in y0's dtype."""
    g = gamma.view(-1, 1, 1, 1).to(y0.dtype)            # (B, 1, 1, 1): broadcasts over C, H and W
    return g.sqrt() * y0 + (1 - g).sqrt() * eps        # gamma = 1: y0 unchanged; gamma = 0: pure noise


def sample_gamma(alphas_cumprod, n, t_min=1, t_max=None):
    """n continuous noise levels: a step t ~ U{t_min..t_max} (default t_max = T - 1), then gamma uniform
    between alphas_cumprod[t] and alphas_cumprod[t - 1]. Returns (n,) on alphas_cumprod's device."""
    t_max = alphas_cumprod.shape[0] - 1 if t_max is None else t_max
    dev = alphas_cumprod.device
    t = torch.randint(t_min, t_max + 1, (n,), device=dev)               # draw 1: the discrete step
    lo, hi = alphas_cumprod[t], alphas_cumprod[t - 1]                   # abar[t] < abar[t - 1]
    return lo + (hi - lo) * torch.rand(n, device=dev)                   # draw 2: a point in between
