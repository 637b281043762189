"""moetron.gmm / moetron.gmm_k against an independent float64 per-group loop (DESIGN.md tolerance rule).

Every case runs on each available path: on a CPU machine the plain-torch backend and the Triton kernels in
Triton's interpreter (tiny shapes); on a GPU machine the Triton kernels on CUDA.
"""

import importlib
import math

import pytest
import torch

import moetron
from tests._tolerance import assert_close_to_ref

# the module, not the function of the same name that moetron.ops re-exports
gmm_module = importlib.import_module("moetron.ops.gmm")

ON_GPU = torch.cuda.is_available()
# each path: (device, MOETRON_BACKEND, MOETRON_TMA). On CUDA both kernels (TMA loads and pointer loads) run.
PATHS = {
    "cuda_tma": ("cuda", "auto", "auto"),
    "cuda_pointer": ("cuda", "auto", "0"),
} if ON_GPU else {
    "torch": ("cpu", "torch", "0"),
    "triton": ("cpu", "triton", "0"),
    "triton_tma": ("cpu", "triton", "1"),
}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """Selects the backend and kernel; returns the device tensors live on."""
    device, backend, tma = PATHS[request.param]
    monkeypatch.setenv("MOETRON_BACKEND", backend)
    monkeypatch.setenv("MOETRON_TMA", tma)
    return device


def _poison(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _ref_forward(x, w, sizes, trans_w=False, bias=None):
    """Independent reference: per-group loop in whatever dtype the inputs have; tail rows zero."""
    M = x.shape[0]
    N = w.shape[1] if trans_w else w.shape[2]
    pieces, start = [], 0
    for g, count in enumerate(sizes):
        wg = w[g].transpose(0, 1) if trans_w else w[g]
        y = x[start:start + count] @ wg
        if bias is not None:
            y = y + bias[g].to(y.dtype)
        pieces.append(y)
        start += count
    pieces.append(torch.zeros(M - start, N, dtype=x.dtype, device=x.device) + 0 * x[start:, :1].sum())
    return torch.cat(pieces)


def _make(M, K, N, G, dtype, device, trans_w=False, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype).to(device)
    w_shape = (G, N, K) if trans_w else (G, K, N)
    w = (torch.randn(*w_shape, generator=gen) / math.sqrt(max(K, 1))).to(dtype).to(device)
    b = torch.randn(G, N, generator=gen).to(dtype).to(device) if bias else None
    return x, w, b


def _random_sizes(M, G, seed, zero_frac=0.3):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(G, generator=gen) * (torch.rand(G, generator=gen) > zero_frac)
    if weights.sum() == 0:
        weights[0] = 1.0
    sizes = (weights / weights.sum() * M).floor().long()
    sizes[int(torch.argmax(weights))] += M - int(sizes.sum())
    return sizes.tolist()


# (name, sizes, M, K, N, reason). M >= sum(sizes); K and N deliberately not multiples of 16.
CASES = [
    ("g1_all_rows", [37], 37, 24, 40, "a single group owns every row"),
    ("g2_unaligned", [5, 17], 22, 37, 29, "unaligned sizes and K, N off the 16 grid"),
    ("g7_zero_first_last", [0, 3, 1, 17, 5, 9, 0], 35, 20, 33, "empty first and last groups"),
    ("g7_all_but_one_empty", [0, 0, 0, 29, 0, 0, 0], 29, 16, 16, "all rows in one middle group"),
    ("g3_all_empty", [0, 0, 0], 9, 16, 24, "every group empty: the whole output is the zero tail"),
    ("sum_below_m", [4, 0, 11], 27, 19, 21, "sizes add up to less than M: tail rows must be zeros"),
    ("m_below_tile", [3, 2, 4], 9, 32, 17, "M smaller than one tile"),
    ("g16_random", None, 70, 24, 20, "16 groups, random sizes with empties"),
    ("g128_random", None, 150, 16, 18, "128 groups: most tiles are partial"),
    ("g256_random", None, 300, 8, 16, "256 groups: deepest binary search"),
]
_CASE_G = {"g16_random": 16, "g128_random": 128, "g256_random": 256}


def _case_sizes(name, sizes, M):
    return sizes if sizes is not None else _random_sizes(M, _CASE_G[name], seed=len(name))


def _check_forward(path, sizes, M, K, N, dtype, trans_w, with_bias, as_offsets, seed):
    G = len(sizes)
    x, w, b = _make(M, K, N, G, dtype, path, trans_w, with_bias, seed=seed)
    sizes_t = torch.tensor(sizes, dtype=torch.int32)
    kwargs = {"offsets": torch.cumsum(sizes_t, 0)} if as_offsets else {"group_sizes": sizes_t}
    out = _poison((M, N), dtype, path)
    moetron.gmm(x, w, trans_w=trans_w, bias=b, out=out, **kwargs)
    ref = _ref_forward(x.double().cpu(), w.double().cpu(), sizes, trans_w, None if b is None else b.double().cpu())
    base = _ref_forward(x, w, sizes, trans_w, b)
    assert_close_to_ref("out", out, ref, base)
    assert torch.equal(out[sum(sizes):].float().cpu(), torch.zeros(M - sum(sizes), N))


@pytest.mark.parametrize("name,sizes,M,K,N,reason", CASES, ids=[c[0] for c in CASES])
def test_forward_cases_bf16(path, name, sizes, M, K, N, reason):
    sizes = _case_sizes(name, sizes, M)
    _check_forward(path, sizes, M, K, N, torch.bfloat16, trans_w=False, with_bias=False, as_offsets=False,
                   seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_w", [False, True], ids=["w_GKN", "w_GNK"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_forward_dtypes_layouts(path, dtype, trans_w, with_bias):
    # zero-size groups in the middle, unaligned sizes, a tail: all features at once, every dtype and layout
    _check_forward(path, [6, 0, 19, 1, 0, 11], 45, 33, 26, dtype, trans_w, with_bias, as_offsets=trans_w,
                   seed=2)


@pytest.mark.skipif(ON_GPU, reason="on CUDA the default configs run these epilogues")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("trans_w", [False, True], ids=["w_GKN", "w_GNK"])
def test_tma_store_flatten_epilogue(monkeypatch, dtype, trans_w):
    # Tiles wholly inside a group go out through a TMA store, tiles crossing a group's end through a masked
    # store: 16 and 32 rows fill whole 16-row tiles, 40/33/17 end mid-tile, 1 is a single-row group, and the
    # 5 tail rows must stay zero. Flattened persistent loop, bias on.
    monkeypatch.setenv("MOETRON_BACKEND", "triton")
    monkeypatch.setenv("MOETRON_TMA", "1")
    monkeypatch.setitem(gmm_module._CONFIG_OVERRIDES, "fwd",
                        dict(gmm_module._INTERPRETER_CONFIG, tma_store=True, flatten=True))
    _check_forward("cpu", [40, 0, 16, 33, 1, 32, 17, 0], 144, 24, 40, dtype, trans_w, with_bias=True,
                   as_offsets=False, seed=5)


@pytest.mark.skipif(ON_GPU, reason="tests/gpu/test_gmm_gpu.py::test_fp32_on_tf32 covers it on CUDA")
@pytest.mark.parametrize("tiles", [None, (32, 16), (16, 32)], ids=["default", "bm32_bn16", "bm16_bn32"])
def test_fp32_tf32_swapped_operands(monkeypatch, tiles):
    # fp32 with TF32 allowed and a [G, K, N] weight runs as out^T = w^T x^T (SWAP_AB): the [BN, BM] tile, its
    # transposed masked store, bias added along the other axis. K and N are multiples of 4 (TMA's 16-byte
    # strides) but not of 16; empty, unaligned and single-row groups and 8 tail rows. The interpreter multiplies
    # in fp32, so the float64 reference bounds it as tightly as any fp32 GEMM.
    monkeypatch.setenv("MOETRON_BACKEND", "triton")
    monkeypatch.setenv("MOETRON_TMA", "1")
    if tiles is not None:
        monkeypatch.setitem(gmm_module._CONFIG_OVERRIDES, "fwd",
                            dict(gmm_module._INTERPRETER_CONFIG, BM=tiles[0], BN=tiles[1], swap_ab=True))
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert gmm_module._gmm_config(torch.float32, 28, 36, on_cpu=True)["swap_ab"]
        _check_forward("cpu", [6, 0, 19, 1, 0, 33], 67, 36, 28, torch.float32, trans_w=False, with_bias=True,
                       as_offsets=False, seed=6)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_w", [False, True], ids=["w_GKN", "w_GNK"])
@pytest.mark.parametrize("div", [1, 3], ids=["rows", "slots"])
def test_forward_gathered_rows(path, dtype, trans_w, div):
    # Row i of the GEMM reads x[gather[i] // div] (the MoE layer's inference path folds its permute this way;
    # div = top-k when gather holds routed slots t·K+k): indices repeat and skip source rows, -1 marks padding
    # rows (zeros in, zeros out), groups are empty, unaligned, and the tail rows past the last group stay zero.
    # Reference: the same GEMM on the gathered copy, float64.
    sizes, M, T, K, N = [6, 0, 19, 1, 0, 11], 45, 13, 33, 26
    x, w, b = _make(T, K, N, len(sizes), dtype, path, trans_w, bias=True, seed=8)
    gen = torch.Generator().manual_seed(9)
    gather = torch.randint(0, T * div, (M,), generator=gen, dtype=torch.int32 if div == 1 else torch.int64)
    gather[torch.randperm(M, generator=gen)[:7]] = -1
    rows = torch.where((gather >= 0)[:, None], x.cpu()[gather.clamp(min=0).long() // div], 0).to(path)
    out = _poison((M, N), dtype, path)
    gmm_module._run_gmm(x, w, b, gmm_module._make_groups(torch.tensor(sizes), None, len(sizes), M, x.device), out,
                        trans_w, gather=gather.to(path), gather_div=div)
    ref = _ref_forward(rows.double().cpu(), w.double().cpu(), sizes, trans_w, b.double().cpu())
    assert_close_to_ref("out", out, ref, _ref_forward(rows, w, sizes, trans_w, b))
    assert torch.equal(out[sum(sizes):].float().cpu(), torch.zeros(M - sum(sizes), N))


@pytest.mark.parametrize("trans_w", [False, True])
def test_zero_tail_false_leaves_the_tail_and_computes_the_same_rows(path, trans_w):
    # A worst-case-sized buffer whose tail nothing reads (a sync-free dispatcher's): the tail rows of out keep
    # what they held (poison here), every group row is bitwise what zero_tail=True gives, and so are dx's group
    # rows and dw under autograd. Garbage (NaN) in x's tail rows must not reach any group row either.
    sizes, M, K, N, dtype = [5, 0, 17, 9], 47, 24, 40, torch.bfloat16
    x, w, b = _make(M, K, N, len(sizes), dtype, path, trans_w, bias=True, seed=21)
    valid = sum(sizes)
    x[valid:] = float("nan")
    want = moetron.gmm(x, w, torch.tensor(sizes), trans_w=trans_w, bias=b)
    out = _poison((M, N), dtype, path)
    got = moetron.gmm(x, w, torch.tensor(sizes), trans_w=trans_w, bias=b, out=out, zero_tail=False)
    assert torch.equal(got[:valid], want[:valid])
    if gmm_module._env.use_triton(x):
        assert torch.isnan(got[valid:].float()).all()
    else:  # the PyTorch path writes zeros either way
        assert torch.equal(got[valid:].float().cpu(), torch.zeros(M - valid, N))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(22)).to(dtype).to(path)
    dy[valid:] = float("nan")
    grads = []
    for zero_tail in (True, False):
        leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        moetron.gmm(leaves[0], leaves[1], torch.tensor(sizes), trans_w=trans_w, zero_tail=zero_tail).backward(dy)
        grads.append((leaves[0].grad[:valid], leaves[1].grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert not torch.isnan(grads[1][1].float()).any()
    with pytest.raises(TypeError, match="zero_tail must be a bool"):
        moetron.gmm(x, w, torch.tensor(sizes), trans_w=trans_w, zero_tail=None)


def _check_backward(path, sizes, M, K, N, dtype, trans_w, with_bias, seed):
    G = len(sizes)
    x, w, b = _make(M, K, N, G, dtype, path, trans_w, with_bias, seed=seed)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(seed + 7)).to(dtype).to(path)
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
    out = moetron.gmm(leaves[0], leaves[1], torch.tensor(sizes), trans_w=trans_w,
                      bias=leaves[2] if with_bias else None)
    out.backward(dy)

    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    _ref_forward(ref_leaves[0], ref_leaves[1], sizes, trans_w, ref_leaves[2] if with_bias else None) \
        .backward(dy.double().cpu())
    base_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    _ref_forward(base_leaves[0], base_leaves[1], sizes, trans_w, base_leaves[2] if with_bias else None) \
        .backward(dy)
    for name, got, ref, base in zip(("dx", "dw", "dbias"), leaves, ref_leaves, base_leaves):
        assert_close_to_ref(name, got.grad, ref.grad, base.grad)
    # empty groups get exact zero weight gradients
    for g, count in enumerate(sizes):
        if count == 0:
            assert torch.count_nonzero(leaves[1].grad[g]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_w", [False, True], ids=["w_GKN", "w_GNK"])
def test_backward(path, dtype, trans_w):
    # empty first/middle/last groups, unaligned sizes, rows past the last group, bias gradient
    _check_backward(path, [0, 9, 0, 4, 21, 0], 40, 27, 35, dtype, trans_w, with_bias=True, seed=3)


@pytest.mark.parametrize("name,sizes,M,K,N,reason", [c for c in CASES if c[0] in
                                                      ("g1_all_rows", "g3_all_empty", "g128_random")],
                         ids=["g1_all_rows", "g3_all_empty", "g128_random"])
def test_backward_cases(path, name, sizes, M, K, N, reason):
    _check_backward(path, _case_sizes(name, sizes, M), M, K, N, torch.bfloat16, False, False, seed=4)


@pytest.mark.parametrize("trans_w", [False, True], ids=["w_GKN", "w_GNK"])
@pytest.mark.parametrize("with_main_grad", [False, True], ids=["grad", "main_grad"])
def test_consume_x_writes_dx_over_x(path, trans_w, with_main_grad):
    """consume_x=True: the same dx and dw as without it (bitwise), dx lives in x's memory, the tail rows past the
    last group get dx's zeros, and a second backward raises instead of reading the overwritten x."""
    sizes = [0, 9, 4, 0, 13]
    M, K, N = 30, 19, 24
    x0, w0, _ = _make(M, K, N, len(sizes), torch.bfloat16, path, trans_w=trans_w, seed=12)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16).to(path)
    runs = []
    for consume in (False, True):
        leaf = x0.clone().requires_grad_(True)
        x = leaf * 1  # an intermediate, as a layer's permuted rows are
        x_memory = x.data_ptr()
        w = w0.clone().requires_grad_(True)
        if with_main_grad:
            w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=path)
        seen = {}
        x.register_hook(lambda g: seen.setdefault("dx", g))
        out = moetron.gmm(x, w, torch.tensor(sizes), trans_w=trans_w, consume_x=consume)
        out.backward(dy, retain_graph=True)
        runs.append((seen["dx"], w.main_grad if with_main_grad else w.grad, leaf.grad))
        assert (seen["dx"].data_ptr() == x_memory) == consume
        if consume:
            with pytest.raises(RuntimeError, match="can run once"):
                out.backward(dy)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert torch.count_nonzero(runs[1][0][sum(sizes):]) == 0  # rows past the last group: zero gradient


def test_consume_x_rejects_leaves_and_non_bools(path):
    x, w, _ = _make(6, 5, 4, 2, torch.float32, path, seed=14)
    with pytest.raises(ValueError, match="consume_x=True needs x to be an intermediate result"):
        moetron.gmm(x.requires_grad_(True), w, torch.tensor([2, 4]), consume_x=True)
    with pytest.raises(TypeError, match="consume_x must be a bool"):
        moetron.gmm(x, w, torch.tensor([2, 4]), consume_x=1)


def test_main_grad_accumulation(path):
    """A weight with an fp32 .main_grad gets dw added there (twice = two backward passes), w.grad stays None."""
    sizes = [5, 0, 12, 3]
    M, K, N = 22, 18, 20
    x, w, _ = _make(M, K, N, len(sizes), torch.bfloat16, path, seed=5)
    w = w.requires_grad_(True)
    start = torch.randn(w.shape, generator=torch.Generator().manual_seed(9)).to(path)
    w.main_grad = start.clone()
    dys = [torch.randn(M, N, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16).to(path)
           for s in (10, 11)]
    for dy in dys:
        moetron.gmm(x, w, torch.tensor(sizes)).backward(dy)
    assert w.grad is None
    x64 = x.double().cpu()
    expected = start.double().cpu()
    base = start.clone()
    for dy in dys:
        s = 0
        for g, c in enumerate(sizes):
            expected[g] += x64[s:s + c].t() @ dy.double().cpu()[s:s + c]
            base[g] += (x[s:s + c].t() @ dy[s:s + c]).float()
            s += c
    assert_close_to_ref("main_grad", w.main_grad, expected, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
def test_gmm_k(path, dtype, accumulate):
    """k-grouped GEMM with empty groups: overwrite gives exact zeros there, accumulate leaves out unchanged."""
    _check_gmm_k(path, dtype, accumulate, K=21, N=19)


WGRAD_VARIANTS = {
    "tma_store": dict(tma_store=True),
    "persistent": dict(persistent=True),
    "persistent_flatten_store": dict(persistent=True, flatten=True, tma_store=True),
    "persistent_prefetch_tail": dict(persistent=True, flatten=True, prefetch_tail=True),
    "persistent_prefetch_tail_store": dict(persistent=True, flatten=True, prefetch_tail=True, tma_store=True),
}


@pytest.mark.skipif(ON_GPU, reason="on CUDA the default configs choose the variant")
@pytest.mark.parametrize("variant", list(WGRAD_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
def test_gmm_k_variants(monkeypatch, variant, dtype, accumulate):
    # tma_store: the output tile written (and, accumulating, read) through a TMA descriptor; K = 24 and N = 40 are
    # not multiples of the 16-wide tile, so the descriptor clips the edge tiles. persistent: 4 programs walk all
    # the tiles, so one program crosses groups (empty ones included) and masks each group's last row chunk (after
    # the loop, or with prefetch_tail by pointer loads issued before it).
    monkeypatch.setenv("MOETRON_BACKEND", "triton")
    monkeypatch.setenv("MOETRON_TMA", "1")
    monkeypatch.setitem(gmm_module._CONFIG_OVERRIDES, "wgrad",
                        dict(BK=16, BN=16, BM=16, num_warps=1, num_stages=1, **WGRAD_VARIANTS[variant]))
    _check_gmm_k("cpu", dtype, accumulate, K=24, N=40)


@pytest.mark.skipif(ON_GPU, reason="on CUDA the default configs choose the variant")
@pytest.mark.parametrize("variant", list(WGRAD_VARIANTS))
def test_gmm_k_variants_keep_groups_apart(monkeypatch, variant):
    # the row chunk that crosses group 0's end also holds group 1's rows, which are inf here: whatever a variant
    # does with that chunk, they must not reach group 0's result (0 * inf would be NaN)
    monkeypatch.setenv("MOETRON_BACKEND", "triton")
    monkeypatch.setenv("MOETRON_TMA", "1")
    monkeypatch.setitem(gmm_module._CONFIG_OVERRIDES, "wgrad",
                        dict(BK=16, BN=16, BM=16, num_warps=1, num_stages=1, **WGRAD_VARIANTS[variant]))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, 16, generator=gen)
    dy = torch.randn(12, 16, generator=gen)
    x[5:], dy[5:] = float("inf"), float("inf")
    out = moetron.gmm_k(x, dy, torch.tensor([5, 7]))
    ref = x[:5].double().t() @ dy[:5].double()
    assert torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-5, atol=1e-5)


def _check_gmm_k(path, dtype, accumulate, K, N):
    sizes = [0, 7, 0, 20, 2, 0]
    M = 33  # one tail row past the last group must not contribute
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(M, K, generator=gen).to(dtype).to(path)
    dy = torch.randn(M, N, generator=gen).to(dtype).to(path)
    out_dtype = torch.float32 if accumulate else dtype
    if accumulate:
        out = torch.randn(len(sizes), K, N, generator=gen).to(path)
    else:
        out = _poison((len(sizes), K, N), out_dtype, path)
    initial = out.clone()
    moetron.gmm_k(x, dy, torch.tensor(sizes), out=out, accumulate=accumulate)
    ref = torch.zeros(len(sizes), K, N, dtype=torch.float64)
    base = torch.zeros(len(sizes), K, N, dtype=out_dtype, device=path)
    s = 0
    for g, c in enumerate(sizes):
        ref[g] = x[s:s + c].double().cpu().t() @ dy[s:s + c].double().cpu()
        base[g] = (x[s:s + c].t() @ dy[s:s + c]).to(out_dtype)
        s += c
    if accumulate:
        ref += initial.double().cpu()
        base += initial
    assert_close_to_ref("gmm_k", out, ref, base)
    for g, c in enumerate(sizes):
        if c == 0:
            assert torch.equal(out[g], initial[g] if accumulate else torch.zeros_like(out[g]))


def test_gmm_k_default_output_and_offsets(path):
    x = torch.randn(10, 5, device=path)
    dy = torch.randn(10, 3, device=path)
    got = moetron.gmm_k(x, dy, offsets=torch.tensor([4, 4, 10]))
    assert got.shape == (3, 5, 3) and got.dtype == torch.float32
    assert torch.allclose(got[0].cpu(), (x[:4].t() @ dy[:4]).cpu(), atol=1e-4)
    assert torch.equal(got[1].cpu(), torch.zeros(5, 3))


def test_sizes_on_device_and_int64(path):
    """Group sizes given as an int64 tensor already on x's device (the sync-free path)."""
    sizes = [3, 0, 8]
    x, w, _ = _make(11, 16, 16, 3, torch.float32, path, seed=8)
    out = moetron.gmm(x, w, torch.tensor(sizes, dtype=torch.int64, device=path))
    ref = _ref_forward(x.double().cpu(), w.double().cpu(), sizes)
    assert_close_to_ref("out", out, ref, _ref_forward(x, w, sizes))


def test_empty_and_degenerate_shapes(path):
    """M = 0, N = 0 and K = 0 return without launching; K = 0 gives the bias (or zeros)."""
    w = torch.randn(2, 4, 3, device=path)
    assert moetron.gmm(torch.randn(0, 4, device=path), w, torch.tensor([0, 0])).shape == (0, 3)
    assert moetron.gmm(torch.randn(5, 4, device=path), torch.randn(2, 4, 0, device=path),
                       torch.tensor([2, 3])).shape == (5, 0)
    bias = torch.randn(2, 3, device=path)
    out = moetron.gmm(torch.randn(5, 0, device=path), torch.randn(2, 0, 3, device=path), torch.tensor([2, 2]),
                      bias=bias)
    assert torch.equal(out.cpu(), torch.cat([bias[0].expand(2, 3), bias[1].expand(2, 3),
                                             torch.zeros(1, 3, device=path)]).cpu())


def test_invalid_device_sizes_never_write_out_of_bounds(path, monkeypatch):
    """Sizes on the device are not checked without MOETRON_DEBUG (that would sync); the kernels must clamp
    them. Bypass the host check by handing the internal schedule bad sizes, and watch a guard band."""
    monkeypatch.setenv("MOETRON_DEBUG", "0")
    M, K, N = 20, 16, 16
    x, w, _ = _make(M, K, N, 3, torch.float32, path, seed=9)
    guard = _poison((M + 16, N), torch.float32, path)
    out = guard[:M]
    for bad, are_ends in (([15, -4, 30], False), ([15, 10, 99], True)):
        groups = gmm_module._Groups(torch.tensor(bad, device=path), are_ends, M)
        gmm_module._run_gmm(x, w, None, groups, out, trans_w=False)
        assert torch.isnan(guard[M:]).all(), "a kernel wrote past the end of out"
        assert not torch.isnan(out).any()


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_w", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_with_16bit_x(path, dtype, trans_w):
    """Mixed precision (autocast with fp32 weights): output and dx bitwise those of w rounded to x's dtype; dw in
    fp32, straight from the fp32 accumulator, against float64 with the rounded copy's (16-bit, cast up) gradient
    as the baseline; without autograd the same output."""
    sizes = [5, 0, 12, 3]
    M, K, N = 22, 18, 20
    x, w, _ = _make(M, K, N, len(sizes), torch.float32, path, trans_w=trans_w, seed=21)
    x, w = x.to(dtype).requires_grad_(True), w.requires_grad_(True)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(22)).to(dtype).to(path)
    y = moetron.gmm(x, w, torch.tensor(sizes), trans_w=trans_w)
    y.backward(dy)
    x_copy, w_copy = x.detach().clone().requires_grad_(True), w.detach().to(dtype).requires_grad_(True)
    y_copy = moetron.gmm(x_copy, w_copy, torch.tensor(sizes), trans_w=trans_w)
    y_copy.backward(dy)
    assert y.dtype == dtype and torch.equal(y, y_copy) and torch.equal(x.grad, x_copy.grad)
    assert w.grad.dtype == torch.float32
    ref = torch.zeros(len(sizes), K, N, dtype=torch.float64)
    start = 0
    for g, count in enumerate(sizes):
        ref[g] = x[start:start + count].double().cpu().t() @ dy[start:start + count].double().cpu()
        start += count
    assert_close_to_ref("fp32 dw", w.grad, ref.transpose(1, 2) if trans_w else ref, w_copy.grad.float())
    with torch.no_grad():
        assert torch.equal(moetron.gmm(x, w, torch.tensor(sizes), trans_w=trans_w), y_copy)


def _ok_inputs(device="cpu"):
    return torch.randn(8, 4, device=device), torch.randn(2, 4, 3, device=device), torch.tensor([3, 5])


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda x, w, s: (x, torch.randn(2, 5, 3), s, {}), ValueError, "K = x.shape"),
    (lambda x, w, s: (x, w, torch.tensor([3, 2, 3]), {}), ValueError, "one entry per group"),
    (lambda x, w, s: (x, w, torch.tensor([3, -1]), {}), ValueError, "non-negative"),
    (lambda x, w, s: (x, w, torch.tensor([5, 5]), {}), ValueError, "at most the 8 rows"),
    (lambda x, w, s: (x, w, None, {"offsets": torch.tensor([5, 3])}), ValueError, "non-decreasing"),
    (lambda x, w, s: (x, w, s, {"offsets": torch.tensor([3, 8])}), ValueError, "exactly one"),
    (lambda x, w, s: (x, w, None, {}), ValueError, "exactly one"),
    (lambda x, w, s: (x, w, s.float(), {}), TypeError, "group_sizes must have dtype"),
    (lambda x, w, s: (x.long(), w, s, {}), TypeError, "x must have dtype"),
    (lambda x, w, s: (x, w.double(), s, {}), TypeError, "w must have dtype"),
    (lambda x, w, s: (x, w.half(), s, {}), TypeError, "w must have the dtype of x"),
    (lambda x, w, s: (x.bfloat16(), w.half(), s, {}), TypeError, "or be fp32 when x is fp16/bf16"),
    (lambda x, w, s: (x[0], w, s, {}), ValueError, "x must be 2-D"),
    (lambda x, w, s: (x, w[0], s, {}), ValueError, "w must be 3-D"),
    (lambda x, w, s: (x.t().contiguous().t(), w, s, {}), ValueError, "x must be contiguous"),
    (lambda x, w, s: (x, torch.randn(2, 3, 4).transpose(1, 2), s, {}), ValueError, "w must be contiguous"),
    (lambda x, w, s: (x, w, s, {"bias": torch.randn(2, 4)}), ValueError, "bias must have shape"),
    (lambda x, w, s: (x, w, s, {"out": torch.empty(8, 4)}), ValueError, "out must have shape"),
    (lambda x, w, s: (x, w, s, {"out": torch.empty(8, 3, dtype=torch.half)}), TypeError, "out must have dtype"),
    (lambda x, w, s: (x, torch.randn(0, 4, 3), torch.tensor([], dtype=torch.long), {}), ValueError,
     "at least one group"),
    (lambda x, w, s: ("x", w, s, {}), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input(mutate, exc, match):
    x, w, s, kwargs = mutate(*_ok_inputs())
    with pytest.raises(exc, match=match):
        moetron.gmm(x, w, s, **kwargs)


def test_bad_input_autograd_out_and_main_grad():
    x, w, s = _ok_inputs()
    with pytest.raises(ValueError, match="out= is not supported while autograd records"):
        moetron.gmm(x.requires_grad_(True), w, s, out=torch.empty(8, 3))
    # the kernels store rows with unit stride: a transposed out would be written wrongly
    with pytest.raises(ValueError, match="out must be contiguous in its last dimension"):
        moetron.gmm(x.detach(), w, s, out=torch.empty(3, 8).t())
    w = w.clone().requires_grad_(True)
    w.main_grad = torch.zeros(2, 4, 3, dtype=torch.float16)
    with pytest.raises(TypeError, match="w.main_grad must have dtype"):
        moetron.gmm(torch.randn(8, 4), w, s)


def test_bad_input_gmm_k():
    x, dy = torch.randn(8, 4), torch.randn(8, 3)
    with pytest.raises(ValueError, match="dy must have as many rows"):
        moetron.gmm_k(x, torch.randn(7, 3), torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        moetron.gmm_k(x, dy, torch.tensor([3, 5]), accumulate=True)
    with pytest.raises(ValueError, match="out must have shape"):
        moetron.gmm_k(x, dy, torch.tensor([3, 5]), out=torch.empty(2, 3, 4))
    with pytest.raises(ValueError, match="at most the 8 rows"):
        moetron.gmm_k(x, dy, torch.tensor([3, 6]))


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_wrong_device_and_debug_mode(monkeypatch):
    x, w, s = _ok_inputs("cuda")
    with pytest.raises(ValueError, match="w must be on the same device as x"):
        moetron.gmm(x, w.cpu(), s)
    monkeypatch.setenv("MOETRON_DEBUG", "1")
    with pytest.raises(ValueError, match="at most the 8 rows"):
        moetron.gmm(x, w, torch.tensor([5, 5], device="cuda"))
    with pytest.raises(ValueError, match="non-negative"):
        moetron.gmm(x, w, torch.tensor([9, -1], device="cuda"))


def test_wrong_device_cpu_only():
    """A CUDA-resident argument with CPU x is refused before anything runs (skipped when CUDA is absent)."""
    if not ON_GPU:
        pytest.skip("needs a GPU to build a tensor on another device")
    x, w, s = _ok_inputs()
    with pytest.raises(ValueError, match="group_sizes must be on the CPU or on x's device"):
        moetron.gmm(x, w, s.cuda())


def test_backend_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="MOETRON_BACKEND"):
        moetron.gmm(*_ok_inputs())
