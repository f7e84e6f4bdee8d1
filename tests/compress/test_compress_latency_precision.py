"""INT8 block latencies for ``METHOD=auto SPEEDUP=… PRECISION=int8`` (issue 16): keys, the quantized timing path.

No timing is asserted: the lookup-table tests use a fake timer, the ONNX Runtime tests check that a block
is really quantized (Q/DQ nodes in the timed graph) and that its timing path runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from torch import nn

from compress.latency import LatencyModel, LatencyTable
from lowrank_core.errors import UserInputError
from tests.compress.models import TinyResNet


class PrecisionTimer:
    """A fake timer of one precision: ms = 1 per call's parameter count / 1e3 (never asserted as a time)."""

    backend = "fake"
    threads = 1

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.precision_tag = precision if precision == "fp32" else f"{precision}-qdq-u8s8"
        self.calls = 0

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        self.calls += 1
        return sum(p.numel() for p in module.parameters()) / 1e3

    def measure(self, models: Sequence[nn.Module], input_shape: Sequence[int], *, repeats: int = 20) -> list[float]:
        return [self.time_module(m, input_shape) for m in models]


def test_lut_context_differs_by_precision_and_int8_misses_fp32_entries(tmp_path: Path):
    block, shape = nn.Conv2d(16, 16, 3, padding=1), [1, 16, 8, 8]
    fp32_timer, int8_timer = PrecisionTimer("fp32"), PrecisionTimer("int8")
    fp32 = LatencyModel(fp32_timer, LatencyTable(tmp_path / "lut.json"), precision="fp32")
    fp32.block_ms(block, shape)
    fp32.save()
    int8 = LatencyModel(int8_timer, LatencyTable(tmp_path / "lut.json"), precision="int8")
    assert fp32.context != int8.context
    assert "|fp32|" in fp32.context
    assert "|int8-qdq-u8s8|" in int8.context
    int8.block_ms(block, shape)  # the same block and shape: a miss in the int8 context
    assert int8_timer.calls == 1
    int8.save()
    table = LatencyTable(tmp_path / "lut.json")
    assert sorted(table.sections) == sorted([fp32.context, int8.context])
    assert len(table) == 2
    again = LatencyModel(PrecisionTimer("fp32"), LatencyTable(tmp_path / "lut.json"), precision="fp32")
    again.block_ms(block, shape)
    assert again.timer.calls == 0  # the fp32 entry is still there, untouched by the int8 one


def test_latency_model_refuses_a_timer_of_another_precision(tmp_path: Path):
    with pytest.raises(UserInputError, match="times int8, not fp32"):
        LatencyModel(PrecisionTimer("int8"), LatencyTable(tmp_path / "lut.json"), precision="fp32")


def test_ort_timer_precision_tag_and_fp16_refused():
    from compress.latency.ort_timing import OrtTimer

    assert OrtTimer(1).precision_tag == "fp32"
    assert OrtTimer(1, precision="int8").precision_tag == "int8-qdq-u8s8"
    assert OrtTimer(1, precision="int8", int8_format="qdq-s8s8").precision_tag == "int8-qdq-s8s8"
    with pytest.raises(UserInputError, match="FP16 is not meaningful"):
        OrtTimer(1, precision="fp16")


def _ops(model_bytes: bytes) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]


def test_int8_block_is_quantized_and_its_timing_path_runs(tmp_path: Path):
    pytest.importorskip("onnxruntime")
    from compress.latency.ort_timing import OrtTimer

    timer = OrtTimer(1, warmup=1, repeats=2, min_seconds=0.0, precision="int8")
    wide = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1))
    ops = _ops(timer.model_bytes(wide, [1, 32, 8, 8], block=True))
    assert ops.count("Conv") == 2
    assert ops.count("DequantizeLinear") >= 4  # both convs' weights and inputs
    narrow = nn.Sequential(nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 3, padding=1))  # a rank-8 factor: float by rule
    narrow_ops = _ops(timer.model_bytes(narrow, [1, 32, 8, 8], block=True))
    assert "DequantizeLinear" not in narrow_ops
    assert "DequantizeLinear" not in _ops(OrtTimer(1).model_bytes(wide, [1, 32, 8, 8], block=True))

    latency = LatencyModel(timer, LatencyTable(tmp_path / "lut.json"), precision="int8")
    ms = latency.block_ms(wide, [1, 32, 8, 8])
    (total,) = timer.measure([TinyResNet().eval()], [1, 3, 16, 16], repeats=2)  # whole model: the export's rules
    assert ms > 0
    assert total > 0
    assert "|int8-qdq-u8s8|" in latency.context
    assert latency.to_dict()["precision"] == "int8"


def test_cli_latency_precision_reaches_the_latency_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from compress.cli import main

    seen: list[dict[str, object]] = []

    def fake_model(**kw: object) -> LatencyModel:
        seen.append(kw)
        timer = PrecisionTimer(str(kw["precision"]))
        return LatencyModel(timer, LatencyTable(tmp_path / "lut.json"), precision=str(kw["precision"]))

    monkeypatch.setattr("compress.latency.LatencyModel", fake_model)
    spec = "tests/compress/models.py:tiny_resnet"
    argv = ["run", "--model", spec, "--input-size", "32", "--method", "svd", "--speedup", "1.2"]
    argv += ["--round-to", "4", "--min-rank", "4", "--latency-precision", "int8", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 0
    assert seen[0]["precision"] == "int8"
    with pytest.raises(SystemExit):
        main([*argv[:-2], "--latency-precision", "fp16", "--run-dir", str(tmp_path / "r2")])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LRD_PRECISION": "int8", "LRD_SPEEDUP": "2"}, ["--latency-precision", "int8"]),
        ({"LRD_PRECISION": "int8", "LRD_LATENCY_MS": "5"}, ["--latency-precision", "int8"]),
        ({"LRD_PRECISION": "int8", "LRD_RATIO": "2"}, []),  # no latency target: nothing to time
        ({"LRD_SPEEDUP": "2"}, []),  # fp32
    ],
)
def test_make_export_precision_int8_with_a_latency_target_plans_in_int8(tmp_path: Path, env, expected):
    from lowrank_deploy.pipeline import build_parser, plan_export, resolve

    tiny = f"{Path(__file__).resolve().parent / 'models.py'}:tiny_resnet"
    argv = ["export", "--model", tiny, "--method", "auto", "--weights", "random"]
    values = resolve(build_parser().parse_args(argv), {**env, "LRD_OUT": str(tmp_path)})
    _, stages = plan_export(values)
    compress_argv = stages[0].argv
    found = compress_argv[compress_argv.index("--latency-precision") :][:2] if expected else []
    assert found == expected
    if not expected:
        assert "--latency-precision" not in compress_argv


def test_latency_model_default_timer_gets_the_precision():
    pytest.importorskip("onnxruntime")
    latency = LatencyModel(table=LatencyTable(None), precision="int8")
    assert latency.timer.precision == "int8"  # type: ignore[attr-defined]
