"""Reference solution of exercise 8: the mechanism diagnostic."""
import torch
import torch.nn.functional as F

import dada_min as dm


def mechanism_diagnostic(state, x_syn, y_syn, x_real, y_real, gamma=None, draws=4):
    """Mean over samples and `draws` noise draws of cos(-dL/dR_real, y_real - y_real_hat), where L is the
    diffusion loss of state.cfg.method and R_real = G(x_real). Positive: the loss pushes the restored real
    images toward their clean versions. Leaves no gradients in G or D and D's train/eval mode unchanged."""
    cfg, G, D = state.cfg, state.G, state.D
    shuffle, contrast = dm.METHODS[cfg.method][1:3]
    was_training = D.training
    D.eval()                                                            # no dropout while measuring
    with torch.no_grad():
        r_syn, r_real = G(torch.cat([x_syn, x_real])).chunk(2)          # (B, 3, p, p) each
    cos = []
    for _ in range(draws):
        r = r_real.clone().requires_grad_(True)                         # the leaf we differentiate by
        neg = dm.residual_swap(x_syn, r_syn, x_real, r) if contrast else None
        g = None if gamma is None else gamma.expand(x_syn.shape[0])
        loss, _ = dm.diffusion_loss(D, state.schedule, y_syn, x_syn + r_syn, x_real + r, neg, shuffle,
                                    cfg.margin, (cfg.t_min, cfg.t_max), gamma=g)
        (grad,) = torch.autograd.grad(loss, r)                          # only dL/dR_real: no .grad anywhere
        to_clean = (y_real - (x_real + r_real)).flatten(1)              # (B, 3*p*p)
        cos.append(F.cosine_similarity(-grad.flatten(1), to_clean, dim=1).mean())
    D.train(was_training)
    return torch.stack(cos).mean().item()
