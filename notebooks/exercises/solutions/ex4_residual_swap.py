"""Reference solution of exercise 4: residual-swapped negatives (RS) and the triplet hinge."""
import torch.nn.functional as F


def residual_swap(x_syn, r_syn, x_real, r_real):
    """Eq. (2): give each input the OTHER domain's residual. Returns (x_syn + r_real, x_real + r_syn).
    Nothing is detached, so the hinge below also trains the restorer that made the residuals."""
    return x_syn + r_real, x_real + r_syn


def triplet_hinge(eps, eps_pos, eps_neg, margin=0.1):
    """Eq. (3): relu(MSE(eps_pos, eps) - MSE(eps_neg, eps) + margin), each MSE a mean over the whole batch
    (one hinge per batch). Zero once the negative pass is worse than the positive one by the margin."""
    return F.relu(F.mse_loss(eps_pos, eps) - F.mse_loss(eps_neg, eps) + margin)
