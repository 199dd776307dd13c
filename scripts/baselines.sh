#!/usr/bin/env bash
# The CIFAR-10 (JPEG) baselines the accuracy protocol prunes (issue 18), trained on this CPU.
# Resumable: rerun after any interruption and each run continues from its last finished epoch.
#   bash scripts/baselines.sh r20        # ResNet-20, 45-100 s an epoch on 2 quiet cores (by machine)
#   bash scripts/baselines.sh r56        # ResNet-56, about 3x that
#   THREADS=1 bash scripts/baselines.sh r56 &  THREADS=1 bash scripts/baselines.sh r20   # both at once: r20's
#       stage 4 distils from r56 and refuses it unfinished, so rerun r20 once r56 has ended
# runs/baselines/ is tracked by git (the rest of runs/ is not): commit its checkpoint.pt + log.csv before a
# session ends, so the next checkout resumes there. Untracked, each session's progress was lost with
# its checkout and ResNet-20 restarted from epoch 0.
# Recipe: the training set less the 5,000-image held-out split (never trained on: tolerances and
# searches read it), SGD Nesterov, wd 5e-4, batch 128, pad-4 crop + flip, channels-last, seed 0, in two
# stages (below); top-1 on the full test set every epoch (each stage's log.csv).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    r20) model=cifar_resnet20; first=(--epochs "${EPOCHS:-50}") ;;
    # ResNet-56 learns from ResNet-20's stages: cutout from the start, one long cycle, no later stages
    r56) model=cifar_resnet56; first=(--epochs "${EPOCHS:-120}" --cutout 16); STAGE2_EPOCHS=0; STAGE3_EPOCHS=0; STAGE4_EPOCHS=0; STAGE5_EPOCHS=0 ;;
    *) echo "usage: $0 r20|r56" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS="${THREADS:-2}"
train() { .venv/bin/python -m secateurs.cli train --model "$model" --data cifar10 --holdout 5000 --batch-size 128 \
    --weight-decay 5e-4 --channels-last --seed 0 --quiet --resume "$@"; }
# stage 1: 1 warm-up epoch then cosine from lr 0.1 (ResNet-20: 50 epochs; ResNet-56: 120 with cutout)
train "${first[@]}" --lr 0.1 --warmup-epochs 1 --out "runs/baselines/$1"
# stage 2 (a second cosine cycle from stage 1's weights, lr 0.05): stage 1 left ResNet-20 at 86.9% top-1 on
# this JPEG copy, short of the 90% the accuracy protocol wants; stage 2 reached 87.7% (over-fitting:
# training loss 0.03), so the next stage needs regularisation, not epochs; STAGE2_EPOCHS=0 skips it
if [ "${STAGE2_EPOCHS:-100}" -gt 0 ]; then
    train --epochs "${STAGE2_EPOCHS:-100}" --lr 0.05 --init-from "runs/baselines/$1" --out "runs/baselines/$1-stage2"
fi
# stage 3: the regularisation stage 2 lacked, cutout 16 (DeVries & Taylor 2017), a third cosine cycle from
# stage 2's weights; STAGE3_EPOCHS=0 skips it
if [ "${STAGE3_EPOCHS:-60}" -gt 0 ]; then
    train --epochs "${STAGE3_EPOCHS:-60}" --lr 0.05 --cutout 16 --init-from "runs/baselines/$1-stage2" \
        --out "runs/baselines/$1-stage3"
fi
# stage 4: stage 3 left ResNet-20 at 88.93%, still short of 90%: a fourth cosine cycle from its weights that
# distils from the trained ResNet-56 (91.16%, run `r56` first) with cutout, loss 0.1 CE + 0.9 T^2 KL at T 4
# (the usual CIFAR setting of Hinton-style distillation): 89.80%, still 0.2 short; STAGE4_EPOCHS=0 skips it
if [ "${STAGE4_EPOCHS:-40}" -gt 0 ]; then
    train --epochs "${STAGE4_EPOCHS:-40}" --lr 0.05 --cutout 16 --init-from "runs/baselines/$1-stage3" \
        --teacher runs/baselines/r56 --teacher-model cifar_resnet56 --distill 0.9 --distill-temperature 4 \
        --out "runs/baselines/$1-stage4"
fi
# stage 5: a longer distillation cycle from stage 4's weights (stage 4's gain, +0.9, had not shrunk like the
# plain cycles'); STAGE5_EPOCHS=0 skips it
if [ "${STAGE5_EPOCHS:-60}" -gt 0 ]; then
    train --epochs "${STAGE5_EPOCHS:-60}" --lr 0.05 --cutout 16 --init-from "runs/baselines/$1-stage4" \
        --teacher runs/baselines/r56 --teacher-model cifar_resnet56 --distill 0.9 --distill-temperature 4 \
        --out "runs/baselines/$1-stage5"
fi
