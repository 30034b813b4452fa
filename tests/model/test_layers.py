"""ShortConv's two forms (shifted sums on a GPU or compiled, depthwise conv1d elsewhere) compute
the same function, and its recurrent step continues either."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.layers import ShortConv


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
