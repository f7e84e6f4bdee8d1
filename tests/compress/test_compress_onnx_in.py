"""Compressing a model given only as ONNX (``compress.onnx_in``, issue 26).

ONNX files of several sources — torchvision ResNet-18 and MobileNetV2 exported by torch, the CIFAR zoo's
ResNet-20, and a graph written with ``onnx.helper`` (Gemm with ``transB=1`` and ``transB=0``, MatMul + Add,
a grouped conv, asymmetric pads, dilation, external data, a symbolic batch, metadata) — are planned and
rewritten; a full-rank plan reproduces the original to float32 rounding, a target ratio is reached, the
rest of the graph is untouched, and hostile files are one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.onnx_in import analyze_onnx, apply_onnx_plan, compress_onnx, onnx_agreement, plan_onnx
from compress.onnx_in.graph import load_input_model
from lowrank_core.errors import UserInputError

ROOT = Path(__file__).resolve().parents[2]
EXACT = 1e-5  # a full-rank factorization reproduces the original to float32 rounding


# ----------------------------------------------------------------------------------------------- graphs
def _init(rng: np.random.Generator, name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)


def hand_graph(*, opset: int = 17) -> onnx.ModelProto:
    """A graph no PyTorch exporter wrote: grouped conv, asymmetric pads, dilation, Gemm transB 0/1, MatMul + Add."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["c0"], name="stem", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w_a", "b_a"], ["c1"], name="conv_a", pads=[1, 0, 1, 2], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w_g"], ["c2"], name="grouped", pads=[1, 1, 1, 1], group=4),
        helper.make_node("Conv", ["c2", "w_d", "b_d"], ["c3"], name="dilated", pads=[2, 2, 2, 2], dilations=[2, 2]),
        helper.make_node("Conv", ["c3", "w_p"], ["c4"], name="pointwise"),
        helper.make_node("GlobalAveragePool", ["c4"], ["gp"], name="pool"),
        helper.make_node("Flatten", ["gp"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w_fc1", "b_fc1"], ["f1"], name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w_mm"], ["m1"], name="mm"),
        helper.make_node("Add", ["m1", "b_mm"], ["a1"], name="mm_bias"),
        helper.make_node("Gemm", ["a1", "w_fc2", "b_fc2"], ["y"], name="fc2", alpha=0.5, beta=2.0),
    ]
    inits = [
        _init(rng, "w_stem", 32, 3, 3, 3),
        _init(rng, "w_a", 64, 32, 3, 3),
        _init(rng, "b_a", 64),
        _init(rng, "w_g", 64, 16, 3, 3),
        _init(rng, "w_d", 64, 64, 3, 3),
        _init(rng, "b_d", 64),
        _init(rng, "w_p", 96, 64, 1, 1),
        _init(rng, "w_fc1", 128, 96),
        _init(rng, "b_fc1", 128),
        _init(rng, "w_mm", 128, 96),
        _init(rng, "b_mm", 96),
        _init(rng, "w_fc2", 96, 10),
        _init(rng, "b_fc2", 10),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="hand-written")
    helper.set_model_props(model, {"author": "tests", "license": "none"})
    model.doc_string = "written with onnx.helper"
    return model


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path


@pytest.fixture(scope="module")
def hand_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_external(hand_graph(), tmp_path_factory.mktemp("hand") / "hand.onnx")


def _torch_onnx(model: torch.nn.Module, size: int, path: Path, *, legacy: bool = False) -> Path:
    """The torch.export exporter (what ``python -m export`` uses), or the TorchScript one (other names, Identity nodes)."""
    import warnings

    model.eval()
    example = torch.randn(1, 3, size, size)
    if not legacy:
        from export.onnx import onnx_from_torch

        onnx.save_model(onnx_from_torch(model, example, dynamic_batch=True), str(path))
        return path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torchvision

    from compress.zoo import create_model

    folder = tmp_path_factory.mktemp("torch")
    torch.manual_seed(0)
    return {
        "resnet18": _torch_onnx(torchvision.models.resnet18(num_classes=10), 64, folder / "resnet18.onnx"),
        "mobilenet_v2": _torch_onnx(
            torchvision.models.mobilenet_v2(num_classes=10), 64, folder / "mobilenet_v2.onnx", legacy=True
        ),
        "cifar_resnet20": _torch_onnx(create_model("cifar_resnet20"), 32, folder / "cifar_resnet20.onnx", legacy=True),
    }


def _full_rank(plan) -> None:  # type: ignore[no-untyped-def]
    for entry in plan.factorized_layers:
        entry.ranks = list(entry.info["max_ranks"])


# ----------------------------------------------------------------------------------------------- hand graph
@pytest.mark.parametrize("method", ["tucker2", "svd", "tai"])
def test_full_rank_rewrite_reproduces_the_hand_graph(hand_file: Path, method: str) -> None:
    graph = analyze_onnx(hand_file)
    plan = plan_onnx(graph, method, ratio=1.5, round_to=1, min_rank=1, min_share=0.0, keep_stem=False)
    assert {e.path for e in plan.factorized_layers} >= {"conv_a", "dilated", "fc1", "mm", "fc2"}
    _full_rank(plan)
    model = apply_onnx_plan(graph, plan)
    agreement, ref, _ = onnx_agreement(graph.model, model, graph.specs)
    assert ref.shape == (8, 10)
    assert agreement["rel_l2"] < EXACT
    assert agreement["top1_agreement"] == 1.0
    assert max(e.rel_error for e in plan.factorized_layers) < 1e-6


def test_hand_graph_layers_and_reasons(hand_file: Path) -> None:
    plan = plan_onnx(analyze_onnx(hand_file), "tucker2", ratio=1.5, round_to=1, min_rank=1, min_share=0.0)
    by = {e.path: e for e in plan.layers}
    assert [e.type for e in plan.layers] == ["Conv"] * 5 + ["Gemm", "MatMul", "Gemm"]
    assert by["stem"].reason.startswith("stem")
    assert "grouped" in by["grouped"].reason
    assert by["conv_a"].shape == [64, 32, 3, 3]
    assert by["conv_a"].in_hw == [16, 16]
    assert by["conv_a"].out_hw == [8, 8]
    assert by["mm"].shape == [96, 128]  # (out, in): the MatMul weight transposed
    assert by["fc2"].shape == [10, 96]  # Gemm transB=0: (K, N) weight seen as (N, K)
    assert by["grouped"].macs_before == 64 * 16 * 9 * 8 * 8
    assert by["pointwise"].action == "pointwise-svd"
    assert by["fc1"].action == "linear-svd"


def test_rewrite_leaves_the_rest_of_the_graph_untouched(hand_file: Path) -> None:
    result = compress_onnx(hand_file, "tucker2", ratio=1.5, round_to=1, min_rank=1, min_share=0.0)
    before, after = result.dense, result.model
    assert after.opset_import == before.opset_import
    assert after.ir_version == before.ir_version
    assert after.metadata_props == before.metadata_props
    assert after.doc_string == before.doc_string
    assert after.producer_name == before.producer_name
    assert after.graph.input == before.graph.input
    assert after.graph.output == before.graph.output
    assert after.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # dynamic batch kept
    factorized = {e.path: e.action for e in result.plan.factorized_layers}
    kept_nodes = [n for n in before.graph.node if n.name not in factorized]
    names_after = Counter(n.name for n in after.graph.node)
    for node in kept_nodes:
        assert node in after.graph.node
    for name in factorized:  # the last node of each chain keeps the original name and output
        assert names_after[name] == 1
    extra = {"tucker2": 2, "pointwise-svd": 1, "linear-svd": 1}
    counts_before, counts_after = (
        Counter(n.op_type for n in before.graph.node),
        Counter(n.op_type for n in after.graph.node),
    )
    conv_extra = sum(extra[a] for a in factorized.values() if a != "linear-svd")
    assert counts_after["Conv"] == counts_before["Conv"] + conv_extra
    gemm_extra = sum(1 for p, a in factorized.items() if a == "linear-svd" and p.startswith("fc"))
    assert counts_after["Gemm"] == counts_before["Gemm"] + gemm_extra
    assert counts_after["MatMul"] == counts_before["MatMul"] + ("mm" in factorized)
    assert {k: v for k, v in counts_after.items() if k not in ("Conv", "Gemm", "MatMul")} == {
        k: v for k, v in counts_before.items() if k not in ("Conv", "Gemm", "MatMul")
    }
    onnx.checker.check_model(after, full_check=True)
    agreement, _, _ = onnx_agreement(before, after, result.graph.specs, batch=3)
    assert agreement["batch"] == 3  # the symbolic batch runs at another size


def test_shared_and_computed_weights_are_kept_with_the_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
        helper.make_node("MatMul", ["a", "w"], ["b"], name="second"),
        helper.make_node("Constant", [], ["wc"], name="const", value=_init(rng, "v", 64, 64)),
        helper.make_node("MatMul", ["b", "wc"], ["c"], name="computed"),
        helper.make_node("MatMul", ["c", "w2"], ["y"], name="plain"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [_init(rng, "w", 64, 64), _init(rng, "w2", 64, 64)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan = plan_onnx(analyze_onnx(model), "svd", ratio=1.2, round_to=1, min_rank=1, min_share=0.0)
    by = {e.path: e for e in plan.layers}
    assert "shared by 2 nodes" in by["first"].reason
    assert "shared by 2 nodes" in by["second"].reason
    assert "produced by node 'const'" in by["computed"].reason
    assert by["plain"].action == "linear-svd"


# ----------------------------------------------------------------------------------------------- torch exports
def test_torch_exports_reach_the_ratio(torch_files: dict[str, Path]) -> None:
    for name, path in torch_files.items():
        result = compress_onnx(path, "tucker2", ratio=2, round_to=8)
        plan = result.plan
        achieved = plan.totals["params_before"] / plan.totals["params_after_measured"]
        assert achieved == pytest.approx(2.0, rel=0.05), name
        assert plan.totals["params_after_measured"] == plan.totals["params_after"], name
        assert plan.totals["macs_after_measured"] == plan.totals["macs_after"], name
        agreement, _, _ = onnx_agreement(result.dense, result.model, result.graph.specs, batch=2)
        assert np.isfinite(agreement["rel_l2"]), name
        if name == "mobilenet_v2":
            depthwise = [e for e in plan.layers if e.reason and "grouped" in e.reason]
            assert len(depthwise) == 17


def test_torch_export_full_rank_is_exact(torch_files: dict[str, Path]) -> None:
    graph = analyze_onnx(torch_files["resnet18"])
    plan = plan_onnx(graph, "tucker2", ratio=2)
    assert plan.layers[0].reason.startswith("stem")
    assert plan.layers[0].in_hw == [64, 64]
    _full_rank(plan)
    model = apply_onnx_plan(graph, plan)
    agreement, _, _ = onnx_agreement(graph.model, model, graph.specs, batch=2)
    assert agreement["rel_l2"] < EXACT


def test_cp_and_flops_target(hand_file: Path) -> None:
    result = compress_onnx(hand_file, "cp", ratio=1.5, round_to=1, min_rank=1, min_share=0.0)
    assert any(e.action == "cp" for e in result.plan.factorized_layers)
    groups = [a.i for n in result.model.graph.node for a in n.attribute if a.name == "group"]
    assert 4 in groups
    assert any(g > 4 for g in groups)
    flops = compress_onnx(hand_file, "svd", flops=0.3, round_to=1, min_rank=1, min_share=0.0).plan
    assert flops.target["achieved_flops_reduction"] == pytest.approx(0.3, abs=0.03)


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method", ["vbmf-tucker2", "lrsd", "cc", "ljsvd"])
def test_methods_that_need_pytorch_are_refused_in_one_line(hand_file: Path, method: str) -> None:
    with pytest.raises(UserInputError, match=f"METHOD={method} cannot compress an ONNX model") as info:
        compress_onnx(hand_file, method)
    assert "\n" not in str(info.value)


def _hostile(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.onnx"
    model = hand_graph()
    g = model.graph
    if case == "corrupt":
        path.write_bytes(b"\x08\x07garbage" * 50)
        return path
    if case == "cycle":
        g.node[1].input[0] = "c1"  # relu0 reads conv_a's output, which depends on relu0
    elif case == "missing_initializer":
        del g.initializer[1]  # w_a
    elif case == "huge_dims":
        g.input[0].type.tensor_type.shape.dim[2].dim_value = 10**6
        g.input[0].type.tensor_type.shape.dim[3].dim_value = 10**6
    elif case == "initializer_lies":
        g.initializer[0].dims[0] = 10**7
    elif case == "outside":
        (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
        sub = tmp_path / "model"
        sub.mkdir()
        path = sub / "outside.onnx"
        init = g.initializer[0]
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.data_location = TensorProto.EXTERNAL
        init.external_data.add(key="location", value="../outside.bin")
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize(
    "case", ["corrupt", "cycle", "missing_initializer", "huge_dims", "initializer_lies", "outside"]
)
def test_hostile_onnx_is_one_line(tmp_path: Path, case: str) -> None:
    path = _hostile(tmp_path, case)
    with pytest.raises(UserInputError) as info:
        analyze_onnx(path)
    message = str(info.value)
    assert "\n" not in message
    assert message
    expected = {
        "corrupt": "not a readable ONNX model",
        "cycle": "cycle",
        "missing_initializer": "no node, graph input or initializer provides",
        "huge_dims": "too large",
        "initializer_lies": "cannot be read",
        "outside": "outside the model's folder",
    }[case]
    assert expected in message


def test_unsorted_graph_is_sorted(tmp_path: Path) -> None:
    model = hand_graph()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    sorted_model = load_input_model(model)
    assert [n.name for n in sorted_model.graph.node] == [n.name for n in nodes]


# ----------------------------------------------------------------------------------------------- make export
@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_export_onnx_end_to_end(tmp_path: Path) -> None:
    import json
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from venv_for_make import venv_for_make

    model_path = tmp_path / "models" / "tiny.onnx"
    model_path.parent.mkdir()
    onnx.save_model(hand_graph(), str(model_path))
    out = tmp_path / "artifacts"
    cmd = ["make", "export", f"MODEL={model_path}", "METHOD=svd", "RATIO=1.5", "DURATION=1", "THREADS=1"]
    cmd += ["ROUND_TO=1", f"OUT={out}", f"VENV={venv_for_make()}", "COMPRESS_ARGS=--min-rank 1"]
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / "tiny" / "svd"
    for name in (
        "plan.json",
        "compress.json",
        "dense.onnx",
        "model.onnx",
        "parity.json",
        "latency.json",
        "report.json",
    ):
        assert (run_dir / name).is_file(), name
    parity = json.loads((run_dir / "parity.json").read_text())
    assert parity["reference"] == "original ONNX"
    assert parity["dense"]["passed"]
    assert parity["dense"]["max_abs"] < 1e-5
    assert parity["compressed"]["gated"] is False
    report = json.loads((run_dir / "report.json").read_text())
    assert report["ratios"]["params"] == pytest.approx(1.5, rel=0.05)
    assert report["parity"]["reference"] == "original ONNX"
    assert "Parity, compressed ONNX vs original ONNX:" in (run_dir / "report.md").read_text()
    assert onnx.load(str(run_dir / "dense.onnx")).graph.node == load_input_model(model_path).graph.node


# ----------------------------------------------------------------------------------------------- auto and latency
def _auto_config(**target: float):  # type: ignore[no-untyped-def]
    from compress.api import method_config

    return method_config("auto", round_to=4, min_rank=4, **target)


def test_auto_ratio_on_onnx(hand_file: Path) -> None:
    from compress.onnx_in.latency import plan_onnx_latency

    graph = analyze_onnx(hand_file)
    plan = plan_onnx_latency(graph, _auto_config(ratio=1.5), None)
    assert [e.path for e in plan.layers] == [
        n.name for n in graph.model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
    ]
    assert plan.target["achieved_ratio"] >= 1.5 * 0.97
    assert plan.layer("grouped").action == "keep"  # auto has no candidate for a grouped conv
    model = apply_onnx_plan(graph, plan)
    assert plan.totals["params_after_measured"] == plan.totals["params_after"]
    agreement, _, _ = onnx_agreement(graph.model, model, graph.specs)
    assert np.isfinite(agreement["rel_l2"])


def test_speedup_target_times_the_real_graphs(hand_file: Path, tmp_path: Path) -> None:
    from compress.latency import LatencyModel
    from compress.latency.table import LatencyTable
    from compress.onnx_in.latency import GraphTimer, ProxyNet, plan_onnx_latency
    from compress.targets import Target
    from tests.compress.test_compress_latency import FakeTimer

    graph = analyze_onnx(hand_file)
    timer = GraphTimer(FakeTimer(), graph)
    measured = timer.measure([ProxyNet(graph)], [2, 3, 16, 16], repeats=2)
    assert len(measured) == 1
    assert measured[0] > 0
    latency = LatencyModel(timer, LatencyTable(tmp_path / "lut.json"))
    plan = plan_onnx_latency(graph, _auto_config(speedup=1.2), Target("speedup", 1.2), latency=latency)
    record = plan.target["latency_target"]
    assert record["dense_ms"] > 0
    assert record["measured_ms"] > 0
    assert record["rounds"]
    assert {e.path for e in plan.factorized_layers} <= {"conv_a", "dilated", "pointwise", "fc1", "mm", "fc2"}
    apply_onnx_plan(graph, plan)


# ----------------------------------------------------------------------------------------------- command lines
def test_compress_plan_then_apply_on_onnx(hand_file: Path, tmp_path: Path) -> None:
    from compress.cli import main
    from compress.plan import Plan

    plan_path = tmp_path / "plan.json"
    args = ["--model", str(hand_file), "--method", "tai", "--ratio", "1.5", "--round-to", "1", "--min-rank", "1"]
    assert main(["plan", *args, "--out", str(plan_path)]) == 0
    plan = Plan.load(plan_path)
    plan.layer("conv_a").ranks = [4]  # hand-edited
    plan.save(plan_path)
    run_dir = tmp_path / "run"
    assert main(["apply", "--model", str(hand_file), "--plan", str(plan_path), "--run-dir", str(run_dir)]) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["compress.json", "dense.onnx", "model.onnx", "plan.json"]
    model = onnx.load(str(run_dir / "model.onnx"))
    first = next(n for n in model.graph.node if n.input[0] == "r0")  # conv_a's vertical conv reads relu0
    assert numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == first.input[1])).shape == (
        4,
        32,
        3,
        1,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "lrsd"], "METHOD=lrsd cannot compress an ONNX model"),
        (["--finetune-epochs", "1"], "FINETUNE_EPOCHS needs the PyTorch model"),
        (["--weights", "imagenet"], "does not apply to an ONNX model"),
        (["--backend", "torch"], "BACKEND=torch"),
        (["--data", "fashion-mnist"], "DATA is a folder of .npy arrays"),
    ],
)
def test_lowrank_deploy_refuses_onnx_options_before_writing(
    hand_file: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    from lowrank_deploy.pipeline import build_parser, plan_export, resolve

    out = tmp_path / "out"
    argv = ["export", "--model", str(hand_file), "--out", str(out), *extra]
    with pytest.raises(UserInputError, match=message):
        plan_export(resolve(build_parser().parse_args(argv), {}))
    assert not out.exists()


def test_lowrank_deploy_onnx_run_dir_is_named_after_the_file(hand_file: Path, tmp_path: Path) -> None:
    from lowrank_deploy.pipeline import build_parser, plan_export, resolve

    argv = ["export", "--model", str(hand_file), "--method", "svd", "--out", str(tmp_path)]
    run_dir, stages = plan_export(resolve(build_parser().parse_args(argv), {}))
    assert run_dir == tmp_path / "hand" / "svd"
    assert [s.name for s in stages] == ["compress", "export", "bench", "report"]
    with pytest.raises(UserInputError, match="does not exist"):
        plan_export(resolve(build_parser().parse_args([*argv[:2], str(tmp_path / "nope.onnx"), *argv[3:]]), {}))


def test_compress_onnx_takes_auto_by_name(hand_file: Path) -> None:
    result = compress_onnx(hand_file, "auto", ratio=1.5, round_to=4, min_rank=4)
    assert result.plan.method == "auto"
    assert result.plan.totals["params_after_measured"] == result.plan.totals["params_after"]
    assert result.plan.target["achieved_ratio"] >= 1.5 * 0.97


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad_convs_are_rewritten_exactly(mode: str) -> None:
    rng = np.random.default_rng(3)
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], name="conv", auto_pad=mode, strides=[2, 2], kernel_shape=[3, 3]
    )
    graph = helper.make_graph(
        [node],
        "autopad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 15, 15])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, None, None])],
        [_init(rng, "w", 32, 16, 3, 3), _init(rng, "b", 32)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    g = analyze_onnx(model)
    for method in ("tai", "svd", "tucker2"):
        plan = plan_onnx(g, method, ratio=1.2, round_to=1, min_rank=1, min_share=0.0, keep_stem=False)
        _full_rank(plan)
        rewritten = apply_onnx_plan(g, plan)
        agreement, ref, _ = onnx_agreement(g.model, rewritten, g.specs, batch=2)
        assert ref.shape[1] == (32 * 8 * 8 if mode != "VALID" else 32 * 7 * 7)
        assert agreement["rel_l2"] < EXACT, method


def test_opset_9_gemm_is_kept_with_the_reason() -> None:
    model = hand_graph(opset=9)
    plan = plan_onnx(analyze_onnx(model), "svd", ratio=1.2, round_to=1, min_rank=1, min_share=0.0)
    assert "opset 9 < 11" in plan.layer("fc1").reason
    assert plan.layer("mm").action == "linear-svd"


# ----------------------------------------------------------------------------------------------- DATA
def _smooth_inputs(seed: int, n: int) -> np.ndarray:
    """Images with low-frequency structure (4×4 noise upsampled to 16×16): what data-aware factors exploit."""
    small = np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)
    return np.repeat(np.repeat(small, 4, axis=2), 4, axis=3)


def test_data_aware_factors_follow_the_data() -> None:
    from compress.onnx_in.graph import ort_run

    kwargs = {"ratio": 2.0, "round_to": 1, "min_rank": 1, "min_share": 0.0}
    calibration = [_smooth_inputs(seed, 16) for seed in range(4)]
    plain = compress_onnx(hand_graph(), "svd", **kwargs)
    aware = compress_onnx(hand_graph(), "svd", data=calibration, **kwargs)
    assert [e.ranks for e in aware.plan.factorized_layers] == [e.ranks for e in plain.plan.factorized_layers]
    assert all("whitened" in e.info["factors"] for e in aware.plan.factorized_layers)
    assert aware.plan.config["data_aware"]
    held_out = {"x": _smooth_inputs(99, 32)}
    reference = ort_run(plain.dense, held_out)["y"]
    errors = {}
    for name, result in (("plain", plain), ("aware", aware)):
        out = ort_run(result.model, held_out)["y"]
        errors[name] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
    assert errors["aware"] < 0.2 * errors["plain"]


def test_data_aware_full_rank_is_exact() -> None:
    graph = analyze_onnx(hand_graph())
    plan = plan_onnx(graph, "svd", ratio=1.5, round_to=1, min_rank=1, min_share=0.0)
    _full_rank(plan)
    model = apply_onnx_plan(graph, plan, data=_smooth_inputs(0, 8))
    agreement, _, _ = onnx_agreement(graph.model, model, graph.specs)
    assert agreement["rel_l2"] < EXACT


def test_compress_run_with_a_folder_of_npy_inputs(tmp_path: Path) -> None:
    import json

    from compress.cli import main

    model_path = tmp_path / "hand.onnx"
    onnx.save_model(hand_graph(), str(model_path))
    data = tmp_path / "inputs"
    data.mkdir()
    np.save(data / "a.npy", _smooth_inputs(0, 8))
    np.save(data / "b.npy", _smooth_inputs(1, 3)[0])  # one input without the batch axis
    run_dir = tmp_path / "run"
    argv = ["run", "--model", str(model_path), "--method", "svd", "--ratio", "1.5", "--round-to", "1"]
    assert main([*argv, "--min-rank", "1", "--data", str(data), "--run-dir", str(run_dir)]) == 0
    plan = json.loads((run_dir / "plan.json").read_text())
    assert any("whitened" in e["info"].get("factors", "") for e in plan["layers"])
    from export.__main__ import main as export_main

    assert export_main(["onnx", "--run-dir", str(run_dir)]) == 0
    parity = json.loads((run_dir / "parity.json").read_text())
    assert parity["compressed_on_data"]["n"] == 9
    assert 0 < parity["compressed_on_data"]["rel_l2"] < parity["compressed"]["rel_l2"]  # fits the data it saw
    np.save(data / "c.npy", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(UserInputError, match=r"expected finite inputs of shape \[n, 3, 16, 16\]"):
        main([*argv, "--min-rank", "1", "--data", str(data), "--run-dir", str(tmp_path / "run2")])
