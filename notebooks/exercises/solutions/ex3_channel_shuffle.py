"""Reference solution of exercise 3: the channel-shuffling layer (CS)."""
import torch


def channel_shuffle(c_syn, c_real, enabled=True):
    """Per sample, with probability 1/2, swap which condition slot holds the synthetic and which the real
    restored image. c_syn, c_real: (B, C, H, W). Returns (c1, c2, swapped), swapped: (B,) bool."""
    if not enabled:
        return c_syn, c_real, torch.zeros(c_syn.shape[0], dtype=torch.bool, device=c_syn.device)
    swapped = torch.rand(c_syn.shape[0], device=c_syn.device) < 0.5    # (B,), a fresh coin per sample
    m = swapped.view(-1, 1, 1, 1)                                      # (B, 1, 1, 1) broadcasts per image
    return torch.where(m, c_real, c_syn), torch.where(m, c_syn, c_real), swapped
