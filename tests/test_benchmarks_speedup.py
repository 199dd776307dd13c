"""The speed-up benchmarks' reports and variants: processes merged, goals judged, fixed share fitted,
the blocks-first row (benchmarks/speedup.py, benchmarks/speedup_gpu.py)."""
from __future__ import annotations

import os

import pytest
import torch

import secateurs

needs_cifar = pytest.mark.shared_data("cifar10-jpeg.tar.gz")


@pytest.fixture
def block_images(monkeypatch):
    """Random CIFAR-sized images in place of CIFAR-10 for the blocks rows' PLS (no ../shared needed)."""
    from benchmarks import speedup
    from secateurs.data import ArrayDataset

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=gen)
    fake = ArrayDataset("fake", images, torch.arange(200) % 10, [str(c) for c in range(10)])
    monkeypatch.setattr(speedup, "_block_data", lambda x: fake)


def test_speedup_report_merges_processes_and_fits_the_fixed_share(tmp_path):
    """Rows timed in several processes become one (the median, each process's speed-up listed), and
    the share of time no pruning shrinks is recovered from the rows' (MACs kept, speed-up) points."""
    pytest.importorskip("onnxruntime")
    from benchmarks import speedup

    def row(variant, m, s, process):
        return {"model": "net", "input": 32, "variant": variant, "runtime": "eager", "batch": 1, "macs_kept": m,
                "prune_s": 0.1, "dense_ms": 10.0, "pruned_ms": 10 / s, "dense_ci_ms": "9-11", "pruned_ci_ms": "4-6",
                "speedup": s, "speedup_ci": "1-2", "vs_macs": s * m, "slower": False, "repeats": 30, "threads": 2,
                "round_to": 8, "process": process, "latency_target_met": 0.5}

    f = 0.4  # 1 / speed-up = f + (1 - f) m
    rows = [row("macs 50% global", 0.5, 1 / (f + (1 - f) * 0.5) + d, p) for p, d in enumerate((-0.1, 0.0, 0.2))]
    rows.append(row("latency 50% (tables)", 0.1, 1 / (f + (1 - f) * 0.1), 0))
    merged = speedup.merged(rows)
    assert len(merged) == 2 and merged[0]["speedup"] == pytest.approx(1 / 0.7, abs=1e-3)
    assert merged[0]["speedup_ci"].startswith("3 processes: ")
    assert speedup.fixed_share([(r["macs_kept"], r["speedup"]) for r in merged]) == pytest.approx(f, abs=1e-3)
    # a row that removed whole blocks took their fixed costs along: no point of the channels' line
    rows.append(row("macs 50% blocks to 80% then latency-allocated, round_to auto", 0.5, 1.8, 0))
    speedup.write(rows, tmp_path, 30, 2)
    text = (tmp_path / "speedup.md").read_text()
    assert "--processes 3" in text and "| net | eager | 1 | 0.40 | 0.71 | 0.714 | 0.9 |" in text
    # batch 8's channel rows share one MACs point (no line through them): its best rows are still shown
    rows += [{**row("macs 50% global", 0.5, 1.3, 0), "batch": 8},
             {**row("macs 50% blocks to 80% then latency-allocated, round_to auto", 0.5, 1.7, 0), "batch": 8}]
    speedup.write(rows, tmp_path, 30, 2)
    assert "| net | eager | 8 | - | - | 0.65 | 0.85 |" in (tmp_path / "speedup.md").read_text()


def test_speedup_goal_judges_the_issues_models_and_runtimes_and_lists_the_rest(tmp_path):
    """The ratio floors apply to resnet50, vgg16 and mobilenet_v2 in eager and onnxruntime; a 32px
    CIFAR ResNet or a channels-last row below them is listed apart, and a slower model anywhere is named."""
    pytest.importorskip("onnxruntime")
    from benchmarks import speedup

    def row(model, runtime, batch, vs_macs, slower=False):
        return {"model": model, "input": 32, "variant": "macs 50% global", "runtime": runtime, "batch": batch,
                "macs_kept": 0.5, "prune_s": 0.1, "dense_ms": 10.0, "pruned_ms": 5.0, "dense_ci_ms": "9-11",
                "pruned_ci_ms": "4-6", "speedup": 2 * vs_macs, "speedup_ci": "1-2", "vs_macs": vs_macs,
                "slower": slower, "repeats": 30, "threads": 2, "round_to": 8, "cpu": "Timing CPU 9000"}

    rows = [row("torchvision:resnet50", "eager", 8, 0.95), row("torchvision:resnet50", "eager", 1, 0.7),
            row("torchvision:resnet50", "channels_last", 8, 0.6), row("cifar_resnet20", "eager", 1, 0.45, slower=True)]
    speedup.write(rows, tmp_path, 30, 2)
    text = (tmp_path / "speedup.md").read_text()
    judged = next(line for line in text.splitlines() if line.startswith("- The same goal"))
    assert "missed by torchvision:resnet50 eager b1 (0.7, macs 50% global)" in judged and "cifar" not in judged
    assert "channels_last" not in judged and "b8" not in judged
    beyond = next(line for line in text.splitlines() if line.startswith("- Outside"))
    assert "cifar_resnet20 eager b1 (0.45" in beyond and "torchvision:resnet50 channels_last b8 (0.6" in beyond
    assert "measurably slower than dense (its paired speed-up interval below 1 in two timings, the CSV's `timing_speedups`): cifar_resnet20" in text
    assert "` on Timing CPU 9000 (" in text  # where the rows were timed, not where the report is written


def test_gpu_speedup_report_reads_graphed_latency_searches_and_the_launch_cost(tmp_path):
    """An eager row shares the eager layout's prune, so the latency search's ratio (timed on graph
    replays) is reported for the graphed runtimes only; the launch-bound line compares the dense
    model's eager and graphed times at batch 1; a slower pruned row is named."""
    from benchmarks import speedup_gpu

    def row(variant, runtime, batch, dense, pruned, slower=False, **extra):
        return {"model": "net", "input": 224, "variant": variant, "runtime": runtime, "batch": batch, "macs_kept": 0.5,
                "prune_s": 1.0, "dense_ms": dense, "pruned_ms": pruned, "dense_ci_ms": "1-2", "pruned_ci_ms": "1-2",
                "speedup": round(dense / pruned, 3), "speedup_ci": "1-2", "vs_macs": round(dense / pruned / 2, 3),
                "slower": slower, "repeats": 30, "threads": 16, "round_to": 8, "cpu": "x", "device": "GPU 9",
                "torch": "2.x", **extra}

    rows = [row("macs 50% global", "cuda_graph", 1, 1.0, 0.8), row("macs 50% global", "eager", 1, 4.0, 3.9),
            row("macs 50% global", "fp16_channels_last_graph", 8, 1.0, 1.1, slower=True),
            row("latency 50% (tables)", "cuda_graph", 1, 1.0, 0.5, latency_target_met=0.49),
            row("latency 50% (tables)", "eager", 1, 4.0, 3.9, latency_target_met=0.49)]
    speedup_gpu.write(rows, tmp_path)
    text = (tmp_path / "speedup.md").read_text()
    assert "GPU 9, torch 2.x" in text and "net 4.0x its graph replay's" in text
    assert "net cuda_graph 0.49 in 1.0 s." in text and "net eager 0.49" not in text
    assert "net macs 50% global fp16_channels_last_graph b8" in text
    assert "| net | cuda_graph | 1 | macs 50% global | 0.625 | missed (0.8) |" in text


def test_gpu_speedup_never_merges_rows_of_two_devices(tmp_path):
    """Its tables take the median over rows of one (model, variant, runtime, batch): rows of another
    GPU (or the CPU) in the same folder would be pooled as if one machine had timed them."""
    from benchmarks import speedup_gpu
    from benchmarks._protocol import write_rows

    write_rows(tmp_path / "speedup.csv", [{"model": "net", "variant": "macs 50% global", "runtime": "cuda_graph",
                                           "batch": 1, "device": "NVIDIA H200 (CUDA 13.0, cuDNN 91900)"}])
    with pytest.raises(SystemExit, match="holds rows timed on NVIDIA H200 .*, not the CPU: pass another --out"):
        speedup_gpu.main(["--device", "cpu", "--out", str(tmp_path)])
    import torch

    if not torch.cuda.is_available():  # the plain refusal, not a CUDA error from asking a missing GPU its name
        with pytest.raises(SystemExit, match="no CUDA GPU here"):
            speedup_gpu.main(["--out", str(tmp_path)])


def test_speedup_fresh_tables_reach_every_process_and_its_report(tmp_path, monkeypatch):
    """``--fresh-tables``: every process measures on an empty cache of its own (one cached measurement
    shared by all hides how the latency allocation's plan moves with the tables' noise), its rows and
    report say so, a report mixing such rows with others says which, and the environment is restored."""
    pytest.importorskip("onnxruntime")
    from benchmarks import speedup

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "shared"))
    caches = []

    def row(variant, process=0, round_to=16, **kw):
        return {"model": "net", "input": 32, "variant": variant, "runtime": "eager", "batch": 1, "macs_kept": 0.5,
                "prune_s": 0.1, "dense_ms": 10.0, "pruned_ms": 6.0, "dense_ci_ms": "9-11", "pruned_ci_ms": "5-7",
                "speedup": 1.6, "speedup_ci": "1.5-1.7", "vs_macs": 0.8, "slower": False, "repeats": 30, "threads": 2,
                "round_to": round_to, "cpu": "CPU", "process": process, **kw}

    def fake_run(models, variants, repeats, threads, rows, runtimes, out, tags=None):  # what the timing would add
        caches.append(os.environ["SECATEURS_CACHE"])
        assert not tags or not os.listdir(caches[-1])  # fresh: empty
        note = {"model": "net", "input": 32, "variant": "latency 50% (tables)", "runtime": "-", "batch": "-",
                "note": "no plan met a latency target of 0.5"}  # timed nothing, so measured no tables either
        return rows + [row("macs 50% latency-allocated, round_to auto", **(tags or {}))] + ([note] if tags else [])

    monkeypatch.setattr(speedup, "run", fake_run)
    speedup.main(["--fresh-tables", "--models", "net", "--out", str(tmp_path)])
    assert caches[0] != str(tmp_path / "shared") and not os.path.exists(caches[0])  # removed after the run
    assert os.environ["SECATEURS_CACHE"] == str(tmp_path / "shared")
    text = (tmp_path / "speedup.md").read_text()
    assert "--fresh-tables` on CPU" in text and "Each process measured its own latency tables" in text
    speedup.main(["--resume", "--models", "net", "--out", str(tmp_path)])  # a row of a shared cache joins it
    text = (tmp_path / "speedup.md").read_text()
    assert "--fresh-tables` on" not in text and "1 of 2 rows (macs 50% latency-allocated, round_to auto) were timed" in text
    rows = [row("macs 50% global", p, round_to=step) for p, step in enumerate((8, 16, 8))]
    assert speedup.merged(rows)[0]["round_to"] == "8/16/8"  # auto measured apart in each process: all shown
    cmds = []
    monkeypatch.setattr(speedup.subprocess, "run", lambda cmd, **kw: cmds.append(cmd))
    monkeypatch.setattr(speedup, "read_rows", lambda path: [])
    monkeypatch.setattr(speedup, "write", lambda *a: None)
    speedup.main(["--fresh-tables", "--processes", "2", "--models", "net", "--out", str(tmp_path)])
    assert len(cmds) == 2 and all("--fresh-tables" in c and "--processes" not in c for c in cmds)


def test_speedup_blocks_variant_removes_blocks_then_channels_to_the_dense_models_macs_target(block_images, monkeypatch):
    """The blocks-first row: residual blocks go (PLS-VIP on images resized to the input) to 80% of the
    MACs, then channels to 50% of the *dense* model's MACs, and its MACs kept is read against the
    dense model like every other row's (the second prune alone reports ~0.62 of what it was given)."""
    from benchmarks import speedup
    from secateurs.depth import find_blocks

    variant = "macs 50% blocks to 80% then latency-allocated, round_to auto"
    spec = {**speedup.VARIANTS[variant], "allocation": "global", "round_to": 8}  # no timing tables in a test
    monkeypatch.setitem(speedup.VARIANTS, variant, spec)
    base, x = speedup.seeded_model("cifar_resnet20", 32)
    model, report, _ = speedup._prune(base, x, variant, threads=1)
    dense = secateurs.count(base, x).macs
    assert 0.7 < report["blocks_macs_kept"] <= 0.8  # the blocks step alone
    assert secateurs.count(model, x).macs / dense == pytest.approx(0.5, abs=0.02)
    assert report["kept"]["macs"] == pytest.approx(secateurs.count(model, x).macs / dense)
    assert len(find_blocks(model, x)) < len(find_blocks(base, x)) and model(x).shape == (1, 10)
    vgg = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    with pytest.raises(secateurs.PruningError, match="no residual block"):  # no row named blocks without one
        speedup._prune(vgg, x, variant, threads=1)


@needs_cifar
def test_speedup_block_data_is_cifar_resized_to_the_input():
    from benchmarks import speedup

    images = speedup._block_data(torch.zeros(1, 3, 48, 40)).images
    assert images.shape == (10 * speedup.BLOCK_IMAGES, 3, 48, 40) and images.dtype == torch.uint8


def test_speedup_blocks_variant_without_a_block_kept_per_stage_goes_deeper_than_the_default(block_images, monkeypatch):
    """The min_per_stage 0 row reaches the dlp call: with the same block budget, dlp's default keeps
    one removable block in every stage (cifar_resnet20: 4 of its 7 can go), the row may empty a stage."""
    from benchmarks import speedup
    from secateurs.depth import find_blocks

    base, x = speedup.seeded_model("cifar_resnet20", 32)
    left = {}
    for variant in ("macs 50% blocks to 80% then latency-allocated, round_to auto",
                    "macs 50% blocks to 70% (min_per_stage 0) then latency-allocated, round_to auto"):
        spec = {**speedup.VARIANTS[variant], "allocation": "global", "round_to": 8, "blocks": 0.3,
                "target": {"macs": 0.25}}
        monkeypatch.setitem(speedup.VARIANTS, variant, spec)
        model, report, _ = speedup._prune(base, x, variant, threads=1)
        left[variant] = (report["blocks_macs_kept"], len(find_blocks(model, x)))
        assert model(x).shape == (1, 10)
    (default, n_default), (emptied, n_emptied) = left.values()
    assert default > 0.45 and emptied <= 0.35 and n_emptied < n_default
