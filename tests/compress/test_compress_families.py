"""Beyond classifiers: one segmentation, one detection, one timm model and a ViT through every per-layer method.

Each (method, model) pair is planned, applied and exported at a small input size (64×64; the ViT 32×32),
with ONNX Runtime parity over every named output. Dilated (atrous) convs are checked at full rank.
Random weights are re-initialised (Kaiming, fan-in) so activations do not vanish through the untrained
networks: SSDlite's own initialisation gives outputs of order 1e-21, which would make parity vacuous.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from compress.factorizations import FACTORIZATIONS
from compress.methods import get_method
from compress.metrics import count_params
from compress.models import load_model
from compress.plan import LayerPlan
from compress.task_models import DetectionHeadOutputs, SegmentationOutputs

METHODS = ("tucker2", "svd", "tai", "cp")
RATIO = 1.5


def _lively_(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan-in) conv/Linear weights and unit BN statistics: activations keep their scale."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, std=math.sqrt(1.0 / fan_in))
    return model.eval()


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )


def _family(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "vit":
        return _lively_(_tiny_vit()), (2, 3, 32, 32)
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    loaded = load_model(name, "random", input_size=64)
    return _lively_(loaded.model), (2, *loaded.input_shape)


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


FAMILIES = ("lraspp_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large", "timm:test_efficientnet", "vit")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method_name", METHODS)
def test_family_plan_apply_export(family: str, method_name: str) -> None:
    pytest.importorskip("onnxruntime")
    from export.onnx import onnx_from_torch
    from export.parity import check_onnx_parity

    model, shape = _family(family)
    x = torch.randn(*shape)
    dense_params = count_params(model)
    method = get_method(method_name)
    plan = method.compress_(model, method.config_type(method=method_name, ratio=RATIO), x)
    assert plan.factorized_layers
    assert plan.target["achieved_ratio"] == pytest.approx(RATIO, rel=0.05)
    assert count_params(model) == plan.totals["params_after"]
    assert dense_params == plan.totals["params_before"]
    assert not any("not reached" in (e.reason or "") for e in plan.layers)
    proto = onnx_from_torch(model, x)
    names = [o.name for o in proto.graph.output]
    assert names == list(getattr(model, "output_names", ["output"]))
    result = check_onnx_parity(model, proto, input_shape=shape, atol=1e-3, rtol=1e-3)
    assert result.passed
    assert result.rel_l2 < 1e-5
    assert result.n_elements == 2 * sum(o.numel() for o in _outputs(model, torch.zeros(shape)))  # 2 batches


@pytest.mark.parametrize("family", ["deeplabv3_mobilenet_v3_large", *FAMILIES[:2], "vit"])
@pytest.mark.parametrize("method_name", ["tucker2", "svd", "tai"])
def test_full_rank_reproduces_every_family(family: str, method_name: str) -> None:
    """Full-rank factors reproduce the network: stride, padding and dilation (ASPP's atrous convs) carried over."""
    model, shape = _family(family)
    x = torch.randn(*shape)
    ref = _outputs(model, x)
    method = get_method(method_name)
    plan = method.plan(model, method.config_type(method=method_name, ratio=1.2, min_share=0.0), x)
    for entry in plan.factorized_layers:
        fact = FACTORIZATIONS[entry.action]()
        entry.ranks = list(fact.max_ranks(_module_like(entry)))
    dilated = [e for e in plan.factorized_layers if _dilation(model, e.path) != (1, 1)]
    if family.startswith("deeplab"):
        assert dilated, "deeplabv3's ASPP atrous convs should be factorized"
    method.apply_(model, plan)
    for a, b in zip(_outputs(model, x), ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=1e-3)


def _module_like(entry: LayerPlan) -> nn.Module:
    shape = entry.shape
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0], device="meta")
    return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), device="meta")


def _dilation(model: nn.Module, path: str) -> tuple[int, int]:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return (1, 1)
    return tuple(getattr(module, "dilation", (1, 1)))  # type: ignore[return-value]


def test_grouped_convs_are_kept_with_a_reason() -> None:
    model, shape = _family("lraspp_mobilenet_v3_large")
    method = get_method("tucker2")
    plan = method.plan(model, method.config_type(method="tucker2", ratio=RATIO), torch.randn(*shape))
    depthwise = [e for e in plan.layers if "groups=" in (e.reason or "")]
    assert depthwise
    assert all(e.action == "keep" for e in depthwise)


@pytest.mark.parametrize(
    ("name", "size", "outputs"),
    [
        ("lraspp_mobilenet_v3_large", 520, ("out",)),
        ("deeplabv3_resnet50", 520, ("out",)),
        ("fcn_resnet50", 520, ("out",)),
        ("ssdlite320_mobilenet_v3_large", 320, ("cls_logits", "bbox_regression")),
        ("retinanet_resnet50_fpn", 800, ("cls_logits", "bbox_regression")),
        ("fasterrcnn_mobilenet_v3_large_fpn", 800, ("objectness", "rpn_bbox_deltas")),
    ],
)
def test_task_models_by_name(name: str, size: int, outputs: tuple[str, ...]) -> None:
    """Built without downloads (no backbone weights either); input size from the weights' metadata."""
    loaded = load_model(name, "random")
    assert loaded.input_shape == (3, size, size)
    assert loaded.output_names == outputs
    assert loaded.task == ("segmentation" if outputs == ("out",) else "detection")
    assert isinstance(loaded.model, SegmentationOutputs if loaded.task == "segmentation" else DetectionHeadOutputs)
    got = _outputs(loaded.model, torch.randn(1, 3, 64, 64))
    assert len(got) == len(outputs)
    assert all(t.shape[0] == 1 for t in got)


def test_task_model_weights_file_takes_a_plain_torchvision_state_dict(tmp_path: Path) -> None:
    loaded = load_model("lraspp_mobilenet_v3_large", "random", seed=1)
    path = tmp_path / "lraspp.pt"
    torch.save(loaded.model.model.state_dict(), path)  # keys without the wrapper's "model." prefix
    again = load_model("lraspp_mobilenet_v3_large", str(path), seed=2)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_outputs(again.model, x)[0], _outputs(loaded.model, x)[0])


def test_detector_keeps_python_postprocessing() -> None:
    loaded = load_model("ssdlite320_mobilenet_v3_large", "random")
    with torch.no_grad():
        detections = loaded.model.detector([torch.rand(3, 96, 128)])
    assert set(detections[0]) == {"boxes", "scores", "labels"}


def test_timm_model_by_name_and_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    loaded = load_model("timm:test_efficientnet", "random")
    assert loaded.input_shape[0] == 3
    assert loaded.warning is None
    auto = load_model("timm:test_efficientnet", "auto")
    assert "RANDOM WEIGHTS" in (auto.warning or "")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": loaded.model.state_dict(), "epoch": 3}, path)  # a timm training checkpoint
    again = load_model("timm:test_efficientnet", str(path), seed=5)
    x = torch.randn(1, *loaded.input_shape)
    torch.testing.assert_close(_outputs(again.model, x)[0], _outputs(loaded.model, x)[0])


def test_timm_refuses_downloads_and_unknown_names() -> None:
    pytest.importorskip("timm")
    from lowrank_deploy.errors import UserInputError

    with pytest.raises(UserInputError, match="never downloaded"):
        load_model("timm:resnet18", "imagenet")
    with pytest.raises(UserInputError, match="unknown timm model"):
        load_model("timm:resnet_does_not_exist", "random")


def test_copy_of_wrapper_is_independent() -> None:
    loaded = load_model("lraspp_mobilenet_v3_large", "random")
    clone = copy.deepcopy(loaded.model)
    assert clone.output_names == loaded.model.output_names
