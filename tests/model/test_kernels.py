"""The fast kernels against their references: the chunkwise-parallel delta rule against one byte
at a time, and the FFT causal convolution against the direct one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model.delta import delta_rule_chunked, delta_rule_recurrent, delta_rule_step
from model.hyena import direct_causal_conv, fft_causal_conv

SETTINGS = settings(max_examples=100, deadline=None)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


@st.composite
def delta_inputs(draw: st.DrawFn) -> dict[str, object]:
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T = draw(st.integers(1, 70))
    dk, dv = draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.sampled_from([1, 2, 4, 8, 16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    decay = draw(st.sampled_from(["slow", "mixed", "fast"]))  # how far a falls below 1
    log_a = {
        "slow": -1e-3 * torch.rand(B, H, T, generator=gen),
        "mixed": F.logsigmoid(3 * torch.randn(B, H, T, generator=gen)),
        "fast": -20 * torch.rand(B, H, T, generator=gen),
    }[decay]
    b = torch.rand(B, H, T, generator=gen)
    k = torch.randn(B, H, T, dk, generator=gen)
    if draw(st.booleans()):  # full-strength writes of near-identical keys: the hardest solve
        b = torch.ones_like(b)
        k = k[:, :, :1] + 0.01 * k
    k = F.normalize(k, dim=-1)
    return {
        "q": F.normalize(torch.randn(B, H, T, dk, generator=gen), dim=-1),
        "k": k,
        "v": torch.randn(B, H, T, dv, generator=gen),
        "log_a": log_a,
        "b": b,
        "S": torch.randn(B, H, dv, dk, generator=gen) if draw(st.booleans()) else None,
        "chunk": draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 32, 64])),  # mostly not dividing T
    }


@SETTINGS
@given(inputs=delta_inputs())
def test_delta_chunked_equals_recurrent(inputs: dict) -> None:
    x = dict(inputs)
    chunk, S0 = x.pop("chunk"), x.pop("S")
    B, H, _, dk = x["k"].shape
    dv = x["v"].shape[-1]
    ref_o, ref_S = delta_rule_recurrent(
        **x, S=torch.zeros(B, H, dv, dk) if S0 is None else S0.clone()
    )
    o, S = delta_rule_chunked(**x, S=S0, chunk=chunk)
    assert o.shape == ref_o.shape and S.shape == ref_S.shape
    assert max_diff(o, ref_o) <= 1e-4
    assert max_diff(S, ref_S) <= 1e-4


@SETTINGS
@given(inputs=delta_inputs(), split=st.integers(1, 69))
def test_delta_chunked_carries_state(inputs: dict, split: int) -> None:
    """Two chunked calls with the state carried between them equal one call."""
    x = dict(inputs)
    chunk, S0 = x.pop("chunk"), x.pop("S")
    T = x["k"].shape[2]
    split = split % T or T
    whole_o, whole_S = delta_rule_chunked(**x, S=S0, chunk=chunk)
    first = {n: t[:, :, :split] for n, t in x.items()}
    rest = {n: t[:, :, split:] for n, t in x.items()}
    o1, S1 = delta_rule_chunked(**first, S=S0, chunk=chunk)
    o2, S2 = delta_rule_chunked(**rest, S=S1, chunk=chunk) if split < T else (o1[:, :, :0], S1)
    assert max_diff(torch.cat([o1, o2], 2), whole_o) <= 1e-4
    assert max_diff(S2, whole_S) <= 1e-4


def test_delta_step_is_the_rule() -> None:
    """S' = a S (I - b k k^T) + b v k^T and o = S' q, written out with explicit matrices."""
    torch.manual_seed(0)
    B, H, dk, dv = 2, 3, 4, 5
    q, k = F.normalize(torch.randn(B, H, dk), dim=-1), F.normalize(torch.randn(B, H, dk), dim=-1)
    v, a, b = torch.randn(B, H, dv), torch.rand(B, H), torch.rand(B, H)
    S = torch.randn(B, H, dv, dk)
    o, S1 = delta_rule_step(q, k, v, a, b, S)
    eye = torch.eye(dk).expand(B, H, dk, dk)
    kkT = k.unsqueeze(-1) @ k.unsqueeze(-2)
    want = a[..., None, None] * S @ (eye - b[..., None, None] * kkT) + b[..., None, None] * (
        v.unsqueeze(-1) @ k.unsqueeze(-2)
    )
    torch.testing.assert_close(S1, want)
    torch.testing.assert_close(o, (want @ q.unsqueeze(-1)).squeeze(-1))


@SETTINGS
@given(
    B=st.integers(1, 3),
    D=st.integers(1, 6),
    T=st.integers(1, 300),
    decay=st.sampled_from([5.0, 50.0, 1e9]),  # timescale of |h|: short, long, none
    seed=st.integers(0, 2**31 - 1),
)
def test_fft_conv_equals_direct(B: int, D: int, T: int, decay: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, D, T, generator=gen)
    h = torch.randn(D, T, generator=gen) * torch.exp(-torch.arange(T) / decay)
    y = fft_causal_conv(u, h)
    ref = direct_causal_conv(u, h)
    assert y.shape == ref.shape == (B, D, T)
    assert y.dtype == u.dtype
    scale = max(1.0, ref.abs().max().item())
    assert max_diff(y, ref) <= 1e-5 * scale * max(1.0, T**0.5)


def test_fft_conv_is_causal() -> None:
    """Changing u at position s changes no output before s."""
    torch.manual_seed(0)
    u, h = torch.randn(1, 3, 64), torch.randn(3, 64)
    v = u.clone()
    v[..., 40:] += torch.randn(1, 3, 24)
    assert max_diff(fft_causal_conv(u, h)[..., :40], fft_causal_conv(v, h)[..., :40]) <= 1e-5
