#!/usr/bin/env bash
# The device checks of issue 19 on a lent CUDA GPU, in one call (device time is scarce: ~15 min a task).
#   bash scripts/gpu_run.sh prepare   # HERE: a git-ignored .gpu/ with a 5k/2k CIFAR-10 subset (../shared does not travel)
#   bash scripts/gpu_run.sh run       # THERE (the device tool, carry [".gpu"]): CUDA tests, benchmarks.speedup_gpu
#                                     # going on from docs/speedup_gpu/speedup.csv, the CLI's prune + fine-tune on CUDA
# Environment for `run`: SPEEDUP_S (the benchmark's hard limit, s), DEADLINE_MIN (no new prune after), MODELS.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    prepare)
        grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
        tmp=$(mktemp -d); tar xzf ../shared/data/cifar10-jpeg.tar.gz -C "$tmp"
        python3 - "$tmp" <<'PY'
import os, sys
root = sys.argv[1]
for split, keep in (("train", 500), ("test", 200)):  # per class
    for c in sorted(os.listdir(f"{root}/{split}")):
        for f in sorted(os.listdir(f"{root}/{split}/{c}"))[keep:]:
            os.remove(f"{root}/{split}/{c}/{f}")
PY
        mkdir -p .gpu/data .gpu/speedup_gpu && tar czf .gpu/data/cifar10-jpeg.tar.gz -C "$tmp" train test && rm -rf "$tmp"
        cp docs/speedup_gpu/speedup.csv .gpu/speedup_gpu/ && du -sh .gpu ;;
    run)
        export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SECATEURS_DATA=$PWD/.gpu/data SECATEURS_CACHE=/tmp/sc
        out=${OUT:-/tmp/gpu_out}; mkdir -p "$out/speedup_gpu"
        nvidia-smi -L
        timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_latency_cuda.py > "$out/pytest_cuda.log" 2>&1
        echo "pytest rc=$?"; grep -v "^    \|^$" "$out/pytest_cuda.log" | tail -12
        cp .gpu/speedup_gpu/speedup.csv "$out/speedup_gpu/" 2>/dev/null
        timeout "${SPEEDUP_S:-300}" python3 -m benchmarks.speedup_gpu --deadline-min "${DEADLINE_MIN:-3.5}" \
            ${MODELS:+--models $MODELS} --out "$out/speedup_gpu" > "$out/speedup_gpu.log" 2>&1
        echo "speedup rc=$?"; grep -v '^model=' "$out/speedup_gpu.log" | tail -12; grep -c '^model=' "$out/speedup_gpu.log"
        timeout 90 python3 -m secateurs.cli prune --pretrained cifar_resnet20_cifar10 --data cifar10 --macs 0.5 \
            --round-to 8 --finetune-epochs 1 --subset 5000 --val-subset 2000 --out /tmp/cli > "$out/cli.log" 2>&1
        echo "cli rc=$?"; tail -12 "$out/cli.log" ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
