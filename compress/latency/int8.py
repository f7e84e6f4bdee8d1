"""INT8 block timing: a block's in-memory ONNX quantized the way ``python -m export quantize`` quantizes a model.

``PRECISION=int8`` with a latency target (``METHOD=auto SPEEDUP=…``) must plan ranks with int8 block
latencies: a factorized chain's narrow 1×1 convs gain far less from int8 than a wide dense conv (or lose,
onnxruntime#20052), so float times pick the wrong ranks. :func:`quantize_onnx_bytes` runs
:func:`export.quantize.quantize_int8` on one exported block or model with the export's settings: static,
per-channel weights, MinMax, :data:`~export.quantize.rules.SYNTHETIC_CALIBRATION` seeded standard-normal
calibration inputs (activation ranges do not change int8 kernel times), and a fixed format (default
``qdq-u8s8``; the export's ``--format auto`` times candidates per model, which a planner cannot do per
block; the format is part of the lookup table's context).

Float layers. A whole model (:meth:`OrtTimer.measure`: the dense profile and the end-to-end check) gets the
export's rules (stem, classifier, narrow, depthwise). A lone block gets only the rules that depend on the
layer itself (``narrow``: fewer than 16 channels, ``depthwise``): in a one-block graph the first conv is
fed by the graph input and the last reaches the output, so ``stem``/``classifier`` would leave every block
in float. The stem and classifier paths are thus timed in int8 as blocks while the export keeps them
float; every method keeps the stem, the dense profile's end-to-end/Σ-blocks scale absorbs a constant
offset, and the latency solve's measured end-to-end correction (whole models, all rules) covers the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from lowrank_core.errors import UserInputError

__all__ = ["BLOCK_RULES", "INT8_FORMAT", "INT8_QUANTIZER_GROUP", "PRECISIONS", "quantize_onnx_bytes"]

PRECISIONS = ("fp32", "int8")
INT8_FORMAT = "qdq-u8s8"
BLOCK_RULES = ("narrow", "depthwise")

INT8_QUANTIZER_GROUP = "lowrank_deploy.int8_quantizers"
"""Entry-point group of the function that quantizes ONNX bytes as ``export quantize`` does (``export`` registers
:func:`export.quantize.static.quantize_onnx_bytes` in ``pyproject.toml``): compress names the extension point and
imports nothing of the stage above it that fills it."""


def quantize_onnx_bytes(
    model_bytes: bytes,
    input_shape: Sequence[int],
    *,
    fmt: str = INT8_FORMAT,
    rules: Sequence[str] | None = None,
    seed: int = 0,
) -> bytes:
    """``model_bytes`` (one float input named ``input``) statically quantized to int8, as ONNX bytes.

    Args:
        model_bytes: An FP32 ONNX model.
        input_shape: Its input shape (batch first): each calibration feed has it.
        fmt: The int8 format (:data:`export.quantize.FORMATS`).
        rules: Float-layer rules (default: the export's, :data:`export.quantize.RULES`).
        seed: Seed of the synthetic calibration inputs.

    Raises:
        UserInputError: no quantizer is registered (the export stage or onnxruntime is not installed).
        export.quantize.QuantizationError: ONNX Runtime could not quantize the model.
    """
    from importlib import metadata

    quantizers = sorted(metadata.entry_points(group=INT8_QUANTIZER_GROUP), key=lambda ep: ep.name)
    try:
        if not quantizers:
            raise ImportError(f"no {INT8_QUANTIZER_GROUP!r} entry point is installed")
        quantize = quantizers[0].load()
    except ImportError as exc:
        raise UserInputError(f"int8 latency needs the export stage and onnxruntime installed ({exc})") from None
    return quantize(model_bytes, input_shape, fmt=fmt, rules=rules, seed=seed)
