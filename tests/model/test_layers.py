"""ShortConv's two forms (shifted sums on a GPU or compiled, depthwise conv1d elsewhere) compute
the same function, and its recurrent step continues either; the decode projection's contract."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from model.layers import RMSNorm, ShortConv, project


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 40),
    C=st.integers(1, 24),
    K=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    with_state=st.booleans(),
)
def test_shifted_sums_equal_the_depthwise_conv(
    T: int, C: int, K: int, seed: int, with_state: bool
) -> None:
    torch.manual_seed(seed)
    conv = ShortConv(C, K)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, T, C)
    state = torch.randn(3, C, K - 1) if with_state else torch.zeros(3, C, K - 1)
    full = torch.cat([state.transpose(1, 2), x], dim=1)
    a, b = conv.shifted_sums(full, T), conv.conv(full)
    assert a.shape == b.shape == (3, T, C)
    assert torch.allclose(a, b, atol=1e-5)
    # and both are the recurrent step run byte by byte
    y, s = conv(x, state if with_state else None)
    assert torch.allclose(y, a, atol=1e-5)
    h = state
    for t in range(T):
        yt, h = conv.step(x[:, t], h)
        assert torch.allclose(yt, y[:, t], atol=1e-5)
    assert torch.equal(h, s)


def test_shifted_sums_add_in_float32_under_bf16() -> None:
    torch.manual_seed(0)
    conv = ShortConv(16, 4)
    full = torch.randn(2, 67, 16)
    want = conv.shifted_sums(full, 64)
    got = conv.shifted_sums(full.bfloat16(), 64)
    assert got.dtype == torch.bfloat16
    # only the inputs' and the result's rounding: far inside what bf16 sums would lose
    assert torch.allclose(got.float(), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize(
    "norm, glu, res",
    [(False, False, False), (True, False, False), (False, True, True), (True, False, True)],
)
def test_project_makes_its_input_and_adds_the_residual(norm: bool, glu: bool, res: bool) -> None:
    """The decode projection's contract, as its cuBLAS path computes it (the GEMV kernel is held
    to the same on a GPU: tests/model/test_fused_kernels.py): gate, then norm, then the product in
    the weight's dtype, then the residual in float32."""
    torch.manual_seed(0)
    k, n = 24, 10
    x = torch.randn(3, 2 * k if glu else k)
    w = torch.randn(n, k).to(torch.bfloat16)
    rms = RMSNorm(k)
    nn.init.uniform_(rms.weight, 0.5, 1.5)
    r = torch.randn(3, n)
    got = project(x, w, norm=rms if norm else None, glu=glu, res=r if res else None)
    h = x
    if glu:
        h = torch.nn.functional.silu(h[:, :k]) * h[:, k:]
    if norm:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + rms.eps) * rms.weight
    want = h.to(torch.bfloat16) @ w.T
    if res:
        want = r + want.float()
    assert got.dtype == (torch.float32 if res else torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
