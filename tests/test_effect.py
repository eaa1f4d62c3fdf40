"""The effect experiment (does DA close the vanilla -> oracle gap?) at its --quick size."""
import json
import math
import os

import dada_min as dm


def test_effect_experiment_quick(tmp_path):
    out = str(tmp_path / "effect")
    res = dm.exp_effect(dm.make_config("tiny"), out, quick=True)
    saved = json.load(open(os.path.join(out, "effect.json")))
    assert set(saved["domains"]) == {"camera", "white"} == set(res["domains"])
    for d in saved["domains"].values():
        s = d["summary"]
        assert s["vanilla"]["gap_closed"][0] == 0.0 and s["oracle"]["gap_closed"][0] == 1.0
        run = d["runs"]["da"][0]
        assert set(run["diag_by_gamma"]) == {str(g) for g in dm.NOISE_LEVELS}
        assert all(-1 <= c <= 1 for c in run["diag_by_gamma"].values())
        gap = (run["real_psnr"] - d["runs"]["vanilla"][0]["real_psnr"]) / (
            d["runs"]["oracle"][0]["real_psnr"] - d["runs"]["vanilla"][0]["real_psnr"])
        assert math.isclose(s["da"]["gap_closed"][0], gap, rel_tol=1e-9, abs_tol=1e-12)
    assert os.path.getsize(os.path.join(out, "effect.png")) > 1000
