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

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lowrank_core.errors import UserInputError

__all__ = ["BLOCK_RULES", "INT8_FORMAT", "PRECISIONS", "quantize_onnx_bytes"]

PRECISIONS = ("fp32", "int8")
INT8_FORMAT = "qdq-u8s8"
BLOCK_RULES = ("narrow", "depthwise")


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
        UserInputError: the export stage is not installed, or an unknown format.
        export.quantize.QuantizationError: ONNX Runtime could not quantize the model.
    """
    try:
        from export.quantize import RULES, quantize_int8
        from export.quantize.rules import SYNTHETIC_CALIBRATION
    except ImportError as exc:
        raise UserInputError(f"int8 latency needs the export stage and onnxruntime installed ({exc})") from None
    rng = np.random.default_rng(seed)
    shape = [int(d) for d in input_shape]
    feeds = [{"input": rng.standard_normal(shape, dtype=np.float32)} for _ in range(SYNTHETIC_CALIBRATION)]
    with tempfile.TemporaryDirectory(prefix="latency-int8-") as tmp:
        source, dest = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model_bytes)
        quantize_int8(source, dest, feeds, fmt=fmt, rules=RULES if rules is None else rules)
        return dest.read_bytes()
