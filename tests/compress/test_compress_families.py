"""Beyond classifiers: one segmentation, one detection, one timm model and a ViT through every per-layer method.

Each (method, model) pair is planned, applied and exported at a small input size (64×64; the ViT 32×32),
with ONNX Runtime parity over every named output. Dilated (atrous) convs are checked at full rank.
Random weights are re-initialised (Kaiming, fan-in) so activations do not vanish through the untrained
networks: SSDlite's own initialisation gives outputs of order 1e-21, which would make parity vacuous.
"""

from __future__ import annotations

import copy
import json
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
# The spatial factorizations (Tai, CP) on the two MobileNetV3 families take a minute or more each on 2 cores:
# `make test-all` runs them; `make test` keeps Tucker-2 and SVD on every family and every method on the others.
SLOW_PAIRS = {(m, f) for m in ("tai", "cp") for f in FAMILIES[:2]} | {("tucker2", "deeplabv3_mobilenet_v3_large")}
SLOW_PAIRS |= {("tai", "deeplabv3_mobilenet_v3_large")}


def _pairs(methods: tuple[str, ...], families: tuple[str, ...] | list[str]) -> list[object]:
    return [
        pytest.param(m, f, id=f"{m}-{f}", marks=[pytest.mark.slow] if (m, f) in SLOW_PAIRS else [])
        for m in methods
        for f in families
    ]


@pytest.mark.parametrize(("method_name", "family"), _pairs(METHODS, FAMILIES))
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


@pytest.mark.parametrize(
    ("method_name", "family"), _pairs(("tucker2", "svd", "tai"), ["deeplabv3_mobilenet_v3_large", *FAMILIES[:2], "vit"])
)
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
    from lowrank_core.errors import UserInputError

    with pytest.raises(UserInputError, match="never downloaded"):
        load_model("timm:resnet18", "imagenet")
    with pytest.raises(UserInputError, match="unknown timm model"):
        load_model("timm:resnet_does_not_exist", "random")


def test_copy_of_wrapper_is_independent() -> None:
    loaded = load_model("lraspp_mobilenet_v3_large", "random")
    clone = copy.deepcopy(loaded.model)
    assert clone.output_names == loaded.model.output_names


# jsvd / lrsd / cc on the new families -------------------------------------------------------------------


def _randomize_bn_(model: nn.Module) -> nn.Module:
    """BN scales in [0.5, 1.5): timm zero-initialises each block's last BN, which zeroes cc's conv gradients."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model


def _labelled_batches(shape: tuple[int, ...], n_batches: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Tiny calibration data: ``(images, labels)`` batches of 4, seeded (the shape a CalibrationLoader yields)."""
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, *shape[1:], generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(n_batches)
    ]


JOINT_CASES = [
    # (method, family, config options, with calibration data)
    ("ljsvd", "ssdlite320_mobilenet_v3_large", {"ratio": RATIO}, False),
    ("bijsvd", "ssdlite320_mobilenet_v3_large", {"ratio": RATIO}, False),
    (
        "lrsd",
        "timm:test_resnet",
        {"ratio": RATIO, "split": "fixed", "calibration_samples": 8, "iters": 5, "godec_iters": 5, "cg_iters": 10},
        True,
    ),
    ("cc", "timm:test_resnet", {"flops": 0.3, "calibration_samples": 8}, True),
]


@pytest.mark.parametrize(("method_name", "family", "options", "with_data"), JOINT_CASES)
def test_paper_methods_on_new_families(method_name: str, family: str, options: dict, with_data: bool) -> None:
    """Plan + apply through the registry, the saved plan rebuilds the same network, ONNX parity on every output."""
    pytest.importorskip("onnxruntime")
    from export.onnx import onnx_from_torch
    from export.parity import check_onnx_parity

    dense, shape = _family(family)
    if method_name == "cc":
        _randomize_bn_(dense)
    x = torch.randn(*shape)
    data = _labelled_batches(shape) if with_data else None
    method = get_method(method_name)
    model = copy.deepcopy(dense)
    plan = method.compress_(model, method.config_type(method=method_name, **options), x, data=data)
    assert plan.factorized_layers
    if with_data:  # the data-driven fit, not the weight-only fallback
        assert not [w for w in plan.warnings if "no calibration data" in w]
    if "ratio" in options:
        assert plan.target["achieved_ratio"] == pytest.approx(options["ratio"], rel=0.05)
    else:
        assert plan.target["achieved_flops_reduction"] == pytest.approx(options["flops"], abs=0.02)
    assert plan.totals["params_after"] < plan.totals["params_before"] == count_params(dense)
    if method_name != "lrsd":  # LRSD's sparse branch runs as a dense conv with zeros (its values are counted)
        assert count_params(model) < count_params(dense)

    rebuilt = method.rebuild_(copy.deepcopy(dense), plan, data=data)  # `compress apply --plan`
    assert count_params(rebuilt) == count_params(model)
    for a, b in zip(_outputs(rebuilt.eval(), x), _outputs(model, x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()) + 1e-7, rtol=1e-4)

    proto = onnx_from_torch(model, x)
    names = [o.name for o in proto.graph.output]
    assert names == list(getattr(model, "output_names", ["output"]))
    result = check_onnx_parity(model, proto, input_shape=shape, atol=1e-3, rtol=1e-3)
    assert result.passed
    assert result.rel_l2 < 1e-5
    assert list(result.outputs or {}) == names
    assert all(r["passed"] and r["rel_l2"] < 1e-5 for r in (result.outputs or {}).values())


@pytest.mark.parametrize(
    ("method_name", "family", "options", "reason"),
    [
        ("ljsvd", "timm:test_resnet", {"ratio": RATIO}, "no conv inside repeated blocks passes the rules"),
        ("ljsvd", "lraspp_mobilenet_v3_large", {"ratio": RATIO}, r"RATIO=1.5 is out of reach for ljsvd .*achievable"),
    ],
)
def test_joint_svd_refuses_families_without_repeated_blocks(
    method_name: str, family: str, options: dict, reason: str
) -> None:
    from lowrank_core.errors import CompressionError

    model, shape = _family(family)
    method = get_method(method_name)
    with pytest.raises(CompressionError, match=reason) as info:
        method.compress_(model, method.config_type(method=method_name, **options), torch.randn(*shape))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["lraspp_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large"])
def test_cc_with_labels_refuses_segmentation_and_detection_in_one_line(family: str) -> None:
    """The cc method's gradient sensitivities need class logits; without data cc still runs (weight-only)."""
    from lowrank_core.errors import UserInputError

    model, shape = _family(family)
    method = get_method("cc")
    config = method.config_type(method="cc", flops=0.3, calibration_samples=8)
    with pytest.raises(UserInputError, match=r"need a classifier's \(N, classes\) logits.*run cc without data") as info:
        method.compress_(model, config, torch.randn(*shape), data=_labelled_batches(shape))
    assert "\n" not in str(info.value)


def test_data_is_refused_for_segmentation_and_detection_before_loading() -> None:
    from compress.task_models import check_data_supported
    from lowrank_core.errors import UserInputError

    check_data_supported("resnet18", "fashion-mnist")
    check_data_supported("timm:test_resnet", "fashion-mnist")
    for name in ("lraspp_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large"):
        with pytest.raises(UserInputError, match="no masks or boxes in the data"):
            check_data_supported(name, "fashion-mnist")


# Segmentation checkpoints with an auxiliary classifier ---------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True])
def test_segmentation_checkpoint_with_aux_classifier_loads_with_its_head(tmp_path: Path, wrapped: bool) -> None:
    """A state_dict saved from ``aux_loss=True`` builds the aux head: outputs ``out`` and ``aux``, both exact."""
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.get_model(
        "deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None, aux_loss=True
    ).eval()
    state = SegmentationOutputs(reference).state_dict() if wrapped else reference.state_dict()
    assert any(k.startswith(("aux_classifier.", "model.aux_classifier.")) for k in state)
    path = tmp_path / "deeplab_aux.pth"
    torch.save(state, path)
    loaded = load_model("deeplabv3_mobilenet_v3_large", str(path), input_size=64)
    assert loaded.output_names == ("out", "aux")
    assert loaded.weights == str(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
    out, aux = _outputs(loaded.model, x)
    torch.testing.assert_close(out, expected["out"])
    torch.testing.assert_close(aux, expected["aux"])
    plain = load_model("deeplabv3_mobilenet_v3_large", "random", input_size=64)
    assert plain.output_names == ("out",)


def test_aux_classifier_weights_for_a_model_without_one_are_refused(tmp_path: Path) -> None:
    from lowrank_core.errors import UserInputError

    loaded = load_model("lraspp_mobilenet_v3_large", "random")
    state = {**loaded.model.model.state_dict(), "aux_classifier.0.weight": torch.ones(2, 2, 1, 1)}
    path = tmp_path / "lraspp_aux.pth"
    torch.save(state, path)
    with pytest.raises(UserInputError, match="has no auxiliary classifier"):
        load_model("lraspp_mobilenet_v3_large", str(path))


def test_run_directory_with_aux_head_reloads(tmp_path: Path) -> None:
    """``compress run``, then load_run (what ``export onnx`` reads) rebuilds the aux head from the saved weights."""
    import torchvision

    from compress.artifacts import load_run
    from compress.cli import main as compress_main

    torch.manual_seed(4)
    reference = torchvision.models.get_model(
        "deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None, aux_loss=True
    )
    path = tmp_path / "deeplab_aux.pth"
    torch.save(reference.state_dict(), path)
    run_dir = tmp_path / "run"
    argv = ["run", "--model", "deeplabv3_mobilenet_v3_large", "--method", "svd", "--ratio", "1.5"]
    assert compress_main([*argv, "--weights", str(path), "--input-size", "64", "--run-dir", str(run_dir)]) == 0
    info = json.loads((run_dir / "compress.json").read_text())
    assert info["task"] == "segmentation"
    assert info["output_names"] == ["out", "aux"]
    run = load_run(run_dir)
    assert run.dense.output_names == run.compressed.output_names == ("out", "aux")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()(x)
    torch.testing.assert_close(_outputs(run.dense, x)[1], expected["aux"])


class _TwoHeads(nn.Module):
    output_names = ("cls_logits", "bbox_regression")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cls = nn.Conv2d(3, 4, 3, padding=1)
        self.box = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls(x), self.box(x)


def test_parity_reports_every_named_output_and_names_the_failing_one() -> None:
    pytest.importorskip("onnxruntime")
    from export.onnx import onnx_from_torch
    from export.parity import check_onnx_parity
    from lowrank_core.errors import ParityError

    model = _TwoHeads().eval()
    shape = (1, 3, 8, 8)
    proto = onnx_from_torch(model, torch.zeros(shape))
    ok = check_onnx_parity(model, proto, input_shape=shape)
    assert list(ok.outputs or {}) == ["cls_logits", "bbox_regression"]
    assert ok.outputs["bbox_regression"]["shape"] == [2, 2, 8, 8]  # 2 batches
    assert ok.to_dict()["outputs"]["cls_logits"]["passed"] is True
    with torch.no_grad():
        model.box.bias += 0.5  # only the box head now differs from the exported graph
    bad = check_onnx_parity(model, proto, input_shape=shape, raise_on_failure=False)
    assert not bad.passed
    assert bad.outputs["cls_logits"]["passed"] is True
    assert bad.outputs["bbox_regression"]["passed"] is False
    assert bad.outputs["bbox_regression"]["max_abs"] == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ParityError, match=r"differs from PyTorch \(outputs bbox_regression\): FAILED"):
        check_onnx_parity(model, proto, input_shape=shape)
