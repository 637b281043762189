"""moetron.dispatch.fused (MoeDistributeDispatch / Combine semantics) on gloo: world 2 and world 4, CPU, NCCL-style
transport (fixed-size all_to_all_single).

Every rank's inputs come from a seed, so the parent rebuilds all of them and checks each rank's results against an
independent recount written here with plain loops (never the code under test):

- layout: tokens tagged with (source rank, token index) arrive exactly at the rows the recount says (expert-major,
  then TP rank, EP source, token order), counts are exact, rows past the total are zeros;
- combine with scales 1 / (the token's experts on that rank) gives x · (number of distinct destination ranks);
- per-expert affine "experts" with random routing weights: y and the gradients of x and of the weights equal a
  float64 single-process reference;
- int8 dispatch: each row within half its scale; int8 return trip within the bound its scales imply;
- uneven BS, a rank with zero tokens, shared-expert ranks (one shared expert on 1 of 2 ranks; on 2 of 4 ranks,
  replicated), EP 2 x TP 2;
- the MoE layer with dispatcher="fused" against the single-process layer (tests/test_dispatch_ep.py's checks);
- the compat entry points (group passed by name) give the functional API's results.
Bad input is checked in one process (group=None): the validation runs before any collective.
"""

from __future__ import annotations

import pytest
import torch

from moetron._env import triton_interpreter_enabled
from moetron.dispatch import combine, dispatch
from tests.test_parallel import run_world

# CPU tensors on gloo: the fused kernels run in Triton's interpreter, which tests/conftest.py switches on only on
# machines without a GPU. With a GPU, tests/gpu/test_fused_gpu.py runs the same checks on CUDA (two GPUs or more).
pytestmark = pytest.mark.skipif(not triton_interpreter_enabled(),
                                reason="CPU emulation of the fused kernels needs Triton's interpreter "
                                       "(TRITON_INTERPRET=1, set by tests/conftest.py where no GPU is present)")

F64 = torch.float64

# name: world, experts E, top-k K, hidden H, tokens per rank (global rank order), B, shared ranks, shared experts, tp
SCENARIOS = {
    # uneven BS, E_l = 3
    "w2_basic": dict(world=2, E=6, K=3, H=8, T=[6, 3], B=8, Sh=0, nsh=0, tp=1),
    # rank 0 holds the shared expert, rank 1 all 4 routed experts
    "w2_shared": dict(world=2, E=4, K=2, H=8, T=[5, 4], B=6, Sh=1, nsh=1, tp=1),
    # a rank with zero tokens, K = E_l + 1 (a token can bring at most E_l rows to a rank)
    "w4_basic": dict(world=4, E=8, K=3, H=8, T=[5, 0, 7, 3], B=8, Sh=0, nsh=0, tp=1),
    # two shared-expert ranks replicating one shared expert (token t goes to rank t mod 2), E_l = 3 on ranks 2, 3
    "w4_shared": dict(world=4, E=6, K=2, H=8, T=[4, 6, 2, 5], B=6, Sh=2, nsh=1, tp=1),
    # EP 2 x TP 2: EP groups {0, 1}, {2, 3}; TP groups {0, 2}, {1, 3}
    "w4_tp": dict(world=4, E=4, K=2, H=8, T=[4, 3, 5, 2], B=6, Sh=0, nsh=0, tp=2),
    # world 8 (the 8-GPU runs of issue 9 check these first): E_l = 2 < K, two ranks without tokens
    "w8_basic": dict(world=8, E=16, K=4, H=8, T=[5, 0, 7, 3, 6, 1, 0, 4], B=8, Sh=0, nsh=0, tp=1),
    # two shared-expert ranks, E_l = 2 on the six MoE ranks
    "w8_shared": dict(world=8, E=12, K=3, H=8, T=[3, 4, 0, 5, 2, 6, 1, 4], B=6, Sh=2, nsh=1, tp=1),
    # EP 4 x TP 2
    "w8_tp": dict(world=8, E=8, K=2, H=8, T=[4, 3, 5, 2, 0, 6, 1, 3], B=6, Sh=0, nsh=0, tp=2),
}
# the scenarios whose int8 round trip is checked (also on GPUs: tests/gpu/test_fused_gpu.py)
INT8_SCENARIOS = ("w2_basic", "w4_basic", "w4_tp", "w8_tp")


def _coords(sc, rank):
    """(ep rank, tp rank, ep size) of a global rank."""
    P = sc["world"] // sc["tp"]
    return rank % P, rank // P, P


def make_inputs(name, rank):
    sc = SCENARIOS[name]
    g = torch.Generator().manual_seed(1000 * len(name) + 17 * rank + sum(map(ord, name)))
    T, H, E, K = sc["T"][rank], sc["H"], sc["E"], sc["K"]
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K,
                                                                                                    dtype=torch.int64)
    w = torch.rand(T, K, generator=g) + 0.1
    dy = torch.randn(T, H, generator=g)
    return x, ids, w, dy


def _affine(sc):
    """Per-expert (c, d): expert e maps a row v to c[e]·v + d[e]; shared expert j is entry E + j."""
    n = sc["E"] + max(sc["nsh"], 1)
    c = 1.0 + 0.1 * torch.arange(n, dtype=F64)
    d = 0.01 * (torch.arange(n, dtype=F64) + 1)
    return c, d


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------


def _groups(sc, rank):
    import torch.distributed as dist

    P = sc["world"] // sc["tp"]
    if sc["tp"] == 1:
        return dist.group.WORLD, None
    ep, _ = dist.new_subgroups_by_enumeration([list(range(j * P, (j + 1) * P)) for j in range(sc["tp"])])
    tp, _ = dist.new_subgroups_by_enumeration([list(range(e, sc["world"], P)) for e in range(P)])
    return ep, tp


def _row_experts(tpe_cum, R, first, L, shared_id):
    """Global expert id of each expand_x row from the cumulative counts (-1 past the total)."""
    e = torch.searchsorted(tpe_cum, torch.arange(R, device=tpe_cum.device), right=True)
    return torch.where(e < L, (shared_id if first < 0 else first) + e, -1)


def _run_scenario(name, rank, device="cpu", transport="auto"):
    """Every check's data for one scenario on this rank (tensors on ``device``; the GPU tests move them back)."""
    sc = SCENARIOS[name]
    ep, tp = _groups(sc, rank)
    P = sc["world"] // sc["tp"]
    ep_rank, tp_rank, _ = _coords(sc, rank)
    x, ids, w, dy = (t.to(device) for t in make_inputs(name, rank))
    kw = dict(group=ep, num_experts=sc["E"], max_tokens_per_rank=sc["B"], shared_expert_num=sc["nsh"],
              shared_expert_rank_num=sc["Sh"], tp_group=tp, transport=transport)
    out = {}

    # 1. layout: rows tagged with (global source rank, token index)
    T = x.shape[0]
    tag = torch.cat([torch.full((T, 1), float(rank), device=device),
                     torch.arange(T, device=device)[:, None].float(), x[:, 2:]], 1)
    r = dispatch(tag, ids, expert_scales=w, tokens_per_expert_type="count", **kw)
    out["layout"] = dict(expand_x=r.expand_x, counts=r.tokens_per_expert, expand_scales=r.expand_scales,
                         ep_recv_counts=r.handle.ep_recv_counts(), tp_recv_counts=r.handle.tp_recv_counts())
    first = r.handle.topo.first_expert()
    L = r.handle.topo.L

    # 2. scales 1 / (the token's experts at that destination): y = x · (distinct destinations), h = expand_x
    r = dispatch(x, ids, **kw)
    E_l = sc["E"] // (P - sc["Sh"])
    dest = sc["Sh"] + ids.long() // E_l
    per_dest = (dest[:, :, None] == dest[:, None, :]).sum(2).float()
    y = combine(r.expand_x / sc["tp"], r.handle, 1.0 / per_dest)
    out["per_dest"] = y

    # 3. weighted affine experts with autograd (TP ranks hold 1/tp of each expert: partial sums)
    c, d = (v.float().to(device) for v in _affine(sc))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    r = dispatch(xg, ids, expert_scales=wg, **kw)
    e_row = _row_experts(r.tokens_per_expert, r.expand_x.shape[0], first, L, sc["E"] + ep_rank // max(
        1, sc["Sh"] // max(sc["nsh"], 1)) if sc["Sh"] else 0)
    valid = (e_row >= 0)[:, None]
    ce = c[e_row.clamp(min=0)][:, None]
    de = d[e_row.clamp(min=0)][:, None]
    h = torch.where(valid, (r.expand_x * ce + de) / sc["tp"], 0.0)
    y = combine(h, r.handle, wg)
    (y * dy).sum().backward()
    out["affine"] = dict(y=y.detach(), xg=xg.grad, wg=wg.grad)

    # 4. int8: dispatch quantized rows (tagged layout reuse), then an int8 return trip of exact expert outputs
    r = dispatch(x, ids, expert_scales=w, quant="int8", **kw)
    out["int8"] = dict(q=r.expand_x, s=r.dynamic_scales)
    deq = r.expand_x.float() * r.dynamic_scales[:, None]
    h = torch.where(valid, (deq * ce + de) / sc["tp"], 0.0)
    out["int8"]["y_exact"] = combine(h, r.handle, w)
    out["int8"]["y_q"] = combine(h, r.handle, w, comm_quant="int8")
    out["int8"]["h"] = h
    return out


LAYER_LAYOUTS = {2: {"ep2": dict(ep=2)}, 4: {"ep4": dict(ep=4), "ep2_etp2": dict(ep=2, etp=2)},
                 8: {"ep8": dict(ep=8)}}


def _run_layer(rank, world):
    from moetron.parallel import ParallelGroups
    from tests._ep_harness import DATA, run_layout

    res = {}
    for lay, sizes in LAYER_LAYOUTS[world].items():
        res[lay] = run_layout(ParallelGroups.build(**sizes), rank, "dropless_aux", "fused", DATA)
    return res


def _run_compat(rank):
    import torch.distributed as dist

    from moetron.compat import moe_distribute_combine, moe_distribute_dispatch

    sc = SCENARIOS["w2_basic"]
    x, ids, w, _ = make_inputs("w2_basic", rank)
    name = dist.group.WORLD.group_name
    outs = moe_distribute_dispatch(x, ids.int(), name, 2, rank, sc["E"], expert_scales=w, global_bs=2 * sc["B"],
                                   expert_token_nums_type=0)
    y = moe_distribute_combine(outs[0] * 2, ids.int(), outs[2], outs[4], w, name, 2, rank, sc["E"],
                               tp_send_counts=outs[5], global_bs=2 * sc["B"], shared_expert_x=x)
    r = dispatch(x, ids, group=dist.group.WORLD, num_experts=sc["E"], expert_scales=w, max_tokens_per_rank=sc["B"])
    y_api = combine(r.expand_x * 2, r.handle, w, shared_expert_x=x)
    try:
        moe_distribute_combine(outs[0], ids.int(), outs[2].clone(), outs[4], w, name, 2, rank, sc["E"],
                               global_bs=2 * sc["B"])
        err = None
    except ValueError as e:
        err = str(e)
    return dict(outs=outs[:2] + outs[3:], y=y, api=(r.expand_x, r.tokens_per_expert, y_api), err=err)


def _world(rank, world):
    out = {"scenarios": {n: _run_scenario(n, rank) for n, sc in SCENARIOS.items() if sc["world"] == world}}
    out["layer"] = _run_layer(rank, world)
    if world == 2:
        out["compat"] = _run_compat(rank)
    return out


@pytest.fixture(scope="module")
def world2():
    return run_world(2, _world)


@pytest.fixture(scope="module")
def world4():
    return run_world(4, _world)


@pytest.fixture(scope="module")
def world8():
    return run_world(8, _world, timeout=300.0)


def _results(request, name):
    """The per-rank results of the world that runs scenario ``name`` (its fixture starts on first use)."""
    return request.getfixturevalue(f"world{SCENARIOS[name]['world']}")


# ---------------------------------------------------------------------------------------------------------
# Independent recount (plain loops)
# ---------------------------------------------------------------------------------------------------------


def recount(name):
    """For every global rank: the list of (global expert id or shared id, source global rank, token) of its rows,
    in expert-major, TP-rank, EP-source, token order."""
    sc = SCENARIOS[name]
    world, tp, Sh = sc["world"], sc["tp"], sc["Sh"]
    P = world // tp
    E_l = sc["E"] // (P - Sh)
    ids = [make_inputs(name, r)[1] for r in range(world)]
    out = []
    for g in range(world):
        ep_rank, _, _ = _coords(sc, g)
        rows = []
        if ep_rank < Sh:
            reps = Sh // sc["nsh"]
            experts = [("shared", ep_rank // reps)]
        else:
            experts = [("moe", (ep_rank - Sh) * E_l + l) for l in range(E_l)]
        for kind, e in experts:
            for j in range(tp):
                for s_ep in range(P):
                    src = j * P + s_ep
                    for t in range(ids[src].shape[0]):
                        if kind == "shared":
                            if t % (Sh // sc["nsh"]) == ep_rank % (Sh // sc["nsh"]):
                                rows.append((sc["E"] + e, src, t))
                        elif e in ids[src][t].tolist():
                            rows.append((e, src, t))
        out.append(rows)
    return out


def reference(name):
    """float64 per rank: (y, x grad, w grad) of y[t] = sum_k w[t,k]·(c[e]·x[t] + d[e]) + sum over the shared
    experts j of (c[E+j]·x[t] + d[E+j])."""
    sc = SCENARIOS[name]
    c, d = _affine(sc)
    res = []
    for r in range(sc["world"]):
        x, ids, w, dy = make_inputs(name, r)
        x64, w64 = x.to(F64).requires_grad_(), w.to(F64).requires_grad_()
        e = ids.long()
        y = (w64[:, :, None] * (c[e][:, :, None] * x64[:, None, :] + d[e][:, :, None])).sum(1)
        for j in range(sc["nsh"]):
            y = y + c[sc["E"] + j] * x64 + d[sc["E"] + j]
        (y * dy.to(F64)).sum().backward()
        res.append((y.detach(), x64.grad, w64.grad))
    return res


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def check_layout_equals_recount(results, name):
    sc = SCENARIOS[name]
    expected = recount(name)
    for g, res in enumerate(results):
        lay = res["scenarios"][name]["layout"]
        rows, xr = expected[g], lay["expand_x"]
        n = len(rows)
        got = [(int(a), int(b)) for a, b in xr[:n, :2].tolist()]
        assert got == [(s, t) for _, s, t in rows], f"rank {g}"
        assert torch.equal(xr[n:], torch.zeros_like(xr[n:])), f"rank {g}: rows past the total must be zeros"
        experts = sorted({e for e, _, _ in rows} | set())
        counts = lay["counts"].tolist()
        assert sum(counts) == n
        # per local expert, in order
        ep_rank, _, P = _coords(sc, g)
        if ep_rank < sc["Sh"]:
            assert counts == [n]
        else:
            E_l = sc["E"] // (P - sc["Sh"])
            first = (ep_rank - sc["Sh"]) * E_l
            assert counts == [sum(1 for e, _, _ in rows if e == first + l) for l in range(E_l)]
            # each row's routing scale travelled with it
            for i, (e, s, t) in enumerate(rows):
                _, ids_s, w_s, _ = make_inputs(name, s)
                assert lay["expand_scales"][i].item() == w_s[t, ids_s[t].tolist().index(e)].item()
        assert experts is not None
        assert int(lay["ep_recv_counts"].sum()) == n and int(lay["tp_recv_counts"].sum()) == n


def check_combine_once_per_destination(results, name):
    sc = SCENARIOS[name]
    P = sc["world"] // sc["tp"]
    E_l = sc["E"] // (P - sc["Sh"])
    for g, res in enumerate(results):
        x, ids, _, _ = make_inputs(name, g)
        n_dest = torch.tensor([len({sc["Sh"] + int(e) // E_l for e in row}) for row in ids.tolist()])
        torch.testing.assert_close(res["scenarios"][name]["per_dest"],
                                   x * n_dest[:, None].float() + (x * sc["nsh"] if sc["Sh"] else 0),
                                   rtol=1e-6, atol=1e-6)


def check_weighted_combine_and_gradients(results, name):
    ref = reference(name)
    for g, res in enumerate(results):
        a = res["scenarios"][name]["affine"]
        y_r, xg_r, wg_r = ref[g]
        for what, got, want in (("y", a["y"], y_r), ("x grad", a["xg"], xg_r), ("w grad", a["wg"], wg_r)):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6, msg=lambda m: f"{what}: {m}")


def check_int8_round_trips(results, name):
    expected = recount(name)
    sc = SCENARIOS[name]
    for g, res in enumerate(results):
        q8 = res["scenarios"][name]["int8"]
        rows = expected[g]
        q, s = q8["q"], q8["s"]
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        xs = {r: make_inputs(name, r)[0] for r in range(sc["world"])}
        for i, (_, src, t) in enumerate(rows):
            row = xs[src][t]
            assert s[i].item() == pytest.approx(row.abs().max().item() / 127, rel=1e-6)
            assert (q[i].float() * s[i] - row).abs().max().item() <= s[i].item() * 0.5 * (1 + 1e-5)
        assert not q[len(rows):].any() and not s[len(rows):].any()
        # return trip: each destination's per-token sum is rounded to int8 with scale max|row| / 127
        # a destination's row is a sum of at most K + shared rows, each |weight| <= 1.1: |row| <= (K + 1)·1.1·max|h|,
        # rounded to within half its scale max|row| / 127; a token sums at most `world` such rows
        hmax = max(w["scenarios"][name]["int8"]["h"].abs().max().item() for w in results)
        err = (q8["y_q"] - q8["y_exact"]).abs().max().item() if q8["y_q"].numel() else 0.0
        bound = sc["world"] * (sc["K"] + 1) * 1.1 * hmax / 254
        assert err <= bound + 1e-6
        assert err > 0 or q8["y_q"].numel() == 0  # the return trip really quantized


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_layout_equals_recount(request, name):
    check_layout_equals_recount(_results(request, name), name)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_combine_once_per_destination(request, name):
    check_combine_once_per_destination(_results(request, name), name)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_weighted_combine_and_gradients_match_reference(request, name):
    check_weighted_combine_and_gradients(_results(request, name), name)


@pytest.mark.parametrize("name", INT8_SCENARIOS)
def test_int8_round_trips_within_scale_bounds(request, name):
    check_int8_round_trips(_results(request, name), name)


@pytest.mark.parametrize("world, lay", [(2, "ep2"), (4, "ep4"), (4, "ep2_etp2"), (8, "ep8")])
def test_layer_with_fused_dispatcher_matches_single_process(request, world, lay):
    from moetron.parallel import ParallelLayout
    from tests._ep_harness import check_against_references

    worlds = request.getfixturevalue(f"world{world}")
    check_against_references([w["layer"][lay] for w in worlds],
                             ParallelLayout.plan(world, **LAYER_LAYOUTS[world][lay]), "dropless_aux")


def test_compat_entry_points_match_functional_api(world2):
    for res in world2:
        c = res["compat"]
        expand_x, dynamic_scales, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = c["outs"]
        ex, tpe, y_api = c["api"]
        assert torch.equal(expand_x, ex) and dynamic_scales is None
        assert torch.equal(expert_token_nums, tpe)  # expert_token_nums_type=0: cumulative
        assert ep_recv_counts.shape == (3, 2) and int(ep_recv_counts.sum()) == int(tpe[-1])
        assert torch.equal(c["y"], y_api)
        assert "expand_idx must be the expand_idx tensor returned by moe_distribute_dispatch" in c["err"]


# ---------------------------------------------------------------------------------------------------------
# Bad input (one process: the validation runs before any collective)
# ---------------------------------------------------------------------------------------------------------


def _ok():
    x = torch.randn(4, 8)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    return x, ids


@pytest.mark.parametrize("change, match", [
    (dict(ids=torch.tensor([[0, 1], [2, 4], [1, 0], [3, 2]])), r"expert_ids must lie in \[0, num_experts = 4\)"),
    (dict(ids=torch.tensor([[0, 1], [2, -1], [1, 0], [3, 2]])), r"expert_ids must lie in"),
    (dict(ids=torch.tensor([[0, 1], [2, 2], [1, 0], [3, 2]])), r"must not repeat an expert.*token 1 has \[2, 2\]"),
    (dict(ids=torch.zeros(4, 5, dtype=torch.int64)), r"1 <= K <= num_experts = 4 .*got K = 5"),
    (dict(max_tokens_per_rank=3), r"x has BS = 4 tokens, more than max_tokens_per_rank = 3"),
    (dict(ids=torch.tensor([[0, 1], [2, 3], [1, 0]])), r"expert_ids must be \[T, K\] with T = x.shape\[0\] = 4"),
    (dict(ids=torch.tensor([[0.0, 1.0]] * 4)), r"expert_ids must have dtype"),
    (dict(num_experts=0), r"num_experts must be a positive int"),
    (dict(quant="fp8"), r"quant must be one of"),
    (dict(zero_padding="no"), r"zero_padding must be a bool, got 'no'"),
    (dict(shared_expert_rank_num=1), r"shared_expert_rank_num must be an int in \[0, 1\)"),
])
def test_bad_dispatch_input_raises_clear_error(change, match):
    x, ids = _ok()
    kw = dict(group=None, num_experts=4)
    ids = change.pop("ids", ids)
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        dispatch(x, ids, **kw)


def test_mismatched_h_and_scales_in_combine_raise():
    x, ids = _ok()
    r = dispatch(x, ids, group=None, num_experts=4)
    w = torch.rand(4, 2)
    with pytest.raises(ValueError, match=r"expand_x must be \[R, H\] = \[8, 8\].*got \(8, 6\)"):
        combine(r.expand_x[:, :6], r.handle, w)
    with pytest.raises(ValueError, match=r"shared_expert_x must be \[T, H\] = \[4, 8\]"):
        combine(r.expand_x, r.handle, w, shared_expert_x=torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"expert_scales must be \[T, K\] = \[4, 2\]"):
        combine(r.expand_x, r.handle, torch.rand(4, 3))
    with pytest.raises(ValueError, match=r"expert_scales is required"):
        combine(r.expand_x, r.handle, None)


def test_single_process_round_trip_and_reserved_compat_arguments():
    from moetron.compat import moe_distribute_combine, moe_distribute_dispatch

    x, ids = _ok()
    w = torch.rand(4, 2)
    r = dispatch(x, ids, group=None, num_experts=4, expert_scales=w)
    assert r.expand_x.shape == (8, 8) and r.tokens_per_expert.tolist() == [2, 4, 6, 8]
    torch.testing.assert_close(combine(r.expand_x, r.handle, None), x * w.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="x_active_mask is a reserved argument"):
        moe_distribute_dispatch(x, ids, "g", 1, 0, 4, x_active_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="scales is a reserved argument"):
        moe_distribute_dispatch(x, ids, "g", 1, 0, 4, scales=torch.ones(4))
    with pytest.raises(ValueError, match="group_list_type is a reserved argument"):
        moe_distribute_combine(r.expand_x, ids, None, None, w, "g", 1, 0, 4, group_list_type=1)
    with pytest.raises(ValueError, match="expert_shard_type must be 0"):
        moe_distribute_dispatch(x, ids, "g", 1, 0, 4, expert_shard_type=1)


def test_zero_padding_off_changes_only_the_rows_past_the_total():
    """zero_padding=False (the MoE layer's setting) skips zeroing expand_x past the total: the live rows, the
    counts, the scales (zeros past the total either way), combine and both gradients are those of the default."""
    g = torch.Generator().manual_seed(3)
    T, H, E, K = 5, 8, 4, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    dy = torch.randn(T, H, generator=g)
    runs = []
    for zero in (True, False):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        r = dispatch(xg, ids, group=None, num_experts=E, expert_scales=wg, max_tokens_per_rank=2 * T,
                     zero_padding=zero)
        n = int(r.tokens_per_expert[-1])
        assert r.expand_x.shape[0] > n  # B = 2T: there are rows past the total
        y = combine(r.expand_x * 2, r.handle, wg)
        (y * dy).sum().backward()
        runs.append((r.expand_x[:n], r.tokens_per_expert, r.expand_scales, y, xg.grad, wg.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# The symmetric-memory transport on CPU: each rank's "symmetric buffer" is a file in /dev/shm that every rank maps
# (so the Triton kernels, in the interpreter, store straight into the peer's memory as on GPUs), and the barrier is
# a gloo barrier. Every allocation and barrier is logged: the logs must be identical on all ranks whatever the
# routing (the mixtral hang came from a rank signalling into a peer's buffer before the peer had set it up; a
# routing-dependent allocation or barrier would hang the same way).
# ---------------------------------------------------------------------------------------------------------

# rank 0 sends every token to its own experts (rank 1 receives nothing from it); rank 1 has no tokens
ASYM = dict(world=2, E=4, K=2, H=8, T=[5, 0], B=6)


from moetron.dispatch._symm import _Buffer  # noqa: E402


class _ShmBuffer(_Buffer):
    """The real buffer's exchange bookkeeping (open / close) over file-backed memory and gloo barriers."""

    log: list = []
    dir: str = ""
    count = 0

    def __init__(self, group, P, B, W, dtype, MS, device):
        import os

        import torch.distributed as dist

        self._track_exchanges(group)
        esz = torch.empty((), dtype=dtype).element_size()
        self.rows_bytes = -(-P * B * W * esz // 256) * 256
        nbytes = self.rows_bytes + P * MS * 4 + 256
        me = dist.get_rank(group)
        k = _ShmBuffer.count
        _ShmBuffer.count += 1
        path = lambda r: os.path.join(_ShmBuffer.dir, f"buf{k}_{r}")  # noqa: E731
        with open(path(me), "wb") as f:
            f.write(b"\xff" * nbytes)  # poison: nothing may read a slot nobody wrote
        dist.barrier(group)
        self.maps = [torch.from_file(path(r), shared=True, size=nbytes, dtype=torch.uint8) for r in range(P)]
        raw = self.maps[me]
        self.rows = raw[:P * B * W * esz].view(dtype).view(P * B, W)
        self.meta = raw[self.rows_bytes:self.rows_bytes + P * MS * 4].view(torch.int32).view(P, MS)
        self.rows_base = torch.tensor([m.data_ptr() for m in self.maps], dtype=torch.int64)
        self.meta_base = self.rows_base + self.rows_bytes
        self.group = group
        self.key = (P, B, W, str(dtype), MS)
        _ShmBuffer.log.append(("alloc",) + self.key)

    def barrier(self):
        import torch.distributed as dist

        _ShmBuffer.log.append(("barrier",) + self.key)
        dist.barrier(self.group)

    def peer_rows(self, rank):
        return self.maps[rank][:self.rows.numel() * self.rows.element_size()].view(self.rows.dtype).view(
            self.rows.shape)


def _emulate_symm(rank):
    import tempfile

    import torch.distributed as dist

    from moetron.dispatch import _symm, fused

    d = [tempfile.mkdtemp(dir="/dev/shm" if __import__("os").path.isdir("/dev/shm") else None) if rank == 0
         else None]
    dist.broadcast_object_list(d, src=0)
    _ShmBuffer.dir = d[0]
    _symm._Buffer = _ShmBuffer
    _symm._BUFFERS.clear()
    _symm._EXCHANGES.clear()
    fused._symm_transport_available = lambda x, group: group is not None


def _asym_inputs(rank):
    g = torch.Generator().manual_seed(77 + rank)
    T = ASYM["T"][rank]
    x = torch.randn(T, ASYM["H"], generator=g)
    ids = torch.stack([torch.randperm(2, generator=g) for _ in range(T)]) if T else torch.zeros(0, 2,
                                                                                             dtype=torch.int64)
    w = torch.rand(T, 2, generator=g) + 0.1
    return x, ids, w


def _run_asym(rank, transport):
    """dispatch -> affine experts -> combine (no grad, then with gradients and new scales) on ASYM."""
    import torch.distributed as dist

    x, ids, w = _asym_inputs(rank)
    kw = dict(group=dist.group.WORLD, num_experts=ASYM["E"], max_tokens_per_rank=ASYM["B"], transport=transport)
    out = {}
    with torch.no_grad():
        r = dispatch(x, ids, expert_scales=w, **kw)
        out["nograd"] = (r.expand_x, r.tokens_per_expert, combine(r.expand_x * 2 + 1, r.handle, None))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    r = dispatch(xg, ids, expert_scales=w, **kw)
    y = combine(r.expand_x * 3, r.handle, wg)
    y.sum().backward()
    out["grad"] = (y.detach(), xg.grad, wg.grad)
    return out


def _world_symm(rank, world):
    _emulate_symm(rank)
    from moetron.dispatch import _symm

    res = {"basic": _run_scenario("w2_basic", rank, transport="symm"), "asym": _run_asym(rank, "symm")}
    res["log"] = list(_ShmBuffer.log)
    res["asym_nccl"] = _run_asym(rank, "nccl")
    res["buffers"] = len(_symm._BUFFERS)
    import shutil

    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        shutil.rmtree(_ShmBuffer.dir, ignore_errors=True)
    return res


@pytest.fixture(scope="module")
def symm_world():
    return run_world(2, _world_symm)


def test_symm_transport_emulated_matches_recount_and_reference(symm_world):
    results = [{"scenarios": {"w2_basic": r["basic"]}} for r in symm_world]
    check_layout_equals_recount(results, "w2_basic")
    check_combine_once_per_destination(results, "w2_basic")
    check_weighted_combine_and_gradients(results, "w2_basic")
    check_int8_round_trips(results, "w2_basic")


def test_symm_transport_same_allocations_and_barriers_on_every_rank(symm_world):
    """Skewed routing (one rank receives nothing, the other has no tokens): same buffers, same barriers, in the
    same order on both ranks, and the same results as the NCCL transport."""
    logs = [r["log"] for r in symm_world]
    assert logs[0] == logs[1] and len(logs[0]) > 0
    assert sum(1 for e in logs[0] if e[0] == "alloc") == symm_world[0]["buffers"]
    for r in symm_world:
        for part in ("nograd", "grad"):
            for a, b in zip(r["asym"][part], r["asym_nccl"][part]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # and against plain arithmetic: expert rows are exact copies, y = sum_k w·(2x + 1), then y = 3·sum_k w·x
    x, ids, w = _asym_inputs(0)
    torch.testing.assert_close(symm_world[0]["asym"]["nograd"][2], (w[:, :, None] * (2 * x[:, None] + 1)).sum(1))
    torch.testing.assert_close(symm_world[0]["asym"]["grad"][0], 3 * w.sum(1, keepdim=True) * x)
    assert symm_world[1]["asym"]["nograd"][2].shape == (0, ASYM["H"])
    assert symm_world[1]["asym"]["nograd"][1].tolist() == [0, 0]  # rank 1 received nothing (cumulative counts)


class _FakeGroup:
    group_name = "fake"


def _counting_buffer():
    buf = _Buffer.__new__(_Buffer)
    buf._track_exchanges(_FakeGroup())
    buf.barriers = 0

    def barrier():
        buf.barriers += 1

    buf.barrier = barrier
    return buf


def test_leading_barrier_only_when_the_last_exchange_used_the_same_buffer(monkeypatch):
    """The rule of _Buffer.open: a peer may still read this buffer only if the exchange just before was into it;
    any other exchange in between proves the peers are done. Inside a graph capture, and after one, always."""
    from moetron.dispatch import _symm

    monkeypatch.setattr(_symm, "_EXCHANGES", {})
    x, y = _counting_buffer(), _counting_buffer()

    def exchange(buf):
        before = buf.barriers
        buf.open()
        buf.close()
        return buf.barriers - before  # 1: closing barrier only; 2: with the leading one

    assert exchange(x) == 1  # a new buffer: nothing of it is being read anywhere
    assert exchange(x) == 2  # x again right away: peers may still read the last contents
    assert exchange(y) == 1
    assert [exchange(x), exchange(y), exchange(x), exchange(y)] == [1, 1, 1, 1]  # dispatch, combine, ...
    assert exchange(y) == 2
    monkeypatch.setattr(_symm, "_capturing", lambda: True)
    assert exchange(x) == 2
    monkeypatch.setattr(_symm, "_capturing", lambda: False)
    assert [exchange(y), exchange(x)] == [2, 2]  # replays may have written any buffer since: always from now on
