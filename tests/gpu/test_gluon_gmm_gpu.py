"""The warp-specialized Gluon grouped GEMMs (moetron/ops/_gluon_gmm.py) on an H100: bitwise the `tl` kernels'
results (same k-steps, same accumulation order, one rounding) and within the rounding of a float64 reference, with
empty groups, groups that end inside either 64-row half of a tile (m-grouped) or inside a 32-row step (the weight
gradient), rows past the last group (zeroed or left; inf and NaN where only a missed mask would read them),
counts and cumulative ends, both weight layouts, bf16 and fp16, and the weight gradient plain and accumulating.
Outputs start as NaN, so an element the kernel should write and does not fails."""

import contextlib
import importlib
import os

import pytest
import torch

from moetron.ops import _gluon_gmm

G = importlib.import_module("moetron.ops.gmm")  # the module (moetron.ops.gmm is also the function's name)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0)
                                or _gluon_gmm.gluon is None, reason="needs an sm_90 GPU and Triton's Gluon")


def _reference(x, w, counts, trans_w, num_rows):
    out = torch.zeros(num_rows, w.shape[1] if trans_w else w.shape[2], dtype=torch.float64, device=x.device)
    start = 0
    for g, c in enumerate(counts):
        wg = w[g].double()
        out[start:start + c] = x[start:start + c].double() @ (wg.T if trans_w else wg)
        start += c
    return out


@contextlib.contextmanager
def _gluon(on: bool):
    """MOETRON_GLUON set to ``on`` inside; launch plans cleared on the way in and out, since a plan made under the
    other setting would replay its kernel."""
    old = os.environ.get("MOETRON_GLUON")
    os.environ["MOETRON_GLUON"] = "1" if on else "0"
    plans = (G._FWD_PLANS, G._GATED_PLANS, G._WGRAD_PLANS)
    for p in plans:
        p.clear()
    try:
        yield
    finally:
        for p in plans:
            p.clear()
        if old is None:
            os.environ.pop("MOETRON_GLUON")
        else:
            os.environ["MOETRON_GLUON"] = old


def _run(x, w, sizes, are_ends, trans_w, zero_tail, gluon: bool):
    out = torch.full((x.shape[0], w.shape[1] if trans_w else w.shape[2]), float("nan"), dtype=x.dtype,
                     device=x.device)
    with _gluon(gluon):
        G._run_gmm(x, w, None, G._Groups(sizes, are_ends, x.shape[0], zero_tail=zero_tail), out, trans_w)
    return out


@pytest.mark.parametrize("trans_w", [True, False])
@pytest.mark.parametrize("are_ends", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_gmm_matches_tl_bitwise_and_float64(trans_w, are_ends, dtype):
    torch.manual_seed(0)
    counts = [0, 5, 64, 65, 128, 129, 0, 300, 1, 63, 191, 0]  # ends in either half of a tile, empty groups
    K, N = 192, 320  # N not a multiple of the 256-column tile
    tail = 37  # rows past the last group
    M = sum(counts) + tail
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(len(counts), N, K, device="cuda", dtype=dtype) if trans_w else \
        torch.randn(len(counts), K, N, device="cuda", dtype=dtype)
    counts_t = torch.tensor(counts, device="cuda")
    sizes = counts_t.cumsum(0) if are_ends else counts_t.to(torch.int32)
    assert _gluon_gmm.eligible(x, w, torch.empty(M, N, device="cuda", dtype=dtype), False, False, False)
    ref = _reference(x, w, counts, trans_w, M)
    for zero_tail in (True, False):
        got = _run(x, w, sizes, are_ends, trans_w, zero_tail, gluon=True)
        want = _run(x, w, sizes, are_ends, trans_w, zero_tail, gluon=False)
        rows = sum(counts)
        assert torch.equal(got[:rows], want[:rows])
        err = ((got[:rows].double() - ref[:rows]).abs() / (ref[:rows].abs() + 1)).max().item()
        assert err < 1e-2, err
        if zero_tail:
            assert torch.equal(got[rows:], torch.zeros_like(got[rows:]))
        else:  # left as they were
            assert torch.isnan(got[rows:]).all()


def test_gluon_gmm_is_used_by_the_layer_shapes_and_not_elsewhere():
    x = torch.empty(8192, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.empty(128, 2048, 768, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(8192, 2048, device="cuda", dtype=torch.bfloat16)
    assert _gluon_gmm.eligible(x, w, out, False, False, False)
    assert not _gluon_gmm.eligible(x, w, out, True, False, False)  # bias
    assert not _gluon_gmm.eligible(x, w, out, False, True, False)  # row gather
    assert not _gluon_gmm.eligible(x, w, out, False, False, True)  # decode-sized rows
    assert not _gluon_gmm.eligible(x.float(), w.float(), out.float(), False, False, False)
    x700 = torch.empty(8192, 700, device="cuda", dtype=torch.bfloat16)
    w700 = torch.empty(128, 2048, 700, device="cuda", dtype=torch.bfloat16)
    assert not _gluon_gmm.eligible(x700, w700, out, False, False, False)  # K not a multiple of 64
    x4k = torch.empty(4096, 4096, device="cuda", dtype=torch.bfloat16)
    mixtral_up = torch.empty(8, 4096, 14336, device="cuda", dtype=torch.bfloat16)  # [G, K, N], 58M per group
    assert not _gluon_gmm.eligible(x4k, mixtral_up, torch.empty(4096, 14336, device="cuda", dtype=torch.bfloat16),
                                   False, False, False)


def test_a_triton_whose_gluon_does_not_compile_falls_back_to_the_tl_kernel(monkeypatch):
    """A Gluon API other than the one the kernel was written for fails at its first compile, before anything runs:
    gmm then computes the call (and every later one) with the tl kernel, and warns once."""
    torch.manual_seed(0)
    x = torch.randn(1000, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 256, 128, device="cuda", dtype=torch.bfloat16)
    counts = torch.tensor([300, 0, 500, 200], device="cuda", dtype=torch.int32)

    class _NeverCompiles:
        _compiled: dict = {}

        def __call__(self, *args, **kwargs):
            raise TypeError("warp_specialize() got an unexpected keyword argument")

    monkeypatch.setattr(_gluon_gmm, "_launch_ws", _NeverCompiles())
    monkeypatch.setattr(_gluon_gmm, "_unsupported", None)
    want = _run(x, w, counts, False, True, True, gluon=False)
    with pytest.warns(RuntimeWarning, match="does not compile"):
        got = _run(x, w, counts, False, True, True, gluon=True)
    assert torch.equal(got, want)
    assert _gluon_gmm._unsupported and not _gluon_gmm.eligible(x, w, got, False, False, False)


def _run_gated(x, w, groups, scale, store_h, gluon: bool):
    h = torch.full((x.shape[0], w.shape[1]), float("nan"), dtype=x.dtype, device=x.device) if store_h else None
    with _gluon(gluon):
        a = G.gmm_gated(x, w, groups, "swiglu", scale, h_out=h)
    return a, h


@pytest.mark.parametrize("are_ends", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
def test_gluon_gated_gmm_matches_tl_bitwise_and_float64(are_ends, with_scale):
    """The first expert GEMM with SwiGLU in its epilogue: a and h bitwise the tl kernel's, with h stored
    (training: full 64-row halves through TMA, halves at a group's end by pointer stores) and without."""
    torch.manual_seed(0)
    counts = [0, 5, 64, 65, 128, 129, 0, 300, 1, 63, 191, 0]
    K, F = 192, 256  # two 128-column tiles of a
    rows = sum(counts)
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(len(counts), 2 * F, K, device="cuda", dtype=torch.bfloat16)
    counts_t = torch.tensor(counts, device="cuda")
    sizes = counts_t.cumsum(0) if are_ends else counts_t.to(torch.int32)
    scale = torch.rand(rows, device="cuda") if with_scale else None
    assert _gluon_gmm.gated_eligible(x, w, "swiglu", False, False)
    groups = G._Groups(sizes, are_ends, rows)
    for store_h in (True, False):
        a, h = _run_gated(x, w, groups, scale, store_h, gluon=True)
        a_tl, h_tl = _run_gated(x, w, groups, scale, store_h, gluon=False)
        assert torch.isfinite(a).all() and torch.equal(a, a_tl)
        if store_h:
            assert torch.isfinite(h).all() and torch.equal(h, h_tl)
    h_ref = _reference(x, w, counts, True, rows)
    a_ref = torch.nn.functional.silu(h_ref[:, :F]) * h_ref[:, F:]
    if with_scale:
        a_ref = a_ref * scale.double()[:, None]
    err = ((a.double() - a_ref).abs() / (a_ref.abs() + 1)).max().item()
    assert err < 2e-2, err


def test_gluon_gated_gmm_eligibility():
    x = torch.empty(8192, 2048, device="cuda", dtype=torch.bfloat16)
    qwen3 = torch.empty(128, 1536, 2048, device="cuda", dtype=torch.bfloat16)
    olmoe = torch.empty(64, 2048, 2048, device="cuda", dtype=torch.bfloat16)
    assert _gluon_gmm.gated_eligible(x, qwen3, "swiglu", False, False)
    assert not _gluon_gmm.gated_eligible(x, qwen3, "geglu", False, False)
    assert not _gluon_gmm.gated_eligible(x, qwen3, "swiglu", True, False)  # row gather (inference)
    assert not _gluon_gmm.gated_eligible(x, olmoe, "swiglu", False, False)  # measured level: the tl kernel
    assert not _gluon_gmm.gated_eligible(x, torch.empty(128, 1408, 2048, device="cuda", dtype=torch.bfloat16),
                                         "swiglu", False, False)  # F = 704, not a multiple of 128


def _run_wgrad(a, b, sizes, are_ends, out0, accumulate, gluon: bool):
    out = out0.clone() if accumulate else torch.full_like(out0, float("nan"))
    with _gluon(gluon):
        G._run_gmm_k(a, b, G._Groups(sizes, are_ends, a.shape[0]), out, accumulate)
    return out


@pytest.mark.parametrize("are_ends", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(384, 512), (128, 200)])  # (KA, NB): NB not a multiple of the 256-column tile
def test_gluon_weight_gradient_matches_tl_bitwise_and_float64(are_ends, dtype, shape):
    """out[g] (+)= a[rows of g]^T @ b[rows of g]. Groups end inside a 32-row step, on its boundary and in the first
    row of one; empty groups (their gradient is zero, or the stored one unchanged); rows past the last group hold
    inf in a and NaN in b, which any contribution of theirs would spread."""
    torch.manual_seed(0)
    KA, NB = shape
    counts = [0, 5, 32, 33, 64, 0, 300, 1, 95, 0, 17]
    rows = sum(counts)
    M = rows + 29
    a = torch.randn(M, KA, device="cuda", dtype=dtype)
    b = torch.randn(M, NB, device="cuda", dtype=dtype)
    a[rows:] = float("inf")
    b[rows:] = float("nan")
    counts_t = torch.tensor(counts, device="cuda")
    sizes = counts_t.cumsum(0) if are_ends else counts_t.to(torch.int32)
    out0 = torch.randn(len(counts), KA, NB, device="cuda", dtype=dtype)
    assert _gluon_gmm.k_eligible(a, b, out0, False)
    ref = torch.zeros(len(counts), KA, NB, dtype=torch.float64, device="cuda")
    start = 0
    for g, c in enumerate(counts):
        ref[g] = a[start:start + c].double().T @ b[start:start + c].double()
        start += c
    for accumulate in (False, True):
        got = _run_wgrad(a, b, sizes, are_ends, out0, accumulate, gluon=True)
        want = _run_wgrad(a, b, sizes, are_ends, out0, accumulate, gluon=False)
        assert torch.equal(got, want)
        expect = ref + out0.double() if accumulate else ref
        err = ((got.double() - expect).abs() / (expect.abs() + 1)).max().item()
        assert err < 1e-2, err
        assert torch.equal(got[0], out0[0] if accumulate else torch.zeros_like(out0[0]))  # an empty group


def test_gluon_weight_gradient_eligibility():
    def bf(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="cuda", dtype=dtype)

    dh, x = bf(65536, 1536), bf(65536, 2048)
    assert _gluon_gmm.k_eligible(dh, x, bf(128, 1536, 2048), False)  # Qwen3-30B's up projection
    assert _gluon_gmm.k_eligible(x, bf(65536, 768), bf(128, 2048, 768), False)  # and its down projection
    assert not _gluon_gmm.k_eligible(dh, x, bf(128, 1536, 2048), True)  # decode-sized rows
    assert not _gluon_gmm.k_eligible(dh, x, bf(128, 1536, 2048, dtype=torch.float32), False)  # fp32 main_grad
    assert not _gluon_gmm.k_eligible(bf(65536, 1344), x, bf(128, 1344, 2048), False)  # KA not a multiple of 128
    assert not _gluon_gmm.k_eligible(bf(4096, 4096), bf(4096, 14336), bf(1, 4096, 14336), False)  # Mixtral-sized
    assert not _gluon_gmm.k_eligible(bf(65536, 2049)[:, 1:], x, bf(128, 2048, 2048), False)  # rows misaligned
    assert not _gluon_gmm.k_eligible(dh, x, bf(128, 2048, 1536).transpose(1, 2), False)  # out not contiguous
