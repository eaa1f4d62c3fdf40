"""Reference solution of exercise 2: the ramp of the diffusion-loss weight alpha."""
import math


def alpha_ramp(step, total_ramp_steps, alpha_max=0.2):
    """alpha = (2 / (1 + exp(-5 p)) - 1) * alpha_max with progress p = step / total_ramp_steps, capped at 1.
    0 at step 0, then a smooth rise that flattens at about 0.987 * alpha_max. Returns a Python float."""
    p = min(step / max(total_ramp_steps, 1), 1.0)       # max(.., 1): a ramp of 0 steps is already done
    return (2 / (1 + math.exp(-5 * p)) - 1) * alpha_max
