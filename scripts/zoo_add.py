"""Add a finished training run to secateurs/zoo/ (package data): weights as safetensors, an entry in
secateurs/zoo/manifest.json.

    python scripts/zoo_add.py NAME RUN_DIR --model cifar_resnet20 --dataset "CIFAR-10 (JPEG)" \\
        --recipe "secateurs train ..." [--kwargs '{"num_classes": 10}']
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ZOO = Path(__file__).resolve().parents[1] / "secateurs" / "zoo"  # shipped inside the package


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("run_dir")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--kwargs", default="{}")
    p.add_argument("--epochs", type=int, default=None, help="all stages' epochs, when RUN_DIR is a later stage")
    a = p.parse_args()
    state = torch.load(Path(a.run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)
    ZOO.mkdir(exist_ok=True)
    path = ZOO / f"{a.name}.safetensors"
    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(path))
    last = state["history"][-1]
    manifest_path = ZOO / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[a.name] = {
        "model": a.model, "kwargs": json.loads(a.kwargs), "file": path.name, "dataset": a.dataset,
        "epochs": a.epochs or state["epoch"], "recipe": a.recipe,
        "metrics": {k: round(v, 2) for k, v in last.items() if k.startswith("val_")},
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest[a.name], indent=2))


if __name__ == "__main__":
    main()
