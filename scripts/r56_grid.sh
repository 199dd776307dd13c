#!/usr/bin/env bash
# The rest of issue 18's ResNet-56 work as one resumable command: finish the baseline, put it in the
# zoo (once), then run its accuracy grid. Rerun it after any interruption; each stage goes on where it
# stopped (the baseline from its last epoch, the grid from its next row).
#   bash scripts/r56_grid.sh
# Commit runs/baselines/r56 (and, once promoted, secateurs/zoo/) and docs/accuracy.csv before a session
# ends: a session's background jobs die with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/baselines.sh r56  # returns at once when all its epochs are done
recipe="bash scripts/baselines.sh r56: secateurs train --model cifar_resnet56 --data cifar10 --holdout 5000 \
--batch-size 128 --weight-decay 5e-4 --channels-last --seed 0 --epochs 120 --lr 0.1 --warmup-epochs 1 --cutout 16 \
(one cosine cycle, 1 warm-up epoch)"
if ! grep -q "baselines.sh r56" secateurs/zoo/manifest.json; then
    .venv/bin/python scripts/zoo_add.py cifar_resnet56_cifar10 runs/baselines/r56 --model cifar_resnet56 \
        --dataset "CIFAR-10 (JPEG), 45,000 training images (the 5,000-image held-out split excluded) / 10,000 test" \
        --recipe "$recipe" --kwargs '{"num_classes": 10, "in_chans": 3}'
fi
bash scripts/accuracy_grid.sh r56
