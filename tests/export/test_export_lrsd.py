"""ONNX export of low-rank + sparse (LRSD) models: plain Conv/Gemm/Add graphs, ORT parity, sparse initializers."""

from __future__ import annotations

import onnx
import pytest
import torch
from export_helpers import op_counts, ort_run
from torch import nn

from compress.methods.lrsd import LowRankSparse, LowRankSparseConfig, lrsd_compress_
from export import check_onnx_parity, onnx_from_torch, optimize
from export.sparse import sparse_summary, sparsify_initializers

SHAPE = (1, 3, 16, 16)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.c1(x))
        x = torch.relu(self.bn(self.c2(x)) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def lrsd_case() -> tuple[nn.Module, onnx.ModelProto, dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 solves: OpenMP spinning on shared cores costs ~100×
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = _Net().eval()
            batches = [torch.randn(8, *SHAPE[1:]) for _ in range(2)]
        cfg = LowRankSparseConfig(ratio=4.0, split="fixed", rank_fraction=0.3, iters=3)
        plan = lrsd_compress_(model, cfg, torch.zeros(SHAPE), batches, model_name="net")
    finally:
        torch.set_num_threads(before)
    return model, optimize(onnx_from_torch(model, torch.zeros(SHAPE))), plan.to_dict()


def test_lrsd_exports_plain_conv_gemm_add_with_ort_parity(lrsd_case) -> None:
    model, proto, plan = lrsd_case
    assert sum(isinstance(m, LowRankSparse) for m in model.modules()) == 3  # c1, c2, fc (stem kept)
    ops = op_counts(proto)
    assert set(ops) <= {"Conv", "Add", "Relu", "BatchNormalization", "GlobalAveragePool", "Flatten", "Gemm", "MatMul"}
    # per compressed conv: k×k→r, 1×1 r→T and the sparse k×k conv, summed by one Add
    assert ops["Conv"] == 1 + 3 * 2
    result = check_onnx_parity(model, proto, input_shape=SHAPE, atol=1e-4, rtol=1e-4)
    assert result.passed
    # the exported graph stores what count_params counts: the sparse branch densely, zeros included
    params = sum(p.numel() for p in model.parameters())
    assert params == plan["totals"]["params_after_dense_storage"]


def test_sparse_initializers_shrink_the_file_and_ort_still_runs(lrsd_case) -> None:
    model, proto, plan = lrsd_case
    sparse = sparsify_initializers(proto, max_density=0.25)
    summary = sparse_summary(sparse)
    cards = [e["info"]["cardinality"] for e in plan["layers"] if e["action"] == "lrsd"]
    dense_elems = [e["info"]["m"] * e["info"]["k"] for e in plan["layers"] if e["action"] == "lrsd"]
    expected = [c for c, n in zip(cards, dense_elems, strict=True) if n >= 1024 and c <= 0.25 * n]
    assert summary["n_sparse_initializers"] == len(expected) >= 2
    assert summary["sparse_values"] == sum(expected)
    assert summary["sparse_bytes"] == pytest.approx(12 * sum(expected), rel=0.02)  # 4 B value + 8 B index
    assert sparse.ByteSize() < proto.ByteSize() - 0.5 * 4 * (summary["sparse_dense_elements"] - 3 * sum(expected))
    onnx.checker.check_model(sparse)
    x = torch.randn(SHAPE).numpy()
    (dense_out,) = ort_run(proto, x)
    (sparse_out,) = ort_run(sparse, x)
    assert abs(dense_out - sparse_out).max() == 0.0
    assert check_onnx_parity(model, sparse, input_shape=SHAPE, atol=1e-4, rtol=1e-4).passed


def test_export_cli_writes_a_sparse_initializer_copy_beside_the_dense_graph(lrsd_case, tmp_path, monkeypatch) -> None:
    """`python -m export onnx` on an LRSD run: model.onnx (dense, runs everywhere) + model.sparse.onnx (storage)."""
    import json
    import types

    import compress.artifacts as artifacts
    import export.__main__ as cli

    model = lrsd_case[0]
    dense = _Net().eval()
    run = types.SimpleNamespace(dense=dense, compressed=model, input_shape=SHAPE, info={})
    monkeypatch.setattr(artifacts, "load_run", lambda run_dir: run)
    assert cli.main(["onnx", "--run-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "parity.json").read_text())
    sparse = record["sparse_onnx"]
    assert sparse["file"] == "model.sparse.onnx"
    assert sparse["passed"] is True
    assert sparse["max_abs"] < 1e-5
    assert sparse["n_sparse_initializers"] >= 1
    assert sparse["onnx_bytes"] == (tmp_path / "model.sparse.onnx").stat().st_size < record["compressed"]["onnx_bytes"]
    # a dense run writes no sparse copy
    other = tmp_path / "dense_only"
    other.mkdir()
    run.compressed = _Net().eval()
    assert cli.main(["onnx", "--run-dir", str(other)]) == 0
    assert "sparse_onnx" not in json.loads((other / "parity.json").read_text())
    assert not (other / "model.sparse.onnx").exists()
