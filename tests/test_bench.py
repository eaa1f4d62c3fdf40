"""bench.py: the throughput benchmark's JSON lines, its loss check and its command line, on CPU."""
import json

import pytest
import torch

import bench
import dada_min as dm

BENCH_KEYS = {"bench", "preset", "path", "device", "precision", "channels_last", "fused_adam", "cudnn_benchmark",
              "batch", "size", "steps", "warmup", "ms_per_step", "pairs_per_s", "peak_mem_mb",
              "max_rss_mb", "params_restorer", "params_denoiser", "loss_res", "loss_dif"}
FAST_KEYS = BENCH_KEYS | {"speedup", "loss_max_rel_diff", "loss_rtol", "losses_agree"}


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]



def test_loss_agreement_flags_differences():
    assert bench.loss_agreement({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.01}) == pytest.approx((0.005, True))
    diff, ok = bench.loss_agreement({"a": 1.0}, {"a": 1.05})
    assert diff == pytest.approx(0.05) and not ok


def test_bench_on_cpu_prints_json_lines_and_the_paths_agree_exactly(capsys):
    cfg = dm.make_config("tiny", device="cpu")
    rows = bench.bench(cfg, steps=1, warmup=0, label="tiny")
    lines = _json_lines(capsys.readouterr().out)
    assert lines == rows and [r["path"] for r in rows] == ["fp32-eager", "fast"]
    slow, fast = rows
    assert set(slow) == BENCH_KEYS and set(fast) == FAST_KEYS
    G, D = dm.make_networks(cfg)
    for r in rows:
        assert (r["params_restorer"], r["params_denoiser"]) == (dm.n_params(G), dm.n_params(D))
        assert r["batch"] == cfg.batch_size and r["size"] == cfg.patch_size and r["peak_mem_mb"] is None
        assert r["pairs_per_s"] == pytest.approx(r["batch"] / r["ms_per_step"] * 1e3, rel=1e-3)
        assert r["precision"] == "fp32" and r["device"].startswith("cpu")
        assert not (r["channels_last"] or r["fused_adam"])
    # on CPU the fast path IS the fp32 path: same weights, same batch, same draws -> identical losses
    assert fast["loss_max_rel_diff"] == 0.0 and fast["losses_agree"] is True
    assert fast["speedup"] == pytest.approx(slow["ms_per_step"] / fast["ms_per_step"], rel=1e-3)
    assert fast["speedup"] == pytest.approx(fast["pairs_per_s"] / slow["pairs_per_s"], rel=2e-3)   # 4 digits each


def test_bench_loss_check_sees_bf16_rounding_within_tolerance():
    cfg = dm.make_config("tiny", device="cpu", precision="bf16", d_dropout=0.2)     # dropout is off for the check
    slow, fast = bench.bench(cfg, steps=1, warmup=0, log=lambda s: None)
    assert fast["precision"] == "bf16" and slow["precision"] == "fp32"
    assert fast["loss_res"] == slow["loss_res"]                     # G starts as the identity: exact
    assert 0 < fast["loss_max_rel_diff"] <= fast["loss_rtol"] and fast["losses_agree"]


def test_bench_cli_batches_and_size(capsys):
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batch", "2,3", "--size", "8",
                    "--steps", "1"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [(r["batch"], r["path"]) for r in rows] == [(2, "fp32-eager"), (2, "fast"), (3, "fp32-eager"), (3, "fast")]
    assert all(r["size"] == 8 and r["steps"] == 1 and r["preset"] == "tiny" for r in rows)


def test_bench_cli_rejects_a_bad_size(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--device", "cpu", "--size", "7", "--steps", "1"])
    assert "patch_size" in capsys.readouterr().err


def test_profile_reports_the_top_operators(capsys):
    ms = bench.profile(dm.make_config("tiny", device="cpu"), steps=2, rows=5)
    out = capsys.readouterr().out
    assert ms > 0 and "ms/step under the profiler" in out and "aten::" in out and "Self CPU" in out


def test_repro_runs_the_same_training_in_fresh_processes_and_compares(capsys):
    """The same config in a fresh process is bit-identical; the kernels of another CPU change the weights."""
    rows = bench.repro(["--preset", "tiny", "--method", "da", "--steps", "3", "--device", "cpu"])
    assert list(rows) == list(bench.REPRO_RUNS)
    assert rows["default"][2] == 0.0 and rows["default, again"][2] == 0.0
    assert rows["default, again"][:2] == rows["default"][:2]
    assert all(r[2] < 0.1 for r in rows.values())                   # a few steps: rounding, not another run
    assert "max weight difference from the first run" in capsys.readouterr().out
