"""Segmentation and detection models as single-input graphs of tensors, ready to compress and export.

torchvision's segmentation models return a dict (``out``, plus ``aux`` when the auxiliary head is
loaded); its detectors take a list of images and return boxes after resizing, anchor decoding and NMS.
Neither is a single-tensor-in, tensors-out graph, so :func:`build_task_model` wraps them:

* :class:`SegmentationOutputs` returns the dict's tensors in a fixed key order (one tensor when there is
  one key); :attr:`~SegmentationOutputs.output_names` are the ONNX output names.
* :class:`DetectionHeadOutputs` runs backbone + FPN + head on a batch of images already resized to the
  model's input size and normalised with its ``transform``'s mean/std, and returns the **raw head
  outputs** (per-anchor class logits and box regression; for Faster R-CNN the region proposal network's
  objectness and box deltas). That is the graph deployed to TensorRT and ONNX Runtime: resizing,
  normalisation, anchor decoding, NMS and (Faster R-CNN) the RoI box head are left to the application
  (or a TensorRT ``EfficientNMS`` plugin). The wrapped torchvision detector stays available as
  :attr:`~DetectionHeadOutputs.detector`, compressed layers included, so accuracy runs keep torchvision's
  postprocessing in Python: ``wrapper.detector(list_of_images)``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = [
    "DETECTION_MODELS",
    "SEGMENTATION_MODELS",
    "DetectionHeadOutputs",
    "SegmentationOutputs",
    "check_data_supported",
    "default_input_size",
    "task_of",
    "wrap_task_model",
]

SEGMENTATION_MODELS = (
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet101",
    "deeplabv3_resnet50",
    "fcn_resnet101",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
)
#: Detectors whose raw head outputs :class:`DetectionHeadOutputs` knows.
DETECTION_MODELS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
)


def task_of(name: str) -> str | None:
    """``"segmentation"``, ``"detection"`` or ``None`` (a classifier or unknown name)."""
    if name in SEGMENTATION_MODELS:
        return "segmentation"
    if name in DETECTION_MODELS:
        return "detection"
    return None


def check_data_supported(spec: str, data: str) -> None:
    """Refuse ``DATA=`` for a segmentation or detection model: the datasets hold image labels, no masks or boxes.

    Raises:
        UserInputError: naming the model's task (one line), before anything is loaded or written.
    """
    task = task_of(spec)
    if task is not None:
        from lowrank_core.errors import UserInputError

        raise UserInputError(
            f"DATA={data} trains, calibrates and evaluates classifiers from image labels; {spec} is a {task} model "
            "(no masks or boxes in the data): run it without DATA (the report shows output agreement and parity)"
        )


class SegmentationOutputs(nn.Module):
    """A torchvision segmentation model whose dict output becomes a tensor (one key) or a tuple in key order.

    Args:
        model: The segmentation model (``out`` always, ``aux`` when it has an auxiliary classifier).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        has_aux = getattr(model, "aux_classifier", None) is not None
        self.output_names: tuple[str, ...] = ("out", "aux") if has_aux else ("out",)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The model's outputs for ``x`` in :attr:`output_names` order."""
        out = self.model(x)
        if len(self.output_names) == 1:
            return out[self.output_names[0]]
        return tuple(out[k] for k in self.output_names)


class DetectionHeadOutputs(nn.Module):
    """A torchvision detector cut after its head: backbone + FPN + head, raw outputs (see the module doc).

    Outputs, for ``N`` images and ``A`` anchors over all feature levels:

    * SSD / SSDlite / RetinaNet: ``cls_logits`` ``(N, A, classes)``, ``bbox_regression`` ``(N, A, 4)``;
    * FCOS: the same plus ``bbox_ctrness`` ``(N, A, 1)``;
    * Faster R-CNN: the RPN's ``objectness`` ``(N, A)`` and ``rpn_bbox_deltas`` ``(N, A, 4)``. The RoI box
      head runs on proposals chosen by NMS, so it is not part of this graph (its layers stay dense).

    Args:
        detector: A torchvision ``SSD``, ``RetinaNet``, ``FCOS`` or ``FasterRCNN``.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
        from torchvision.models.detection.ssd import SSD

        self.detector = detector
        if isinstance(detector, FasterRCNN):
            self.kind = "rpn"
            self.output_names: tuple[str, ...] = ("objectness", "rpn_bbox_deltas")
        elif isinstance(detector, FCOS):
            self.kind = "head"
            self.output_names = ("cls_logits", "bbox_regression", "bbox_ctrness")
        elif isinstance(detector, (SSD, RetinaNet)):
            self.kind = "head"
            self.output_names = ("cls_logits", "bbox_regression")
        else:
            raise TypeError(f"no raw-head export is known for {type(detector).__name__}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw head outputs for a batch of resized, normalised images."""
        features = self.detector.backbone(x)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        levels = list(features.values())
        if self.kind == "head":
            out = self.detector.head(levels)
            return tuple(out[k] for k in self.output_names)
        objectness, deltas = self.detector.rpn.head(levels)
        n = x.shape[0]
        obj = [o.permute(0, 2, 3, 1).reshape(n, -1) for o in objectness]
        box = [d.reshape(n, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4) for d in deltas]
        return torch.cat(obj, dim=1), torch.cat(box, dim=1)


def wrap_task_model(name: str, model: nn.Module) -> nn.Module:
    """Wrap a segmentation or detection model built by torchvision; return other models unchanged."""
    task = task_of(name)
    if task == "segmentation":
        return SegmentationOutputs(model)
    if task == "detection":
        return DetectionHeadOutputs(model)
    return model


def default_input_size(name: str, model: nn.Module | None = None) -> int | None:
    """Square input size from the weights' metadata (segmentation: ``resize_size``, 520) or the detector's transform.

    Detectors: the transform's ``min_size`` (320 for the ``320`` variants, 800 otherwise; SSD300: 300).
    ``None`` when nothing is recorded.
    """
    task = task_of(name)
    if task == "segmentation":
        import torchvision

        try:
            transforms: Any = torchvision.models.get_model_weights(name).DEFAULT.transforms
        except (ValueError, KeyError):
            return None
        size = getattr(transforms, "keywords", {}).get("resize_size")
        return int(size) if size is not None else None
    if task == "detection" and model is not None:
        detector = getattr(model, "detector", model)
        sizes = getattr(getattr(detector, "transform", None), "min_size", None)
        if sizes:
            return int(sizes[0])
    return None
