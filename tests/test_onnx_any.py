"""ONNX export of any model the engine prunes: nested outputs, library models (ultralytics YOLO,
timm, smp) pruned then exported with the onnxruntime parity check at batch 1 and 2, and failures
that name the exporter, the model class, the operation and the module."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs.export import export_onnx
from secateurs.models import create_model

pytest.importorskip("onnxruntime")


class Kth(nn.Module):  # aten::kthvalue has no ONNX symbolic
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=1)[0]


class Untraceable(nn.Module):
    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("this block refuses to be traced")
        return x


class Net(nn.Module):
    """Outputs nested as dict -> list -> tuple, with a None the exporters drop."""

    def __init__(self, inner: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)
        self.side = nn.Sequential(nn.Identity(), inner or nn.Identity())

    def forward(self, x):
        h = self.head(self.body(self.conv(x)))
        return {"logits": h, "aux": [h.mean((2, 3)), None, (h * 2, {"z": self.side(h)})]}


def test_nested_outputs_export_with_the_parity_check(tmp_path):
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(1, 3, 16, 16)
    secateurs.prune(m, x, target={"ratio": 0.5})
    assert m.conv.out_channels == 4
    res = export_onnx(m, x, tmp_path / "n.onnx")
    assert res["exporter"] == "torchscript" and res["max_rel_diff"] < 1e-5
    import onnx

    assert len(onnx.load(str(tmp_path / "n.onnx")).graph.output) == 4  # None dropped, everything else flattened


@pytest.mark.parametrize("inner,where", [(Kth(), "at operation 'aten::kthvalue' in module 'side.1' \\(Kth\\)"),
                                         (Untraceable(), "in module 'side.1' \\(Untraceable\\): RuntimeError: this block")])
def test_a_failed_export_names_the_operation_and_the_module(tmp_path, inner, where):
    with pytest.raises(RuntimeError, match=f"ONNX export of Net failed in the TorchScript exporter {where}"):
        export_onnx(Net(inner), torch.randn(1, 3, 8, 8), tmp_path / "f.onnx", dynamo=False)
    if importlib.util.find_spec("onnxscript") is None:  # the fallback cannot run: say so, keep the first error
        with pytest.raises(RuntimeError, match="aten::kthvalue.*the torch.export exporter was not tried: it needs onnxscript"):
            export_onnx(Net(Kth()), torch.randn(1, 3, 8, 8), tmp_path / "f.onnx")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the int() is the point of the test
def test_a_batch_baked_into_the_graph_fails_the_dynamic_batch_check(tmp_path):
    class Baked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):  # int() makes the batch a constant of the traced graph
            return self.conv(x) * torch.arange(1, int(x.shape[0]) + 1.0).view(-1, 1, 1, 1)

    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="at batch 2 \\(pass dynamic_batch=False for a fixed batch\\)"):
        export_onnx(Baked(), x, tmp_path / "b.onnx")
    assert export_onnx(Baked(), x, tmp_path / "b.onnx", dynamic_batch=False)["max_rel_diff"] < 1e-5


def _pruned_export(tmp_path, name: str, size: int, **kwargs) -> dict:
    lib = {"timm": "timm", "smp": "segmentation_models_pytorch", "ultralytics": "ultralytics"}[name.partition(":")[0]]
    pytest.importorskip(lib)
    torch.manual_seed(0)
    m = create_model(name, **kwargs)
    x = torch.randn(1, 3, size, size)
    before = secateurs.count(m, x).macs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secateurs.prune(m, x, target={"ratio": 0.3})
    assert secateurs.count(m, x).macs < 0.9 * before
    res = export_onnx(m, x, tmp_path / "m.onnx")
    assert res["exporter"] == "torchscript" and res["max_rel_diff"] < 1e-4, res
    return res


def test_pruned_yolo_exports(tmp_path):
    _pruned_export(tmp_path, "ultralytics:yolov8n.yaml", 128)


HEAVY = [("ultralytics:yolov8n.yaml", 320, {}), ("ultralytics:yolo11n-seg.yaml", 160, {}),
         ("ultralytics:yolov8n-pose.yaml", 160, {}), ("timm:efficientnet_b0", 96, {}), ("timm:convnext_femto", 64, {}),
         ("timm:mixnet_m", 64, {}), ("smp:Unet:resnet18", 64, {"classes": 2}),
         ("smp:DeepLabV3Plus:mobilenet_v2", 64, {"classes": 3})]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,kwargs", HEAVY, ids=[h[0] for h in HEAVY])
def test_pruned_library_models_export(tmp_path, name, size, kwargs):
    _pruned_export(tmp_path, name, size, **kwargs)
