"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo) or alone:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_driver.py OUT CASE [CASE ...]

One launch runs its cases one after another in the same processes and process group (joined by the first case, left
after the last: a gloo group cannot be joined again in the same launch):
grad   vanilla on one fixed global batch of 8 pairs (each process takes its share); each process saves the gradient of
       its first step and the loss of its second to OUT/grad-{world}-{rank}.pt
train  dada_min.main(TRAIN flags, --out OUT/run): 4 DA steps; each process saves its final weights to OUT/run/rank{r}.pt
resume the same run continued to 8 steps (--resume)
nan    as train (OUT/nan), but the loss of rank 1 turns NaN at its 3rd step; each process writes dada_min.main's exit
       status to OUT/nan/exit{r}.txt
Each case's stdout and stderr go where the launch's do, so the test reads the guard's error lines from there.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dada_min as dm  # noqa: E402

out, cases = sys.argv[1], sys.argv[2:]
rank, world = dm.dist_rank()
FLAGS = ["--preset", "tiny", "--method", "da", "--device", "cpu", "--eval_every", "2", "--log_every", "2"]
train, charbonnier, init_state, syn_batch = dm.train, dm.charbonnier, dm.init_state, dm.syn_batch
teardown, dm.dist_teardown = dm.dist_teardown, lambda: None                         # one group for all cases


def train_and_save(folder):
    def run(*args, **kwargs):
        state = train(*args, **kwargs)
        nets = {"G": state.G.state_dict(), "G_ema": state.G_ema.state_dict(), "D": state.D.state_dict()}
        torch.save(nets, os.path.join(folder, f"rank{rank}.pt"))
        return state
    return run


def grad_case():
    gen = torch.Generator().manual_seed(123)
    y = torch.rand(8, 3, 16, 16, generator=gen)                                     # the global batch
    x = y + 0.1 * torch.randn(y.shape, generator=gen)
    share = 8 // world
    dm.syn_batch = lambda data, cfg: (x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
    record = {}

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
    state = dm.train(dm.make_config("tiny", method="vanilla", batch_size=share, steps=2, eval_every=0, log_every=1,
                                    device="cpu"), log=lambda s: None)
    torch.save({"grad": record["grad"], "loss2": state.history["loss_res"][1]},
               os.path.join(out, f"grad-{world}-{rank}.pt"))
    dm.syn_batch, dm.init_state = syn_batch, init_state


def nan_case():
    calls = [0]

    def bad_on_rank_1(pred, target, eps=1e-3):
        calls[0] += 1
        loss = charbonnier(pred, target, eps)
        return loss * float("nan") if rank == 1 and calls[0] >= 3 else loss
    folder = os.path.join(out, "nan")
    os.makedirs(folder, exist_ok=True)
    dm.charbonnier, dm.train = bad_on_rank_1, train_and_save(folder)
    code = dm.main(FLAGS + ["--steps", "20", "--out", folder])
    dm.charbonnier, dm.train = charbonnier, train
    with open(os.path.join(folder, f"exit{rank}.txt"), "w") as f:
        f.write(str(code))


for case in cases:
    if case == "grad":
        grad_case()
    elif case in ("train", "resume"):
        folder = os.path.join(out, "run")
        os.makedirs(folder, exist_ok=True)
        dm.train = train_and_save(folder)
        steps = ["--steps", "4"] if case == "train" else ["--steps", "8", "--resume"]
        code = dm.main(FLAGS + steps + ["--out", folder])
        dm.train = train
        if code:
            sys.exit(code)
    elif case == "nan":
        nan_case()
    else:
        sys.exit(f"ddp_driver.py: unknown case {case!r}")
teardown()
