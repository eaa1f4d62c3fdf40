"""Reference solution of exercise 9 (open-ended): one designed domain gap, measured.

The gap: the synthetic training noise is white in every channel (AWGN, sigma up to cfg.sigma_max/255), while the
"real" camera here adds the SAME noise to R, G and B (grey, luminance-only noise, sigma 30/255). A restorer
trained on the synthetic pairs has never seen noise that is perfectly correlated across channels.
"""
import dataclasses

import torch

import dada_min as dm


def grey_noise(y, gen, sigma=30 / 255):
    """One noise plane per image, shared by the three channels: (N, 3, H, W) -> (N, 3, H, W) in [0, 1]."""
    n = torch.randn(y.shape[0], 1, *y.shape[2:], generator=gen)        # (N, 1, H, W), broadcast over C
    return (y + sigma * n).clamp(0, 1)


def run_experiment(steps=60, seed=0):
    cfg = dm.make_config("tiny", steps=steps, seed=seed, device="cpu", eval_every=0)
    data = dm.make_data(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    # replace both real-like pools (training inputs and test inputs) by the designed domain
    data = dataclasses.replace(data, real_noisy=grey_noise(data.real_clean, gen),
                               test_real_noisy=grey_noise(data.test_real_clean, gen))
    results = {"description": f"synthetic: per-channel AWGN sigma <= {cfg.sigma_max:g}/255; real-like: grey noise, "
                              "the same N(0, (30/255)^2) plane added to R, G and B",
               "identity": {"syn_psnr": dm.psnr(data.test_syn_noisy.clamp(0, 1), data.test_syn_clean).mean().item(),
                            "real_psnr": dm.psnr(data.test_real_noisy, data.test_real_clean).mean().item()}}
    for method in ("vanilla", "da"):
        state = dm.train(dataclasses.replace(cfg, method=method), data, log=lambda s: None)
        results[method] = dm.evaluate_pools(state.G_ema, data)
    results["da_gain_real_db"] = results["da"]["real_psnr"] - results["vanilla"]["real_psnr"]
    return results
