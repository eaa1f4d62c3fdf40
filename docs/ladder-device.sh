#!/usr/bin/env bash
# The denoiser ladder at the gpu and paper sizes on one GPU, in under 10 minutes of GPU time
# (docs/effect.md, "The denoiser ladder on a device"). Every size trains its own start, then runs vanilla, the oracle
# and DA at the base and with a warm-up of 4x the steps, on the photographs (native size) and on natural x white,
# seeds 0-2. Each size runs under a time limit; the JSON keeps every finished training and (domain, rung) cell, so a
# size cut short still reports what it finished, and rerunning the script with the same OUT trains only what is missing.
#
#   bash docs/ladder-device.sh PHOTOS_DIR [OUT]     # OUT defaults to runs/ladder-device
#
# Writes OUT/{gpu,paper}/ladder.{json,md,png}, OUT/{gpu,paper}/start.pt and OUT/{gpu,paper}.log.
set -uo pipefail
photos=${1:?usage: bash docs/ladder-device.sh PHOTOS_DIR [OUT]}
out=${2:-runs/ladder-device}
[ -d "$photos" ] || { echo "ladder-device: $photos is not a folder of clean photographs" >&2; exit 2; }
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    || { echo "ladder-device: this script is for a GPU" >&2; exit 2; }
# the folder protocol of the CPU ladder, from scratch: AWGN sigma <= 15 against real-like white noise, scored at the end
common=(--task denoise --world natural --real_noise white --sigma_max 15 --start scratch --eval_every 0
        --log_every 100 --photos "$photos")
# seconds per size (the time limit's SIGTERM: a size cut short writes the table and figure of its finished cells):
# the gpu size first (16 M eps_theta), then the paper's (62.6 M; 128 px, the folders' tile size)
timeout 240 python experiments.py ladder --preset gpu --steps 300 --n_syn 1024 --n_real 1024 "${common[@]}" \
    --out "$out/gpu" 2>&1 | tee "$out/gpu.log"
timeout 330 python experiments.py ladder --preset paper --image_size 128 --steps 200 "${common[@]}" \
    --out "$out/paper" 2>&1 | tee "$out/paper.log"
for size in gpu paper; do        # the table and claims each size wrote, also when its time limit cut it short
    echo "== $size"
    cat "$out/$size/ladder.md" 2>/dev/null || echo "no cell finished"
    grep -E "^  (holds|FAILS) " "$out/$size.log"
done
