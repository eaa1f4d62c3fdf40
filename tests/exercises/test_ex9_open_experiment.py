"""Grades exercise 9 (open-ended): run_experiment(steps, seed) designs a domain gap, trains vanilla and DA on it
with dada_min.train, and returns a results dict. Graded on the dict's shape and honesty: the numbers must be
those of the models dada_min.train returned, evaluated on the data they were trained with."""
import math

import pytest
import torch

import dada_min as dm

pytestmark = pytest.mark.ex9
STEPS = 3                                                 # the grader asks for a very short run


@pytest.fixture(scope="module")
def run(sol):
    """Call the student's experiment once, recording every dada_min.train call (config, data, result)."""
    calls, original = [], dm.train

    def recording_train(cfg, data=None, *args, **kwargs):
        data = dm.make_data(cfg, dm.pick_device(cfg.device)) if data is None else data   # what train would make
        state = original(cfg, data, *args, **kwargs)
        calls.append((cfg, data, state))
        return state
    mp = pytest.MonkeyPatch()
    mp.setattr(dm, "train", recording_train)
    try:
        results = sol.run_experiment(steps=STEPS, seed=0)
    finally:
        mp.undo()
    return results, calls


def finite_psnr(v):
    return isinstance(v, float) and math.isfinite(v) and 0 < v < 100


def test_results_dict_has_the_required_entries(run):
    r, _ = run
    assert isinstance(r, dict), "run_experiment must return a dict"
    missing = {"description", "identity", "vanilla", "da", "da_gain_real_db"} - set(r)
    assert not missing, f"results is missing {sorted(missing)}"
    assert isinstance(r["description"], str) and len(r["description"].strip()) >= 20, \
        "describe the domain gap you designed in a sentence"
    for m in ("identity", "vanilla", "da"):
        assert isinstance(r[m], dict), f"results[{m!r}] must be a dict"
        for k in ("syn_psnr", "real_psnr"):
            assert finite_psnr(r[m].get(k)), f"results[{m!r}][{k!r}] must be a PSNR in dB (a float), got {r[m].get(k)!r}"
    assert isinstance(r["da_gain_real_db"], float)
    assert math.isclose(r["da_gain_real_db"], r["da"]["real_psnr"] - r["vanilla"]["real_psnr"], abs_tol=1e-6), \
        "da_gain_real_db = da real_psnr - vanilla real_psnr"


def test_trained_vanilla_and_da_with_dada_min(run):
    _, calls = run
    methods = [cfg.method for cfg, _, _ in calls]
    assert "vanilla" in methods, f"train a vanilla baseline with dada_min.train (trained: {methods})"
    assert any(dm.METHODS[m][0] for m in methods), f"train a DA method with dada_min.train (trained: {methods})"
    assert all(cfg.steps == STEPS for cfg, _, _ in calls), "use the `steps` argument for every training run"


def test_reported_numbers_are_those_of_the_trained_models(run):
    r, calls = run
    for key, match in (("vanilla", lambda m: m == "vanilla"), ("da", lambda m: dm.METHODS[m][0])):
        measured = [dm.evaluate_pools(state.G_ema, data) for cfg, data, state in calls if match(cfg.method)]
        assert any(all(math.isclose(r[key][k], m[k], abs_tol=1e-4) for k in ("syn_psnr", "real_psnr"))
                   for m in measured), \
            f"results[{key!r}] must be dm.evaluate_pools(state.G_ema, data) of a run dada_min.train returned"


def test_both_methods_saw_the_same_domains(run):
    _, calls = run
    ref = calls[0][1]
    for _, data, _ in calls[1:]:
        for k in ("real_noisy", "test_real_noisy", "test_real_clean", "test_syn_noisy"):
            assert torch.equal(getattr(data, k), getattr(ref, k)), f"compare methods on the same data ({k} differs)"


def test_the_gap_is_designed_not_the_default(run):
    _, calls = run
    cfg, data, _ = calls[0]
    default = dm.Config().validate()                      # the resolved defaults (real_noise, sigma_max)
    custom_config = (cfg.task, cfg.real_noise, cfg.sigma_max) != (default.task, default.real_noise, default.sigma_max)
    # otherwise the data itself must differ from the built-in data of that config (checked only then)
    assert custom_config or not torch.equal(data.test_real_noisy, dm.make_data(cfg).test_real_noisy), \
        "design your own gap: change the real-like degradation (or the synthetic one), not just the seed"
