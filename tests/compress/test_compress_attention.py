"""Attention: nn.MultiheadAttention is unfused into stock Linear projections, factorized with SVD, exported to ONNX.

A tiny torchvision ViT (32×32 input, 16×16 patches, 2 layers, 2 heads, width 64) stands in for vit_b_16:
the same modules, 5 tokens instead of 197.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from compress.attention import UnfusedMultiheadAttention, fused_attention_reason, unfuse_attention_, unfused_view
from compress.methods import get_method
from compress.planning import common_skip_reason

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-inits the head: outputs would all be 0
    return model.eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 24])
@pytest.mark.parametrize(
    "masks", ["none", "key_padding", "float_attn", "bool_attn+key_padding", "per_head_weights", "no_weights"]
)
def test_unfused_attention_matches_multihead_attention(batch_first: bool, kdim: int | None, masks: str) -> None:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    unfused = UnfusedMultiheadAttention.from_mha(mha)
    assert all(type(getattr(unfused, p)) is nn.Linear for p in PROJECTIONS)
    q = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    kv = torch.randn(2, 7, kdim or 32) if batch_first else torch.randn(7, 2, kdim or 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, -2:] = True
    attn_mask = torch.randn(5, 7)
    kwargs = {
        "none": {},
        "key_padding": {"key_padding_mask": padding},
        "float_attn": {"attn_mask": attn_mask},
        "bool_attn+key_padding": {"attn_mask": attn_mask > 1.0, "key_padding_mask": padding},
        "per_head_weights": {"average_attn_weights": False},
        "no_weights": {"need_weights": False},
    }[masks]
    with torch.no_grad():
        out, weights = mha(q, kv, kv, **kwargs)
        out_u, weights_u = unfused(q, kv, kv, **kwargs)
    torch.testing.assert_close(out_u, out, atol=1e-6, rtol=1e-5)
    if weights is None:
        assert weights_u is None
    else:
        torch.testing.assert_close(weights_u, weights, atol=1e-6, rtol=1e-5)


def test_unfused_attention_unbatched_input() -> None:
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 2).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref, ref_w = mha(x, x, x)
        out, w = UnfusedMultiheadAttention.from_mha(mha)(x, x, x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)


def test_unfused_view_leaves_the_model_alone_and_reproduces_it() -> None:
    model = _tiny_vit()
    view = unfused_view(model)
    assert view is not model
    assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention)
    assert isinstance(view.encoder.layers[0].self_attention, UnfusedMultiheadAttention)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x), atol=1e-6, rtol=1e-5)
    plain = nn.Sequential(nn.Linear(4, 4))
    assert unfused_view(plain) is plain


def test_svd_factorizes_every_attention_projection_of_a_vit() -> None:
    """The issue's case: svd planned out_proj as 'not reached by the forward pass' and never saw in_proj."""
    model = _tiny_vit()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    method = get_method("svd")
    plan = method.compress_(model, method.config_type(method="svd", ratio=1.5), x)
    by_path = {e.path: e for e in plan.layers}
    for i in range(2):
        for proj in PROJECTIONS:
            entry = by_path[f"encoder.layers.encoder_layer_{i}.self_attention.{proj}"]
            assert entry.action == "linear-svd", (entry.path, entry.reason)
            assert entry.shape == [64, 64]
            assert entry.out_hw == [5, 1]  # 4 patches + the class token per image
    assert not any("not reached" in (e.reason or "") for e in plan.layers)
    assert plan.target["achieved_ratio"] == pytest.approx(117_322 / plan.totals["params_after"])
    assert plan.totals["params_before"] == 117_322
    assert isinstance(model.encoder.layers[0].self_attention, UnfusedMultiheadAttention)
    assert isinstance(model.encoder.layers[0].self_attention.q_proj, nn.Sequential)

    # A saved plan rebuilds the same model from a fresh dense one (the applier unfuses first).
    rebuilt = method.rebuild_(copy.deepcopy(dense), plan)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-6, rtol=1e-5)


def test_full_rank_attention_svd_reproduces_the_vit() -> None:
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    method = get_method("svd")
    plan = method.plan(model, method.config_type(method="svd", ratio=1.2), x)
    for entry in plan.factorized_layers:
        entry.ranks = [min(entry.shape)]
    method.apply_(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)


def test_attention_svd_exports_to_plain_onnx_with_parity() -> None:
    pytest.importorskip("onnxruntime")
    from export.onnx import onnx_from_torch
    from export.parity import check_onnx_parity

    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    method = get_method("svd")
    method.compress_(model, method.config_type(method="svd", ratio=1.5), x)
    proto = onnx_from_torch(model, x)
    ops = {n.op_type for n in proto.graph.node}
    assert "Attention" not in ops
    assert "MultiHeadAttention" not in ops
    assert {"MatMul", "Softmax"} <= ops
    result = check_onnx_parity(model, proto, input_shape=(2, 3, 32, 32), atol=1e-3, rtol=1e-3)
    assert result.passed
    assert result.max_abs < 1e-4


def test_fused_attention_keeps_out_proj_with_the_true_reason() -> None:
    """add_bias_kv has no unfused twin: its out_proj stays dense, and the plan says why (not 'not reached')."""
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(64, 2, add_bias_kv=True, batch_first=True)
    assert unfuse_attention_(nn.Sequential(mha)) == []
    reason = common_skip_reason(mha.out_proj, "attn.out_proj", None)
    assert reason is not None
    assert "F.multi_head_attention_forward" in reason
    assert fused_attention_reason(nn.Linear(4, 4)) is None

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha
            self.fc = nn.Linear(64, 256)
            self.fc2 = nn.Linear(256, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc(self.attn(x, x, x, need_weights=False)[0]))

    method = get_method("svd")
    plan = method.plan(Block().eval(), method.config_type(method="svd", ratio=1.2), torch.randn(2, 6, 64))
    entry = next(e for e in plan.layers if e.path == "attn.out_proj")
    assert entry.action == "keep"
    assert "F.multi_head_attention_forward" in entry.reason
