"""Hyena's long convolution by chunks (model.hyena.chunked_modal_conv, the parallel form's default)
computes the modal recurrence s_t = lambda s_{t-1} + u_t, y_t = Re(R . s_t): outputs, final
state and gradients, from a zero or a given state, for any chunk that divides the length; the
mixer's pieces of other lengths take the FFT path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import hyena
from model.config import ModelConfig
from model.hyena import HyenaMixer, chunked_modal_conv

D, N = 6, 4


def filters(gen: torch.Generator) -> list[torch.Tensor]:
    """log|lambda| (slow and fast decays), arg lambda, residues: float64, (D, N) each."""
    log_mag = -(torch.rand(D, N, generator=gen, dtype=torch.float64) ** 3) * 2 - 1e-3
    theta = torch.rand(D, N, generator=gen, dtype=torch.float64) * torch.pi
    r_re, r_im = torch.randn(2, D, N, generator=gen, dtype=torch.float64)
    return [log_mag, theta, r_re, r_im]


def recurrence(
    u: torch.Tensor, log_mag: torch.Tensor, theta: torch.Tensor, r_re: torch.Tensor,
    r_im: torch.Tensor, s_re: torch.Tensor, s_im: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The decode form, byte by byte: u (B, D, T) -> y (B, D, T), final s_re, s_im."""
    l_re, l_im = log_mag.exp() * theta.cos(), log_mag.exp() * theta.sin()
    ys = []
    for t in range(u.shape[-1]):
        s_re, s_im = l_re * s_re - l_im * s_im + u[..., t, None], l_re * s_im + l_im * s_re
        ys.append((r_re * s_re - r_im * s_im).sum(-1))
    return torch.stack(ys, -1), s_re, s_im


@settings(max_examples=25, deadline=None)
@given(
    chunk=st.sampled_from([1, 4, 16, 64]),
    chunks=st.integers(1, 6),
    batch=st.integers(1, 3),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_conv_is_the_recurrence(
    chunk: int, chunks: int, batch: int, with_state: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    T = chunk * chunks
    u = torch.randn(batch, D, T, generator=gen, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in filters(gen)]
    s0 = [torch.randn(batch, D, N, generator=gen, dtype=torch.float64) for _ in range(2)]
    if with_state:
        s0 = [s.requires_grad_() for s in s0]
        state = {"s_re": s0[0], "s_im": s0[1]}
    else:
        s0 = [torch.zeros_like(s) for s in s0]
    y, new = chunked_modal_conv(u, *params, state if with_state else None, True, chunk)
    y_ref, re_ref, im_ref = recurrence(u, *params, *s0)
    for got, want in ((y, y_ref), (new["s_re"], re_ref), (new["s_im"], im_ref)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    leaves = [u, *params, *(s0 if with_state else [])]
    w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((y * w).sum() + new["s_re"].sum() - new["s_im"].sum(), leaves)
    refs = torch.autograd.grad((y_ref * w).sum() + re_ref.sum() - im_ref.sum(), leaves)
    for g, r in zip(grads, refs, strict=True):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("T", [128, 100])
def test_the_mixer_takes_the_chunks_or_the_fft_and_they_agree(
    T: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float32, the model's own filter: chunks (T a multiple of CHUNK) and FFT within float32
    error; at other lengths the chunked setting runs the FFT itself."""
    torch.manual_seed(0)
    mixer = HyenaMixer(ModelConfig.named("tiny"))
    x = torch.randn(2, T, mixer.d)
    state = {k: torch.randn(2, *shape) for k, shape in mixer.state_shapes().items()}
    out = {}
    for path in ("chunked", "fft"):
        monkeypatch.setattr(hyena, "LONG_CONV", path)
        out[path] = mixer(x, state, True)
    (y_c, new_c), (y_f, new_f) = out["chunked"], out["fft"]
    if T % hyena.CHUNK:
        assert torch.equal(y_c, y_f)
    else:
        assert not torch.equal(y_c, y_f), "the chunked path ran"
    assert torch.allclose(y_c, y_f, rtol=1e-4, atol=1e-5)
    for k in new_f:
        assert torch.allclose(new_c[k], new_f[k], rtol=1e-4, atol=1e-5)
