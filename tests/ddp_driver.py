"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo) or alone:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_driver.py MODE OUT [dada_min flags]

MODE train: dada_min.main(flags); each process saves its final weights to OUT/rank{r}.pt
MODE nan:   the same, but the loss of rank 1 turns NaN at its 3rd step
MODE grad:  vanilla on one fixed global batch of 8 pairs (each process takes its share); each process saves the
            gradient of its first step and the loss of its second to OUT/grad-{world}-{rank}.pt
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dada_min as dm  # noqa: E402

mode, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
rank, world = dm.dist_rank()
train = dm.train


def train_and_save(*args, **kwargs):
    state = train(*args, **kwargs)
    nets = {"G": state.G.state_dict(), "G_ema": state.G_ema.state_dict(), "D": state.D.state_dict()}
    torch.save(nets, os.path.join(out, f"rank{rank}.pt"))
    return state


dm.train = train_and_save
if mode == "nan":
    charbonnier, calls = dm.charbonnier, [0]

    def bad_on_rank_1(pred, target, eps=1e-3):
        calls[0] += 1
        loss = charbonnier(pred, target, eps)
        return loss * float("nan") if rank == 1 and calls[0] >= 3 else loss
    dm.charbonnier = bad_on_rank_1
if mode == "grad":
    gen = torch.Generator().manual_seed(123)
    y = torch.rand(8, 3, 16, 16, generator=gen)                                     # the global batch
    x = y + 0.1 * torch.randn(y.shape, generator=gen)
    share = 8 // world
    dm.syn_batch = lambda data, cfg: (x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
    record, init_state = {}, dm.init_state

    def recording_init_state(*args, **kwargs):
        state = init_state(*args, **kwargs)
        step = state.opt.step

        def step_and_record(*a, **k):
            if "grad" not in record:
                record["grad"] = [p.grad.clone() for p in state.G.parameters()]
            return step(*a, **k)
        state.opt.step = step_and_record
        return state
    dm.init_state = recording_init_state
    losses = []
    dm.train = train
    state = dm.train(dm.make_config("tiny", method="vanilla", batch_size=share, steps=2, eval_every=0, log_every=1,
                                    device="cpu"), log=lambda s: None)
    torch.save({"grad": record["grad"], "loss2": state.history["loss_res"][1]},
               os.path.join(out, f"grad-{world}-{rank}.pt"))
    dm.dist_teardown()
    sys.exit(0)
sys.exit(dm.main(flags))
