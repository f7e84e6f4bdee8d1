"""Post-training quantization of a run's ONNX files: INT8 (ONNX Runtime CPU or TensorRT Q/DQ) and FP16.

``python -m export quantize --run-dir DIR --precision int8`` quantizes ``dense.onnx`` and ``model.onnx``
into ``dense.int8.onnx`` and ``model.int8.onnx`` with ``onnxruntime.quantization`` (``quant_pre_process``
then ``quantize_static``, per-channel weights) and writes ``quantize.json``. ``--precision fp16`` writes
``dense.fp16.onnx`` / ``model.fp16.onnx`` (float16 compute, float32 I/O, via
:func:`export.tensorrt.precision.convert_onnx_to_fp16`); ONNX Runtime's CPU timing of FP16 says nothing about
a GPU, so those files are not timed (and their agreement, measured on ONNX Runtime CPU, which casts most FP16
ops to float32, shows weight rounding but not FP16 activation overflow). ``--target tensorrt`` writes ``*.int8.trt.onnx``: symmetric int8 Q/DQ
(activations and weights, zero points 0, biases left float), the explicit quantization TensorRT 10 and 11
build from.

Formats (``--format``): ``qdq-u8s8`` (QDQ, uint8 activations, int8 weights), ``qdq-s8s8`` (ORT's
documented default), ``qoperator-u8s8`` (QLinearConv & co.), or ``auto`` (default): every candidate
quantizes each model (dense and compressed separately: x86 kernels differ per format and layer shape),
candidates passing the gate are timed against each other and the FP32 model with ONNX Runtime (interleaved,
``--threads`` threads), and the fastest wins; all timings and each model's format are recorded.

CPU: on x86 without VNNI (no ``avx512_vnni``/``avx_vnni``/``amx_int8`` in /proc/cpuinfo) ONNX Runtime's u8s8
kernels multiply with VPMADDUBSW, whose int16 pair sums saturate with 8-bit weights (top-1 agreement 0.156
on an AVX2 AMD EPYC). There int8 weights are quantized to 7 bits (``reduce_range``, which cannot saturate)
and ``auto`` also times U8U8; elsewhere weights keep 8 bits (:func:`int8_remedy`). ``--reduce-range`` forces 7
bits; ``LOWRANK_DEPLOY_CPU_FEATURES`` (e.g. ``avx2,fma``) replaces the CPU's flags. ``quantize.json``'s ``cpu``
records the CPU class and the choice.

Calibration: with ``--data``, a seeded calibration subset of the training split (256 images by default,
:func:`compress.data.calibration_subset`); without, seeded standard-normal inputs (16 by default) and a
loud warning in the record and the report. Methods: ``minmax`` (default), ``entropy``, ``percentile``.

Float layers, by rule (:func:`float_layers`, applied to the pre-processed graph; ``--float-rules``):

* ``stem``: the first Conv fed by the graph input (raw pixels, 3 channels);
* ``classifier``: the Gemm/MatMul/Conv whose output reaches a graph output through no other Conv/Gemm/MatMul;
* ``narrow``: Conv/Gemm/MatMul with fewer than ``--float-min-rank`` (16) input or output channels: the
  factors of small ranks, slower in int8 than in float (onnxruntime#20052) and the least accurate;
* ``depthwise``: grouped Conv with one input channel per group (CP's spatial factor; per-channel int8 on
  depthwise convs can wreck accuracy, onnxruntime#11415).

Checks. A quantized model is not held to the FP32 parity tolerance: its agreement with the FP32 ONNX on
32 seeded inputs (test images with ``--data``) is recorded as relative L2, cosine, top-1 agreement and max
abs. **Gate**: the export fails (exit 1, no quantized file left) when the quantized output holds any NaN
or inf, its cosine similarity with the FP32 output is below 0.9, or, with at least 16 inputs of a 2-D
output, its top-1 agreement is below 0.5. With ``--data`` the int8 models' test accuracy is evaluated
with ONNX Runtime on the same test subset as compress.json's accuracy.
"""

from __future__ import annotations

from export.quantize.cli import add_parser, run_cli
from export.quantize.rules import (
    AUTO_CANDIDATES,
    FORMATS,
    GATE,
    MIN_FLOAT_RANK,
    RULES,
    FloatLayer,
    Gate,
    QuantizationError,
    agreement,
    float_layers,
)
from export.quantize.run import quantize_run
from export.quantize.static import CPU_FEATURES_ENV, Int8Remedy, cpu_int8_support, int8_remedy, quantize_int8

__all__ = [
    "AUTO_CANDIDATES",
    "CPU_FEATURES_ENV",
    "FORMATS",
    "GATE",
    "MIN_FLOAT_RANK",
    "RULES",
    "FloatLayer",
    "Gate",
    "Int8Remedy",
    "QuantizationError",
    "add_parser",
    "agreement",
    "cpu_int8_support",
    "float_layers",
    "int8_remedy",
    "quantize_int8",
    "quantize_run",
    "run_cli",
]
