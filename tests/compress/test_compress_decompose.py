"""Each factorization at full rank reproduces its layer; exact-rank kernels are recovered at that rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import decompose
from compress.factorizations import FACTORIZATIONS, LayerGeometry, dense_macs, factorization

CONV_CASES = [
    # (in, out, kernel, stride, padding, dilation, bias)
    (6, 10, (3, 3), 1, 1, 1, True),
    (8, 12, (3, 3), 2, 1, 1, False),
    (5, 7, (3, 3), 1, 0, 1, True),
    (6, 9, (3, 3), 1, 2, 2, False),
    (4, 6, (3, 5), (2, 1), (1, 2), 1, True),
    (7, 5, (5, 5), 2, 2, 1, True),
]
FULL_RANK_METHODS = ["svd", "tai", "tucker2"]


def _conv(case: tuple) -> nn.Conv2d:
    cin, cout, k, stride, pad, dil, bias = case
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, bias=bias).double()
    return conv.eval()


@pytest.mark.parametrize("method", FULL_RANK_METHODS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}-d{c[5]}-b{c[6]}")
def test_full_rank_chain_reproduces_conv(method: str, case: tuple) -> None:
    conv = _conv(case)
    fact = factorization(method)
    chain, rel_error = fact.decompose(conv, fact.max_ranks(conv))
    x = torch.randn(2, case[0], 13, 12, dtype=torch.float64)
    with torch.no_grad():
        ref, out = conv(x), chain(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rel_error < 1e-6
    assert all(isinstance(m, nn.Conv2d) for m in chain)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_svd_full_rank(stride: int) -> None:
    conv = nn.Conv2d(12, 20, 1, stride=stride, bias=True).double().eval()
    fact = factorization("pointwise-svd")
    chain, _ = fact.decompose(conv, fact.max_ranks(conv))
    x = torch.randn(2, 12, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(chain(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_svd_full_rank(bias: bool) -> None:
    lin = nn.Linear(30, 17, bias=bias).double()
    fact = factorization("linear-svd")
    chain, rel = fact.decompose(lin, fact.max_ranks(lin))
    x = torch.randn(4, 30, dtype=torch.float64)
    torch.testing.assert_close(chain(x), lin(x), rtol=1e-5, atol=1e-5)
    assert rel < 1e-10


def _low_rank_kernel(method: str, shape: tuple[int, int, int, int], ranks: tuple[int, ...]) -> torch.Tensor:
    t, s, kh, kw = shape
    g = torch.Generator().manual_seed(1)
    if method == "svd":
        (r,) = ranks
        return (
            torch.randn(t, r, generator=g, dtype=torch.float64)
            @ torch.randn(r, s * kh * kw, generator=g, dtype=torch.float64)
        ).reshape(shape)
    if method == "tai":
        (r,) = ranks
        mat = torch.randn(kh * s, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, kw * t, generator=g, dtype=torch.float64
        )
        return decompose.fold_spatial(mat, shape)
    if method == "tucker2":
        r_t, r_s = ranks
        core = torch.randn(r_t, r_s, kh, kw, generator=g, dtype=torch.float64)
        u_t = torch.linalg.qr(torch.randn(t, r_t, generator=g, dtype=torch.float64))[0]
        u_s = torch.linalg.qr(torch.randn(s, r_s, generator=g, dtype=torch.float64))[0]
        return torch.einsum("rqkl,tr,sq->tskl", core, u_t, u_s)
    if method == "cp":
        (r,) = ranks
        a, b, c, d = (torch.randn(n, r, generator=g, dtype=torch.float64) for n in (t, s, kh, kw))
        return torch.einsum("tr,sr,hr,wr->tshw", a, b, c, d)
    raise AssertionError(method)


@pytest.mark.parametrize(("method", "ranks"), [("svd", (5,)), ("tai", (4,)), ("tucker2", (6, 4)), ("cp", (3,))])
def test_exact_rank_kernel_is_recovered(method: str, ranks: tuple[int, ...]) -> None:
    shape = (16, 12, 3, 3)
    conv = nn.Conv2d(12, 16, 3, padding=1, bias=False).double().eval()
    with torch.no_grad():
        conv.weight.copy_(_low_rank_kernel(method, shape, ranks))
    fact = factorization(method)
    chain, rel_error = fact.decompose(conv, ranks)
    x = torch.randn(2, 12, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(chain(x), conv(x), rtol=1e-5, atol=1e-5)
    assert rel_error < 1e-5


def test_tai_fold_inverts_unfold() -> None:
    w = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    mat = decompose.unfold_spatial(w)
    assert mat.shape == (3 * 4, 2 * 5)
    assert mat[2 * 4 + 1, 1 * 5 + 3] == w[3, 1, 2, 1]
    torch.testing.assert_close(decompose.fold_spatial(mat, tuple(w.shape)), w, rtol=0, atol=0)


def test_hooi_never_worse_than_hosvd() -> None:
    w = torch.randn(32, 24, 3, 3, dtype=torch.float64)
    hosvd = decompose.tucker2(w, (12, 10), hooi_iters=0)
    hooi = decompose.tucker2(w, (12, 10), hooi_iters=20)
    assert hooi.rel_error <= hosvd.rel_error + 1e-12
    assert hooi.iterations >= 1
    recon = torch.einsum("rqkl,tr,sq->tskl", hooi.core, hooi.last[:, :, 0, 0], hooi.first[:, :, 0, 0].T)
    assert abs(float((recon - w).norm() / w.norm()) - hooi.rel_error) < 1e-9


@pytest.mark.parametrize("method", sorted(FACTORIZATIONS))
def test_cost_formulas_match_the_built_chain(method: str) -> None:
    """params() equals the chain's parameter count and macs() equals torch's flop counter."""
    from compress.metrics import count_macs

    if method == "linear-svd":
        layer: nn.Module = nn.Linear(40, 24)
        x = torch.randn(1, 40)
        geom = LayerGeometry()
        ranks = (8,)
    else:
        k = (1, 1) if method == "pointwise-svd" else (3, 3)
        layer = nn.Conv2d(16, 24, k, stride=2, padding=k[0] // 2)
        x = torch.randn(1, 16, 15, 15)
        out = layer(x)
        geom = LayerGeometry(in_hw=(15, 15), out_hw=tuple(out.shape[-2:]))
        ranks = (8, 6) if method == "tucker2" else (8,)
    fact = factorization(method)
    chain = fact.build(layer, ranks)
    assert fact.params(layer, ranks) == sum(p.numel() for p in chain.parameters())
    assert fact.macs(layer, ranks, geom) == count_macs(chain, x)
    assert dense_macs(layer, geom) == count_macs(layer, x)
