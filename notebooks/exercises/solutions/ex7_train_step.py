"""Reference solution of exercise 7: one joint training step of G and eps_theta (Algorithm A)."""
import torch

import dada_min as dm


def da_step(G, D, schedule, opt, x_syn, y_syn, x_real, alpha, margin=0.1, t_range=(1, None)):
    """One step of Algorithm A on given batches (B, 3, p, p): restore both domains with the same G,
    L_Res on the synthetic pair, the diffusion loss with CS and RS negatives, L = L_Res + alpha * L_noise,
    one backward and one optimiser step over both networks. Returns the three losses as floats."""
    r_syn, r_real = G(torch.cat([x_syn, x_real])).chunk(2)              # one pass, (B, 3, p, p) each
    y_syn_hat, y_real_hat = x_syn + r_syn, x_real + r_real
    loss_res = dm.charbonnier(y_syn_hat, y_syn)                         # L_Res: synthetic pairs only
    neg = dm.residual_swap(x_syn, r_syn, x_real, r_real)                # RS negatives
    loss_dif, _ = dm.diffusion_loss(D, schedule, y_syn, y_syn_hat, y_real_hat, neg, True, margin, t_range)
    loss = loss_res + alpha * loss_dif                                  # nothing detached: both train G
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item(), "loss_res": loss_res.item(), "loss_dif": loss_dif.item()}
