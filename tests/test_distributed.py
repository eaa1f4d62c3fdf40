"""Data-parallel training under torchrun: 2 CPU processes (gloo), the tiny preset, launched as subprocesses."""
import os
import subprocess
import sys

import pytest
import torch

import dada_min as dm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "ddp_driver.py")
FLAGS = ["--preset", "tiny", "--method", "da", "--device", "cpu", "--eval_every", "2", "--log_every", "2"]


def torchrun(*args, timeout=300):
    """Launch the driver under torchrun with 2 processes; returns the CompletedProcess."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launch + [DRIVER, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def in_this_process(*args):
    """Run the driver's cases in this process (one process, no torchrun; it saves a process start). Returns None, or
    the traceback of what it raised. The driver patches dada_min's functions: all of them, and sys.argv, are as they
    were afterwards, even when a case fails half-way."""
    import runpy
    import traceback
    saved, argv = dict(vars(dm)), sys.argv
    sys.argv = [DRIVER, *args]
    try:
        runpy.run_path(DRIVER, run_name="__main__")
    except BaseException:                                                      # the driver may sys.exit
        return traceback.format_exc()
    finally:
        vars(dm).update(saved)
        sys.argv = argv


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Two torchrun launches for every case (the driver runs several in one launch): grad, train (4 steps) and nan
    under 2 processes; the run resumed to 6 steps in this process alone; resumed to 8 under 2 processes again; and the
    one-process gradient of the same global batch."""
    out = str(tmp_path_factory.mktemp("ddp"))
    first = torchrun(out, "grad", "train", "nan")
    run = os.path.join(out, "run")
    blob4 = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True) if first.returncode == 0 else None
    ranks4 = [torch.load(os.path.join(run, f"rank{i}.pt"), weights_only=True) for i in (0, 1)] if blob4 else None
    import contextlib
    import io
    alone = io.StringIO()
    with contextlib.redirect_stdout(alone):
        code = dm.main(FLAGS + ["--steps", "6", "--out", run, "--resume"]) if blob4 else None
    blob6 = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True) if code == 0 else None
    second = torchrun(out, "resume")
    one = in_this_process(out, "grad")
    return {"out": out, "first": first, "blob4": blob4, "ranks4": ranks4, "alone": (code, alone.getvalue()),
            "blob6": blob6, "second": second, "one": one}


def test_two_processes_hold_the_same_weights_and_their_checkpoint_resumes_anywhere(ddp):
    r = ddp["first"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data-parallel: 2 processes (gloo), global batch 4 x 2 = 8" in r.stdout
    assert r.stdout.count("config:") == 2                                      # rank 0 alone speaks (train and nan)
    a, b = ddp["ranks4"]
    for net in ("G", "G_ema", "D"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net])            # DDP kept the copies equal
    blob = ddp["blob4"]
    assert blob["step"] == 4 and blob["world_size"] == 2
    assert all(torch.equal(blob["restorer"][k], a["G"][k]) for k in a["G"])
    # resumed single-process, then again under torchrun
    code, text = ddp["alone"]
    assert code == 0 and "trained by 2 process(es), now 1" in text
    assert ddp["blob6"]["step"] == 6
    r = ddp["second"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained by 1 process(es), now 2" in r.stdout
    blob = torch.load(os.path.join(ddp["out"], "run", "checkpoint.pt"), weights_only=True)
    assert blob["step"] == 8 and blob["world_size"] == 2 and len(blob["history"]["eval_step"]) == 4


def test_a_non_finite_loss_on_one_process_stops_both(ddp):
    r, nan = ddp["first"], os.path.join(ddp["out"], "nan")
    assert [open(os.path.join(nan, f"exit{i}.txt")).read() for i in (0, 1)] == ["1", "1"]   # both exit non-zero
    # both ranks stop at the same step with the guard's text: DDP averaged rank 1's NaN gradients into rank 0's
    assert r.stderr.count("error: training diverged at step 3") == 2, r.stderr[-3000:]
    assert "loss_res=nan" in r.stderr and "grad_norm=nan" in r.stderr
    blob = torch.load(os.path.join(nan, "checkpoint.pt"), weights_only=True)
    assert blob["step"] == 2                                                   # the last finite evaluation is kept
    assert not os.path.exists(os.path.join(nan, "rank0.pt"))


def test_two_processes_take_the_gradient_of_one_process_on_the_same_global_batch(ddp):
    assert ddp["one"] is None, ddp["one"]
    one = torch.load(os.path.join(ddp["out"], "grad-1-0.pt"), weights_only=True)
    two = [torch.load(os.path.join(ddp["out"], f"grad-2-{i}.pt"), weights_only=True) for i in (0, 1)]
    for g1, g2a, g2b in zip(one["grad"], two[0]["grad"], two[1]["grad"]):
        torch.testing.assert_close(g2a, g2b, rtol=0, atol=0)                   # every process steps alike
        torch.testing.assert_close(g2a, g1, rtol=1e-4, atol=1e-7)              # = the one-process gradient
    # after one identical step, the mean of the two halves' losses is the loss of the whole batch
    assert (two[0]["loss2"] + two[1]["loss2"]) / 2 == pytest.approx(one["loss2"], rel=1e-5)


def test_without_torchrun_nothing_is_distributed():
    assert dm.dist_rank() == (0, 1) and dm.dist_any(True, torch.device("cpu")) and not dm.dist_any(False, "cpu")
    with pytest.raises(ValueError, match="single-process only"):
        import baselines  # noqa: F401
        dm.data_parallel(dm.make_config("tiny", method="dann"), None, None, torch.device("cpu"))


def test_a_process_whose_own_terms_are_finite_still_stops_when_another_diverged(monkeypatch):
    """(A NaN in one process's batch shows in its own losses first; the others learn of it through dist_any.)"""
    guard = dm.DivergenceGuard(dm.make_config("tiny"), torch.device("cpu"))
    guard.update(1, {"loss_res": torch.tensor(0.5)})
    guard.check()                                                              # finite everywhere: no error
    monkeypatch.setattr(dm, "dist_any", lambda flag, device: True)             # another process saw a NaN
    with pytest.raises(dm.TrainingDiverged, match="diverged on another process"):
        guard.check()
