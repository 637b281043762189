"""moetron.ops.permute (permute / unpermute) against an independent plain-Python reference.

The reference routes with explicit loops over experts and slots; indices and counts must match it exactly, row
copies bit for bit, and the weighted sums and gradients must meet the DESIGN.md tolerance rule against float64.
Every case runs on each available path: on a CPU machine the plain-torch backend and the Triton kernels in
Triton's interpreter (tiny shapes); on a GPU machine the Triton kernels on CUDA.
"""

import importlib
import math
import os

import pytest
import torch

from moetron.ops.permute import PermuteResult, permute, permute_ref, permuted_rows, unpermute, unpermute_ref
from tests._tolerance import assert_close_to_ref

permute_module = importlib.import_module("moetron.ops.permute")

ON_GPU = torch.cuda.is_available()
PATHS = ["cuda"] if ON_GPU else ["torch", "triton"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
H = 37  # not a multiple of the interpreter's 16-wide blocks: every row has a ragged tail


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Selects the backend; returns the device tensors live on."""
    if request.param == "cuda":
        monkeypatch.setenv("MOETRON_BACKEND", "auto")
        return "cuda"
    monkeypatch.setenv("MOETRON_BACKEND", request.param)
    return "cpu"


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every torch.empty / empty_like made while the test runs is filled with NaN (floats) or a wild value
    (integers), so an output row a kernel forgets to write cannot pass as a zero."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.numel():
            t.fill_(float("nan") if t.is_floating_point() else (-12345 if t.dtype != torch.bool else True))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))


# ---------------------------------------------------------------------------------------------------------
# The independent reference: plain Python loops over experts and slots
# ---------------------------------------------------------------------------------------------------------


class Ref:
    """Routing computed by hand. ``src[row] = (t, k)`` for the rows that hold a slot."""

    def __init__(self, ids, probs, T, K, E, pad_to=1, capacity=None, policy="probs"):
        kept = []
        for e in range(E):
            slots = [(t, k) for t in range(T) for k in range(K) if ids[t][k] == e]
            if capacity is not None and len(slots) > capacity:
                if policy == "probs":
                    best = sorted(slots, key=lambda s: (-probs[s[0]][s[1]], s[0], s[1]))[:capacity]
                else:
                    best = slots[:capacity]
                slots = sorted(best)  # kept slots are laid out in (token, k) order
            kept.append(slots)
        self.row_map = [[-1] * K for _ in range(T)]
        self.src = {}
        self.counts, self.padded, self.offsets = [], [], []
        end = 0
        for e, slots in enumerate(kept):
            start = e * capacity if capacity is not None else end
            for i, (t, k) in enumerate(slots):
                self.row_map[t][k] = start + i
                self.src[start + i] = (t, k)
            seg = capacity if capacity is not None else math.ceil(len(slots) / pad_to) * pad_to
            self.counts.append(len(slots))
            self.padded.append(seg)
            end = start + seg
            self.offsets.append(end)
        self.dropped = T * K - sum(self.counts)
        if capacity is not None:
            self.rows = E * capacity
        elif pad_to == 1:
            self.rows = T * K
        else:  # each non-empty expert pads by at most pad_to - 1 rows
            self.rows = T * K + min(E, T * K) * (pad_to - 1)
        self.T, self.K = T, K

    def row_map_tensor(self, device):
        return torch.tensor(self.row_map, dtype=torch.int64, device=device).view(self.T, self.K)

    def permute(self, x, probs):
        """Differentiable torch version built from the hand-made layout, in the inputs' dtype."""
        zero = x.new_zeros(x.shape[1])
        rows = [x[self.src[r][0]] if r in self.src else zero for r in range(self.rows)]
        x_perm = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
        p_perm = None
        if probs is not None:
            p_rows = [probs[self.src[r]] if r in self.src else probs.new_zeros(()) for r in range(self.rows)]
            p_perm = torch.stack(p_rows) if p_rows else probs.new_zeros(0)
        return x_perm, p_perm

    def unpermute(self, y_perm, probs):
        """sum_k probs[t, k] * y_perm[row], every operation in y_perm's dtype (probs cast to it)."""
        out = []
        for t in range(self.T):
            acc = y_perm.new_zeros(y_perm.shape[1])
            for k in range(self.K):
                r = self.row_map[t][k]
                if r >= 0:
                    acc = acc + (y_perm[r] * probs[t, k].to(y_perm.dtype) if probs is not None else y_perm[r])
            out.append(acc)
        return torch.stack(out) if out else y_perm.new_zeros(0, y_perm.shape[1])


def _routing(T, K, E, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "distinct":  # top-k style: K different experts per token
        return [torch.randperm(E, generator=gen)[:K].tolist() for _ in range(T)]
    if kind == "subset":  # only experts 1, 3, 4 of 6 are ever chosen
        allowed = [1, 3, 4]
        return [[allowed[i] for i in torch.randperm(3, generator=gen)[:K].tolist()] for _ in range(T)]
    if kind == "one":
        return [[2] * K for _ in range(T)]
    if kind == "repeat":  # tokens that pick the same expert twice
        return [[1, 1], [0, 2], [2, 2], [1, 0]][:T]
    if kind == "any":  # with repeats, skewed toward expert 0
        return (torch.randint(0, E, (T, K), generator=gen) * (torch.rand(T, K, generator=gen) > 0.4)).tolist()
    raise AssertionError(kind)


def _probs(T, K, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values, so capacity decisions hit ties
        return (torch.randint(1, 4, (T, K), generator=gen).float() / 4).tolist()
    return (torch.rand(T, K, generator=gen) * 0.9 + 0.1).tolist()


def _randn(shape, dtype, device, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _ids_tensor(ids, T, K, device, dtype=torch.int64):
    return torch.tensor(ids, dtype=dtype).view(T, K).to(device)


# (name, T, K, E, routing kind, reason)
CASES = [
    ("random_e4", 9, 2, 4, "distinct", "general top-2 routing with unaligned per-expert counts"),
    ("zero_token_experts", 10, 2, 6, "subset", "experts 0 (first), 2 (middle) and 5 (last) get no tokens"),
    ("all_to_one", 8, 1, 5, "one", "every token to one expert, all others empty"),
    ("t1", 1, 2, 4, "distinct", "a single token"),
    ("k_eq_e", 5, 4, 4, "distinct", "K = E: every token visits every expert"),
    ("prime_e7", 13, 3, 7, "distinct", "a prime number of experts"),
    ("repeat_expert", 4, 2, 3, "repeat", "a token choosing one expert twice keeps both slots, in k order"),
    ("e256", 8, 2, 256, "distinct", "E = 256: almost every expert empty"),
    ("t0", 0, 2, 3, "distinct", "empty batch: nothing to route"),
]
CASE_IDS = [c[0] for c in CASES]


def _setup(case, device, dtype=torch.bfloat16, pad_to=1, capacity=None, policy="probs", ties=False, seed=0,
           id_dtype=torch.int64):
    name, T, K, E, kind, _ = case
    ids = _routing(T, K, E, kind, seed=len(name) + seed)
    probs = _probs(T, K, seed=seed + 1, ties=ties)
    ref = Ref(ids, probs, T, K, E, pad_to, capacity, policy)
    x = _randn((T, H), dtype, device, seed + 2)
    return ref, x, _ids_tensor(ids, T, K, device, id_dtype), torch.tensor(probs).view(T, K).to(device)


def _check_layout(res: PermuteResult, ref: Ref, x, probs, E):
    dev = x.device
    assert res.row_map.dtype == torch.int32 and res.row_map.device == dev
    assert res.row_map.cpu().tolist() == ref.row_map if ref.T else res.row_map.shape == (0, ref.K)
    assert res.tokens_per_expert.dtype == torch.int64 and res.tokens_per_expert.tolist() == ref.counts
    assert res.padded_tokens_per_expert.tolist() == ref.padded
    assert res.offsets.dtype == torch.int32 and res.offsets.tolist() == ref.offsets
    assert res.num_dropped.dim() == 0 and res.num_dropped.dtype == torch.int64
    assert int(res.num_dropped) == ref.dropped
    assert all(t.device == dev for t in (res.tokens_per_expert, res.offsets, res.num_dropped))
    want_x, want_p = ref.permute(x.cpu(), probs.cpu())
    assert res.x_permuted.shape == (ref.rows, H) and res.x_permuted.dtype == x.dtype
    assert torch.equal(res.x_permuted.cpu(), want_x), "x_permuted is not an exact copy of the reference rows"
    assert res.probs_permuted.dtype == probs.dtype
    assert torch.equal(res.probs_permuted.cpu(), want_p)


# ---------------------------------------------------------------------------------------------------------
# Forward: layout, counts and row copies
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_to", [1, 8, 16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_permute_layout(path, case, pad_to):
    ref, x, ids, probs = _setup(case, path, pad_to=pad_to)
    E = case[3]
    assert permuted_rows(case[1], case[2], E, pad_to=pad_to) == ref.rows
    out = torch.full((ref.rows, H), float("nan"), dtype=x.dtype, device=path)  # poisoned buffer
    res = permute(x, ids, E, probs=probs, pad_to=pad_to, out=out)
    assert res.x_permuted is out
    _check_layout(res, ref, x, probs, E)
    if pad_to == 8:  # the autograd path (no out=) with int32 ids agrees bit for bit
        res2 = permute(x.requires_grad_(True), ids.to(torch.int32), E, probs=probs, pad_to=pad_to)
        assert res2.x_permuted.grad_fn is not None
        assert torch.equal(res2.x_permuted, res.x_permuted) and torch.equal(res2.row_map, res.row_map)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_dtypes(path, dtype):
    # row copies must be exact in every dtype (bf16 and fp16 loads/stores in the kernel)
    ref, x, ids, probs = _setup(CASES[5], path, dtype=dtype, pad_to=8)
    _check_layout(permute(x, ids, 7, probs=probs, pad_to=8), ref, x, probs, 7)


# (capacity, pad_to, reason)
CAPACITY_CASES = [
    (0, 1, "capacity 0: every slot dropped, an empty buffer"),
    (2, 1, "tight capacity: most experts drop"),
    (3, 1, "capacity between the counts: some experts drop, some have unused rows"),
    (8, 8, "capacity a multiple of pad_to"),
    (30, 1, "capacity above every count: nothing dropped, unused rows zero"),
]


@pytest.mark.parametrize("capacity,pad_to,reason", CAPACITY_CASES, ids=[f"c{c[0]}_p{c[1]}" for c in CAPACITY_CASES])
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops(path, policy, capacity, pad_to, reason):
    # skewed routing with repeats and tied probs: the drop choice and its tie-break are exercised
    case = ("capacity_skewed", 12, 2, 4, "any", "")
    ref, x, ids, probs = _setup(case, path, capacity=capacity, policy=policy, pad_to=pad_to, ties=True)
    assert ref.rows == 4 * capacity == permuted_rows(12, 2, 4, capacity=capacity, pad_to=pad_to)
    res = permute(x, ids, 4, probs=probs, pad_to=pad_to, capacity=capacity, drop_policy=policy)
    _check_layout(res, ref, x, probs, 4)
    # recount the drops straight from the per-expert demand
    demand = [sum(row.count(e) for row in ids.cpu().tolist()) for e in range(4)]
    assert int(res.num_dropped) == sum(max(0, d - capacity) for d in demand)
    assert int((res.row_map == -1).sum()) == int(res.num_dropped)
    # dropped slots contribute nothing to the combine
    y = unpermute(res.x_permuted.float(), res.row_map, probs)
    x_perm = ref.permute(x.cpu(), None)[0]
    assert_close_to_ref("y", y, ref.unpermute(x_perm.double(), probs.double().cpu()),
                        ref.unpermute(x_perm.float(), probs.cpu()))


def test_probs_policy_ties_go_to_lower_tokens(path):
    """With all probs equal, keeping the highest probs must keep the earliest tokens: the position policy."""
    ids = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1], [1, 0]], device=path)
    x = _randn((5, H), torch.float32, path, 3)
    equal = torch.full((5, 2), 0.5, device=path)
    by_probs = permute(x, ids, 3, probs=equal, capacity=2, drop_policy="probs")
    by_position = permute(x, ids, 3, capacity=2, drop_policy="position")
    assert torch.equal(by_probs.row_map, by_position.row_map)
    assert by_probs.row_map.cpu().tolist() == [[0, 2], [3, 1], [-1, 4], [-1, -1], [-1, -1]]
    # a high prob late in the batch wins a place over earlier tokens
    probs = equal.clone()
    probs[4, 1] = 0.9
    assert permute(x, ids, 3, probs=probs, capacity=2).row_map.cpu().tolist() == \
        [[0, 2], [3, -1], [-1, 4], [-1, -1], [-1, 1]]


# ---------------------------------------------------------------------------------------------------------
# unpermute values
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [True, False], ids=["probs", "unweighted"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unpermute_values(path, case, weighted):
    ref, _, _, probs = _setup(case, path, pad_to=8)
    # every row is random and nonzero, padding rows included: they must never be read
    y_perm = _randn((ref.rows, H), torch.bfloat16, path, 4)
    row_map = ref.row_map_tensor(path)
    p = probs if weighted else None
    out = torch.full((ref.T, H), float("nan"), dtype=torch.bfloat16, device=path)
    got = unpermute(y_perm, row_map, p, num_tokens=ref.T, out=out)
    assert got is out
    p64 = None if p is None else p.double().cpu()
    assert_close_to_ref("y", got, ref.unpermute(y_perm.double().cpu(), p64),
                        ref.unpermute(y_perm.cpu(), None if p is None else p.cpu()))
    # the autograd path gives the same bits
    assert torch.equal(unpermute(y_perm, row_map.to(torch.int32), p), got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_dtypes(path, dtype):
    # permute then unpermute with the same probs: y[t] = x[t] * sum_k probs[t, k] over kept slots
    ref, x, ids, probs = _setup(CASES[5], path, dtype=dtype, pad_to=16)
    res = permute(x, ids, 7, probs=probs, pad_to=16)
    y = unpermute(res.x_permuted, res.row_map, probs)
    assert y.dtype == dtype
    want = ref.unpermute(ref.permute(x.double().cpu(), None)[0], probs.double().cpu())
    assert_close_to_ref("y", y, want, ref.unpermute(ref.permute(x.cpu(), None)[0], probs.cpu()))


# ---------------------------------------------------------------------------------------------------------
# Gradients against float64 autograd on the reference
# ---------------------------------------------------------------------------------------------------------

GRAD_CASES = [c for c in CASES if c[0] in ("random_e4", "zero_token_experts", "k_eq_e", "repeat_expert", "t0")]


def _check_permute_grads(path, case, dtype, pad_to, capacity=None):
    ref, x, ids, probs = _setup(case, path, dtype=dtype, pad_to=pad_to, capacity=capacity, seed=5)
    E = case[3]
    g_x = _randn((ref.rows, H), dtype, path, 6)
    g_p = _randn((ref.rows,), torch.float32, path, 7)
    x_leaf, p_leaf = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    res = permute(x_leaf, ids, E, probs=p_leaf, pad_to=pad_to, capacity=capacity)
    torch.autograd.backward([res.x_permuted, res.probs_permuted], [g_x, g_p])

    def ref_grads(x_in, p_in, gx, gp):
        x_r, p_r = x_in.detach().clone().requires_grad_(True), p_in.detach().clone().requires_grad_(True)
        xp, pp = ref.permute(x_r, p_r)
        if xp.numel():
            torch.autograd.backward([xp, pp], [gx, gp])
        return [g if g is not None else torch.zeros_like(t) for g, t in ((x_r.grad, x_r), (p_r.grad, p_r))]

    dx64, dp64 = ref_grads(x.double().cpu(), probs.double().cpu(), g_x.double().cpu(), g_p.double().cpu())
    dx_base, _ = ref_grads(x.cpu(), probs.cpu(), g_x.cpu(), g_p.cpu())
    assert_close_to_ref("dx", x_leaf.grad, dx64, dx_base)
    assert torch.equal(p_leaf.grad.double().cpu(), dp64), "dprobs is a gather: it must be exact"


def _check_unpermute_grads(path, case, dtype, weighted, pad_to):
    ref, _, _, probs = _setup(case, path, pad_to=pad_to, seed=8)
    y_perm = _randn((ref.rows, H), dtype, path, 9)
    dy = _randn((ref.T, H), dtype, path, 10)
    y_leaf = y_perm.clone().requires_grad_(True)
    p_leaf = probs.clone().requires_grad_(True) if weighted else None
    unpermute(y_leaf, ref.row_map_tensor(path), p_leaf).backward(dy)

    def ref_grads(y_in, p_in, d):
        y_r = y_in.detach().clone().requires_grad_(True)
        p_r = p_in.detach().clone().requires_grad_(True) if weighted else None
        out = ref.unpermute(y_r, p_r)
        if out.numel():
            out.backward(d)
        grads = [y_r.grad if y_r.grad is not None else torch.zeros_like(y_r)]
        if weighted:
            grads.append(p_r.grad if p_r.grad is not None else torch.zeros_like(p_r))
        return grads

    want = ref_grads(y_perm.double().cpu(), probs.double().cpu(), dy.double().cpu())
    base = ref_grads(y_perm.cpu(), probs.cpu(), dy.cpu())
    assert_close_to_ref("dy_perm", y_leaf.grad, want[0], base[0])
    unused = [r for r in range(ref.rows) if r not in ref.src]
    assert torch.count_nonzero(y_leaf.grad[unused]) == 0, "padding rows must get exactly zero gradient"
    if weighted:
        assert p_leaf.grad.dtype == torch.float32
        assert_close_to_ref("dprobs", p_leaf.grad, want[1], base[1].float())


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_permute_backward_cases(path, poisoned_alloc, case):
    _check_permute_grads(path, case, torch.bfloat16, pad_to=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_backward_dtypes_capacity(path, poisoned_alloc, dtype):
    # dropped slots (capacity 2) must get zero gradient; tied probs are irrelevant to the gradient
    _check_permute_grads(path, ("cap", 9, 3, 4, "any", ""), dtype, pad_to=1, capacity=2)


@pytest.mark.parametrize("weighted", [True, False], ids=["probs", "unweighted"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_unpermute_backward_cases(path, poisoned_alloc, case, weighted):
    _check_unpermute_grads(path, case, torch.bfloat16, weighted, pad_to=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpermute_backward_dtypes(path, poisoned_alloc, dtype):
    _check_unpermute_grads(path, CASES[5], dtype, weighted=True, pad_to=8)


def test_end_to_end_grad_through_experts(path):
    """permute -> a per-row scale (stand-in for experts) -> unpermute, gradients to x and probs, vs float64."""
    ref, x, ids, probs = _setup(CASES[0], path, dtype=torch.float32, pad_to=8, seed=11)
    scale = _randn((ref.rows, 1), torch.float32, path, 12)
    dy = _randn((ref.T, H), torch.float32, path, 13)
    x_leaf, p_leaf = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    res = permute(x_leaf, ids, 4, probs=p_leaf, pad_to=8)
    unpermute(res.x_permuted * scale, res.row_map, p_leaf).backward(dy)
    x64 = x.double().cpu().requires_grad_(True)
    p64 = probs.double().cpu().requires_grad_(True)
    ref.unpermute(ref.permute(x64, None)[0] * scale.double().cpu(), p64).backward(dy.double().cpu())
    assert_close_to_ref("dx", x_leaf.grad, x64.grad, x64.grad.float())
    assert_close_to_ref("dprobs", p_leaf.grad, p64.grad, p64.grad.float())


@pytest.mark.parametrize("capacity", [None, 3])
def test_unpermute_with_src_slot(path, capacity):
    """src_slot (row_map's inverse, from the same permute) spares the unpermute backward its inversion: it must be
    the inverse the reference builds, and give bitwise the same output and gradients as inverting row_map."""
    ref, x, ids, probs = _setup(CASES[1], path, dtype=torch.float32, pad_to=1 if capacity else 4,
                                capacity=capacity, seed=21)
    res = permute(x, ids, 6, probs=probs, pad_to=1 if capacity else 4, capacity=capacity)
    want = torch.full((ref.rows,), -1, dtype=torch.int64)
    for row, (t, k) in ref.src.items():
        want[row] = t * ref.K + k
    assert torch.equal(res.src_slot.cpu(), want)
    y_perm = _randn((ref.rows, H), torch.float32, path, 22)
    dy = _randn((ref.T, H), torch.float32, path, 23)
    grads = []
    for src_slot in (None, res.src_slot):
        y_leaf, p_leaf = y_perm.clone().requires_grad_(True), probs.clone().requires_grad_(True)
        out = unpermute(y_leaf, res.row_map, p_leaf, src_slot=src_slot)
        out.backward(dy)
        grads.append((out.detach(), y_leaf.grad, p_leaf.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Host syncs, safety on bad device data, module references
# ---------------------------------------------------------------------------------------------------------


def test_no_host_reads(path, monkeypatch):
    """After validation, routing, kernels and backward never read tensor data on the host: every Python-level
    way to pull a value out of a tensor raises, and on a GPU torch's sync debug mode turns any sync into an
    error."""
    if os.environ.get("MOETRON_BACKEND") == "triton":
        pytest.skip("the interpreter itself moves tensors through numpy; the index code is the torch path's")
    ref, x, ids, probs = _setup(CASES[1], path, pad_to=8, capacity=None, seed=14)
    x_leaf, p_leaf = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    rows = permuted_rows(ref.T, ref.K, 6, pad_to=8)
    ones = [torch.ones(ref.T, H, dtype=x.dtype, device=path), torch.ones(rows, device=path),
            torch.ones(6 * 8, device=path)]

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of device data")

    for attr in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    if path == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for policy, capacity in (("probs", None), ("probs", 8), ("position", 8)):
            r = rows if capacity is None else 6 * capacity
            res = permute_module._permute(x_leaf, ids, 6, p_leaf, 8, capacity, policy, r, None)
            y = permute_module._Unpermute.apply(res.x_permuted, p_leaf, res.row_map)  # unpermute minus checks
            torch.autograd.backward([y, res.probs_permuted], [ones[0], ones[1 if capacity is None else 2]])
    finally:
        if path == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        monkeypatch.undo()
    assert x_leaf.grad is not None and p_leaf.grad is not None


def test_out_of_range_ids_are_dropped_not_written(path, monkeypatch):
    """Device ids are not range-checked without MOETRON_DEBUG (that would sync): ids outside [0, E) must drop
    their slot, be counted, and never write past the buffer. The internal entry point skips the host check."""
    monkeypatch.setenv("MOETRON_DEBUG", "0")
    # E = 3: 2**32 + 5, -1 and 3 are invalid (the first must not alias to 5 or 1 through a 32-bit cast)
    ids = torch.tensor([[0, 2**32 + 1], [-1, 1], [2, 3], [1, 1]], device=path)
    x = _randn((4, H), torch.float32, path, 15)
    probs = torch.rand(4, 2, device=path) + 0.1
    for capacity, pad_to in ((None, 1), (None, 4), (2, 1)):
        rows = permuted_rows(4, 2, 3, pad_to=pad_to, capacity=capacity)
        guard = torch.full((rows + 8, H), float("nan"), device=path)
        with torch.no_grad():
            res = permute_module._permute(x, ids, 3, probs, pad_to, capacity, "probs", rows, guard[:rows])
        assert torch.isnan(guard[rows:]).all(), "a kernel wrote past the end of out"
        assert not torch.isnan(res.x_permuted).any()
        assert res.row_map.cpu().tolist()[0][1] == -1 and res.row_map.cpu().tolist()[1][0] == -1
        assert res.row_map.cpu().tolist()[2][1] == -1
        assert int(res.num_dropped) == 3 + (1 if capacity == 2 else 0)  # expert 1 has 3 slots
        assert res.tokens_per_expert.tolist() == ([1, 3, 1] if capacity is None else [1, 2, 1])
    # unpermute: rows outside [0, R_out) count as dropped (internal launcher, skipping the host check)
    y_perm = _randn((5, H), torch.float32, path, 16)
    out = torch.full((2, H), float("nan"), device=path)
    row_map = torch.tensor([0, 99, -7, 4], device=path)
    permute_module._run_unpermute(y_perm, row_map, torch.ones(4, device=path), 2, out)
    assert torch.equal(out.cpu(), torch.stack([y_perm[0], y_perm[4]]).cpu())


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_index_fallback_past_max_experts(path, monkeypatch, policy):
    """Past _MAX_TRITON_EXPERTS the index bookkeeping takes the torch sort path even on the Triton backend."""
    monkeypatch.setattr(permute_module, "_MAX_TRITON_EXPERTS", 2)
    for capacity, pad_to in ((None, 8), (2, 1)):
        ref, x, ids, probs = _setup(CASES[0], path, pad_to=pad_to, capacity=capacity, policy=policy, ties=True)
        _check_layout(permute(x, ids, 4, probs=probs, pad_to=pad_to, capacity=capacity, drop_policy=policy),
                      ref, x, probs, 4)


def test_module_references_agree(path):
    """permute_ref / unpermute_ref (the readable versions in the module) match the hand-made layout."""
    for case, pad_to, capacity in ((CASES[1], 8, None), (("cap", 12, 2, 4, "any", ""), 1, 3)):
        ref, x, ids, probs = _setup(case, path, pad_to=pad_to, capacity=capacity, ties=True)
        x_perm, row_map, counts = permute_ref(x, ids, case[3], probs, pad_to, capacity)
        assert row_map.tolist() == ref.row_map and counts == ref.counts
        assert torch.equal(x_perm.cpu(), ref.permute(x.cpu(), None)[0])
        assert torch.equal(unpermute_ref(x_perm, row_map.to(path), probs).cpu(),
                           ref.unpermute(x_perm.cpu(), probs.cpu()))


def test_permuted_rows_formula():
    assert permuted_rows(10, 2, 4) == 20
    assert permuted_rows(10, 2, 4, pad_to=8) == 20 + 4 * 7
    assert permuted_rows(1, 1, 256, pad_to=128) == 1 + 1 * 127  # only one expert can be non-empty
    assert permuted_rows(10, 2, 4, capacity=6) == 24
    assert permuted_rows(0, 2, 4, pad_to=16) == 0


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ---------------------------------------------------------------------------------------------------------


def _ok():
    return torch.randn(6, 8), torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1]]), torch.rand(6, 2)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, i, p: permute("x", i, 3), TypeError, "x must be a torch.Tensor"),
    (lambda x, i, p: permute(x.long(), i, 3), TypeError, "x must have dtype"),
    (lambda x, i, p: permute(x[0], i, 3), ValueError, "x must be 2-D"),
    (lambda x, i, p: permute(x.t().contiguous().t(), i, 3), ValueError, "x must be contiguous"),
    (lambda x, i, p: permute(x, i.float(), 3), TypeError, "expert_ids must have dtype"),
    (lambda x, i, p: permute(x, i[:5], 3), ValueError, "expert_ids must be \\[T, K\\]"),
    (lambda x, i, p: permute(x, i[:, 0], 3), ValueError, "expert_ids must be 2-D"),
    (lambda x, i, p: permute(x, i, 2), ValueError, "expert_ids must lie in \\[0, num_experts\\)"),
    (lambda x, i, p: permute(x, i - 1, 3), ValueError, "expert_ids must lie in"),
    (lambda x, i, p: permute(x, i, 0), ValueError, "num_experts must be >= 1"),
    (lambda x, i, p: permute(x, i, 3.0), TypeError, "num_experts must be an int"),
    (lambda x, i, p: permute(x, i, 3, pad_to=0), ValueError, "pad_to must be >= 1"),
    (lambda x, i, p: permute(x, i, 3, pad_to=True), TypeError, "pad_to must be an int"),
    (lambda x, i, p: permute(x, i, 3, probs=p, capacity=-1), ValueError, "capacity must be >= 0"),
    (lambda x, i, p: permute(x, i, 3, probs=p, capacity=4, pad_to=8), ValueError,
     "capacity must be a multiple of pad_to"),
    (lambda x, i, p: permute(x, i, 3, probs=p, capacity=2, drop_policy="random"), ValueError,
     "drop_policy must be one of"),
    (lambda x, i, p: permute(x, i, 3, drop_policy="first"), ValueError, "drop_policy must be one of"),
    (lambda x, i, p: permute(x, i, 3, capacity=2), ValueError, "drop_policy='probs' with a capacity needs probs"),
    (lambda x, i, p: permute(x, i, 3, probs=p[:, :1]), ValueError, "probs must have shape"),
    (lambda x, i, p: permute(x, i, 3, probs=p.long()), TypeError, "probs must have dtype"),
    (lambda x, i, p: permute(x, i, 3, out=torch.empty(11, 8)), ValueError, "out must have shape"),
    (lambda x, i, p: permute(x, i, 3, out=torch.empty(12, 8).half()), TypeError, "out must have dtype"),
    (lambda x, i, p: permute(x.requires_grad_(True), i, 3, out=torch.empty(12, 8)), ValueError,
     "out= is not supported while autograd records"),
    (lambda x, i, p: unpermute(x.long(), i, p), TypeError, "y_permuted must have dtype"),
    (lambda x, i, p: unpermute(x, i.float(), p), TypeError, "row_map must have dtype"),
    (lambda x, i, p: unpermute(x, i[:, 0], p), ValueError, "row_map must be 2-D"),
    (lambda x, i, p: unpermute(x, i, p[:3]), ValueError, "probs must have shape"),
    (lambda x, i, p: unpermute(x, i, p, num_tokens=5), ValueError, "num_tokens must equal row_map.shape"),
    (lambda x, i, p: unpermute(x, i + 5, p), ValueError, "row_map must hold rows of y_permuted in \\[0, 6\\)"),
    (lambda x, i, p: unpermute(x, i - 2, p), ValueError, "row_map must hold rows"),
    (lambda x, i, p: unpermute(x, i, p, out=torch.empty(6, 7)), ValueError, "out must have shape"),
    (lambda x, i, p: unpermute(x, i, p, src_slot=torch.zeros(5, dtype=torch.int64)), ValueError,
     "src_slot must have shape \\(6,\\)"),
    (lambda x, i, p: unpermute(x, i, p, src_slot=torch.zeros(6, dtype=torch.int32)), TypeError,
     "src_slot must have dtype"),
    (lambda x, i, p: unpermute(x, i, p.requires_grad_(True), out=torch.empty(6, 8)), ValueError,
     "out= is not supported while autograd records"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_ok())


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_wrong_device_and_debug_mode(monkeypatch):
    x, ids, probs = (t.cuda() for t in _ok())
    with pytest.raises(ValueError, match="expert_ids must be on the same device as x"):
        permute(x, ids.cpu(), 3)
    with pytest.raises(ValueError, match="probs must be on the same device as x"):
        permute(x, ids, 3, probs=probs.cpu())
    with pytest.raises(ValueError, match="row_map must be on the same device as y_permuted"):
        unpermute(x, ids.cpu(), probs)
    permute(x, ids + 1, 3)  # no check without debug mode (no sync): the slots with id 3 are dropped
    monkeypatch.setenv("MOETRON_DEBUG", "1")
    with pytest.raises(ValueError, match="expert_ids must lie in"):
        permute(x, ids + 1, 3)
    with pytest.raises(ValueError, match="row_map must hold rows"):
        unpermute(x, ids + 5, probs)
