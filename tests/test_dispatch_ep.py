"""Expert parallelism on gloo (CPU): the allgather and alltoall dispatchers in folded layouts against the
single-process layer and an independent float64 reference.

Every layout runs the same global weights on the same global batch (B=4 sequences of S=6 tokens), each rank
holding the tokens the layout gives it: split by attention DP over sequences, and by TP (sequence parallelism)
inside sequences. After backward, ``reduce_gradients`` sums the gradients, and the parent process assembles the
global output, input gradient and every parameter gradient (expert shards joined back by EP rank and ETP slice,
with the test's own joining code), then checks:

- against the single-process MoELayer in fp32 (``dispatcher="local"``) with a tight tolerance, and
- against tests/test_layer.py's float64 reference with the DESIGN.md rule (tests/_tolerance.py): the layout's
  error is at most twice the single-process layer's error, plus a tiny slack.

Dropless cases use the global batch as one reference (every aux loss, including the sequence aux loss across
TP-split sequences, is global). Capacity cases drop on each source rank among its own tokens (Megatron-Core's
semantics), so their reference is the single-process layer run on each rank's tokens, gradients summed.

One spawned world of 2 ranks and one of 4 carry all checks (process start-up dominates the time); the tests
below read their results. Shapes are tiny and fp32.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

from moetron import MoEConfig, MoELayer
from moetron.parallel import ParallelGroups, ParallelLayout, load_checkpoint, reduce_gradients, save_checkpoint
from tests._tolerance import assert_close_to_ref
from tests.test_parallel import run_world

H, FF, E, K = 16, 12, 8, 2  # FF splits in two for ETP=2; E splits over EP=4
B, S = 4, 6
T = B * S
F64 = torch.float64

CASES = {
    # every aux loss (batch, sequence, global) plus z-loss, expert biases and a shared expert
    "dropless_aux": dict(load_balancing=("aux_loss", "seq_aux_loss", "global_aux_loss"),
                         aux_loss_coeff=(0.1, 0.05, 0.2), z_loss_coeff=0.01, expert_linear_bias=True,
                         shared_expert_ffn_hidden_size=8),
    # drops by probs on each source rank, kept rows packed, each local expert padded to 2 rows at the destination
    "capacity_packed": dict(capacity_factor=0.75, drop_policy="probs", pad_to=2, load_balancing="none",
                            expert_linear_bias=True),
    # drops by position into fixed [E·C, H] buffers (sync-free path); non-gated gelu experts (up_proj) with biases
    "capacity_padded": dict(capacity_factor=0.75, drop_policy="position", pad_to_capacity=True,
                            load_balancing="none", activation="gelu", expert_linear_bias=True),
    # uneven token counts, one rank with none (2-D tokens): aux and global aux losses, z-loss
    "uneven_aux": dict(load_balancing=("aux_loss", "global_aux_loss"), z_loss_coeff=0.01),
    # same split, packed drops
    "uneven_capacity": dict(capacity_factor=0.75, load_balancing="none"),
    # uneven split, sigmoid with the aux-loss-free expert bias: update_expert_bias sums counts over all ranks
    "uneven_bias": dict(score_function="sigmoid", expert_bias=True, load_balancing="none", bias_update_rate=0.01),
    # sigmoid with an expert bias of +3 on experts 0 and 1, -3 elsewhere: every slot goes to EP rank 0's experts
    # and experts 2..7 get none
    "one_rank": dict(score_function="sigmoid", expert_bias=True, load_balancing="none", expert_linear_bias=True),
}
DROPLESS = {"dropless_aux", "uneven_aux", "uneven_bias", "one_rank"}
UNEVEN_ROWS = [0, 7, 7, 16, 24]  # rank r holds flattened tokens [UNEVEN_ROWS[r], UNEVEN_ROWS[r + 1]); rank 1: none

LAYOUTS = {
    2: {"ep2": dict(ep=2), "tp2_ep2": dict(tp=2, ep=2)},
    4: {"ep4": dict(ep=4), "ep2_etp2": dict(ep=2, etp=2), "ep2_dp2": dict(ep=2)},
}
MAIN = ("dropless_aux", "capacity_packed", "capacity_padded")
RUNS = {  # (layout, case, dispatcher) run in each world
    2: [(lay, case, d) for lay in LAYOUTS[2] for case in MAIN for d in ("allgather", "alltoall")],
    4: [(lay, case, d) for lay in LAYOUTS[4] for case in MAIN for d in ("allgather", "alltoall")]
       + [(lay, "uneven_aux", "alltoall") for lay in ("ep4", "ep2_etp2")]
       + [("ep2_etp2", "uneven_capacity", "alltoall"), ("ep4", "uneven_bias", "alltoall")]
       + [(lay, "one_rank", d) for lay in ("ep4", "ep2_etp2") for d in ("allgather", "alltoall")],
}


def make_cfg(case: str, dispatcher: str = "local", **kw) -> MoEConfig:
    return MoEConfig(hidden_size=H, ffn_hidden_size=FF, num_experts=E, top_k=K, dispatcher=dispatcher,
                     **{**CASES[case], **kw})


def make_data(case: str, seed: int):
    """(x [B, S, H], dy [B, S, H], global state dict) for a case, from fixed seeds."""
    from tests.test_layer import randomize

    g = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)
    layer = MoELayer(make_cfg(case))
    randomize(layer, seed)
    if case == "one_rank":
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.tensor([3.0, 3.0] + [-3.0] * (E - 2)))
    return x, dy, {k: v.clone() for k, v in layer.state_dict().items()}


def partition(L: ParallelLayout, case: str) -> list[torch.Tensor]:
    """Per rank, the indices of its tokens in the flattened global batch: [B_local, S_local] (a DP slice of the
    sequences, a TP·CP chunk of each), or a 1-D row range for the uneven cases."""
    if case.startswith("uneven"):
        return [torch.arange(UNEVEN_ROWS[r], UNEVEN_ROWS[r + 1]) for r in range(L.world_size)]
    grid = torch.arange(T).view(B, S)
    out = []
    for r in range(L.world_size):
        c = L.coords(r)
        sp, sp_r = L.tp * L.cp, c["tp"] + L.tp * c["cp"]
        out.append(grid[c["dp"] * B // L.dp:(c["dp"] + 1) * B // L.dp, sp_r * S // sp:(sp_r + 1) * S // sp])
    return out


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------


def _run_layout(groups, rank, case, dispatcher, data):
    x, dy, sd = data[case]
    idx = partition(groups.layout, case)[rank]
    layer = MoELayer(make_cfg(case, dispatcher), parallel=groups)
    layer.load_state_dict(sd)
    x_l = x.reshape(-1, H)[idx].clone().requires_grad_()
    y = layer(x_l)
    (y * dy.reshape(-1, H)[idx]).sum().backward()
    reduce_gradients(layer, groups)
    s = layer.last_stats
    if layer.router.expert_bias is not None:
        layer.update_expert_bias()
    return dict(bias=None if layer.router.expert_bias is None else layer.router.expert_bias.clone(),y=y.detach(), xg=x_l.grad, grads={n: p.grad.clone() for n, p in layer.named_parameters()},
                coords=(groups.ep_rank, groups.etp_rank, groups.edp_rank),
                losses={k: float(v) for k, v in s["losses"].items()}, kept=s["tokens_per_expert"].tolist(),
                dropped=int(s["num_dropped"]))


class _SyncCounter:
    """Counts .tolist() / .item() / .cpu() calls made from moetron's layer, router and dispatchers."""

    WATCH = ("moetron/dispatch/", "moetron/layer.py", "moetron/router.py")

    def __enter__(self):
        self.calls, self.saved = [], {}
        for name in ("tolist", "item", "cpu"):
            real = getattr(torch.Tensor, name)
            self.saved[name] = real

            def wrapper(t, *a, _real=real, _name=name, **k):
                f = sys._getframe(1).f_code.co_filename.replace("\\", "/")
                if any(w in f for w in self.WATCH):
                    self.calls.append((_name, f.split("moetron/")[-1]))
                return _real(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


def _world(rank, world, data, ckpt_dir, ckpt_data):
    out = {"runs": {}}
    built = {name: ParallelGroups.build(**sizes) for name, sizes in LAYOUTS[world].items()}
    for lay, case, disp in RUNS[world]:
        out["runs"][(lay, case, disp)] = _run_layout(built[lay], rank, case, disp, data)

    x, _, sd = ckpt_data
    if world == 2:
        g = built["ep2"]
        # host syncs in forward + backward: only the alltoall split sizes, once
        syncs = {}
        for case, disp in [("dropless_aux", "alltoall"), ("capacity_packed", "alltoall"),
                           ("capacity_padded", "alltoall"), ("dropless_aux", "allgather"),
                           ("capacity_packed", "allgather")]:
            layer = MoELayer(make_cfg(case, disp), parallel=g)
            x_l = data[case][0].reshape(-1, H)[partition(g.layout, case)[rank]].requires_grad_()
            with _SyncCounter() as counter:
                layer(x_l).sum().backward()
            syncs[(case, disp)] = counter.calls
        out["syncs"] = syncs

        # autocast: tokens travel in bf16, output in bf16, backward runs (compared loosely in the parent)
        layer = MoELayer(make_cfg("dropless_aux", "alltoall"), parallel=g)
        layer.load_state_dict(data["dropless_aux"][2])
        idx = partition(g.layout, "dropless_aux")[rank]
        x_l = data["dropless_aux"][0].reshape(-1, H)[idx].clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x_l)
        y.float().sum().backward()
        out["autocast"] = (y.detach(), x_l.grad is not None and bool(torch.isfinite(x_l.grad).all()))

        # checkpoint at EP=2, and a round trip at the same size
        layer = MoELayer(make_cfg("dropless_aux", "alltoall"), parallel=g)
        layer.load_state_dict(sd)
        save_checkpoint(layer, ckpt_dir)
        idx = partition(g.layout, "dropless_aux")[rank]
        with torch.no_grad():
            out["ckpt_y"] = {"ep2": layer.eval()(x.reshape(-1, H)[idx])}
            fresh = MoELayer(make_cfg("dropless_aux", "alltoall"), parallel=g)
            load_checkpoint(fresh, ckpt_dir)
            out["ckpt_y"]["ep2_reload"] = fresh.eval()(x.reshape(-1, H)[idx])

        # a config that differs across ranks: the same clear error on every rank, quickly
        t0 = time.monotonic()
        try:
            MoELayer(MoEConfig(hidden_size=H, ffn_hidden_size=FF, num_experts=8 if rank == 0 else 4, top_k=K,
                               dispatcher="alltoall"), parallel=g, dtype=torch.float32 if rank == 0 else F64)
            out["mismatch"] = None
        except ValueError as e:
            out["mismatch"] = (str(e), time.monotonic() - t0)
        try:
            MoELayer(MoEConfig(hidden_size=H, ffn_hidden_size=FF, num_experts=5, top_k=K, dispatcher="alltoall"),
                     parallel=g)
        except ValueError as e:
            out["indivisible"] = str(e)
    else:
        out["ckpt_y"] = {}
        for lay in ("ep4", "ep2_etp2"):
            g = built[lay]
            torch.manual_seed(100 + rank)  # fresh weights differ on every rank until the checkpoint loads
            fresh = MoELayer(make_cfg("dropless_aux", "alltoall"), parallel=g)
            load_checkpoint(fresh, ckpt_dir)
            idx = partition(g.layout, "dropless_aux")[rank]
            with torch.no_grad():
                out["ckpt_y"][lay] = fresh.eval()(x.reshape(-1, H)[idx])
        save_checkpoint(fresh, ckpt_dir + "_etp")  # written from EP=2 x ETP=2 (ETP slices gathered)
    return out


# ---------------------------------------------------------------------------------------------------------
# Parent side: data, worlds, assembly, references
# ---------------------------------------------------------------------------------------------------------

DATA = {case: make_data(case, seed) for seed, case in enumerate(CASES, start=40)}
CKPT_DATA = make_data("dropless_aux", 99)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ep_ckpt") / "ckpt")


@pytest.fixture(scope="module")
def world2(ckpt_dir):
    return run_world(2, _world, DATA, ckpt_dir, CKPT_DATA)


@pytest.fixture(scope="module")
def world4(world2, ckpt_dir):  # loads the checkpoint world2 wrote
    return run_world(4, _world, DATA, ckpt_dir, CKPT_DATA)


def _join_etp(shards: list[torch.Tensor], name: str) -> torch.Tensor:
    """Undo the ETP split (written here independently of moetron.layer): F slices along dim 1 of the first
    projection ([gate; up] halves sliced separately when gated) or dim 2 of down_proj."""
    if name.endswith("down_proj_bias"):
        return shards[0]
    if name.endswith("down_proj"):
        return torch.cat(shards, dim=2)
    if "gate_up" in name:
        halves = [s.chunk(2, dim=1) for s in shards]
        return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=1)
    return torch.cat(shards, dim=1)


def assemble(results: list, L: ParallelLayout, case: str):
    """Global y, x grad, {param: grad} from every rank's pieces; checks that replicas agree."""
    idx = partition(L, case)
    y, xg = torch.zeros(T, H), torch.zeros(T, H)
    for r, res in enumerate(results):
        y[idx[r].reshape(-1)] = res["y"].reshape(-1, H)
        xg[idx[r].reshape(-1)] = res["xg"].reshape(-1, H)
    grads = {}
    for name in results[0]["grads"]:
        if not name.startswith("experts."):
            grads[name] = results[0]["grads"][name]
            for res in results[1:]:  # replicated weights: identical after the reduction
                torch.testing.assert_close(res["grads"][name], grads[name], rtol=0, atol=0)
            continue
        by_ep = []
        for ep in range(L.ep):
            shards = []
            for etp in range(L.etp):
                copies = [res["grads"][name] for res in results if res["coords"][:2] == (ep, etp)]
                assert len(copies) == L.edp
                for c in copies[1:]:
                    torch.testing.assert_close(c, copies[0], rtol=0, atol=0)
                shards.append(copies[0])
            by_ep.append(_join_etp(shards, name))
        grads[name] = torch.cat(by_ep, dim=0)
    return y.view(B, S, H), xg.view(B, S, H), grads


_REF_CACHE: dict = {}


def reference(case: str, L: ParallelLayout):
    """(baseline, fp64 reference), each (y, x grad, {param: grad}, losses, kept per rank, dropped per rank): the
    single-process layer in fp32 and the float64 reference, on the global batch (dropless) or on each rank's
    tokens (capacity), gradients summed over the pieces."""
    from tests.test_layer import reference_layer

    pieces = [torch.arange(T).view(B, S)] if case in DROPLESS else partition(L, case)
    key = (case, tuple(tuple(p.reshape(-1).tolist()) for p in pieces))
    if key in _REF_CACHE:
        return _REF_CACHE[key]
    x, dy, sd = DATA[case]
    cfg = make_cfg(case)
    x_flat, dy_flat = x.reshape(-1, H), dy.reshape(-1, H)
    out = []
    for high in (False, True):
        y, xg = torch.zeros(T, H, dtype=F64), torch.zeros(T, H, dtype=F64)
        grads = {n: torch.zeros_like(v, dtype=F64) for n, v in sd.items() if n != "router.expert_bias"}
        losses, kept, dropped = {}, [], []
        for idx in pieces:
            seq_len = idx.shape[1] if idx.dim() == 2 else None
            flat = idx.reshape(-1)
            if flat.numel() == 0:  # a rank without tokens adds nothing (and drops nothing)
                kept.append([0] * E)
                dropped.append(0)
                continue
            if not high:
                layer = MoELayer(cfg)
                layer.load_state_dict(sd)
                xi = x_flat[flat].clone().requires_grad_()
                yi = layer(xi, seq_len)
                (yi * dy_flat[flat]).sum().backward()
                gi = {n: p.grad for n, p in layer.named_parameters()}
                losses = {k: float(v) for k, v in layer.last_stats["losses"].items()}
                kept.append(layer.last_stats["tokens_per_expert"].tolist())
                dropped.append(int(layer.last_stats["num_dropped"]))
            else:
                xi = x_flat[flat].to(F64).requires_grad_()
                P = {n: v.to(F64).requires_grad_() for n, v in sd.items() if n != "router.expert_bias"}
                bias = sd.get("router.expert_bias")
                yi, extra, info = reference_layer(xi, P, cfg, expert_bias=None if bias is None else bias.tolist(),
                                                  seq_len=seq_len)
                ((yi * dy_flat[flat].to(F64)).sum() + extra).backward()
                gi = {n: (torch.zeros_like(p) if p.grad is None else p.grad) for n, p in P.items()}
                losses = {k: float(v.detach()) for k, v in info["losses"].items()}
            y[flat] = yi.detach().to(F64)
            xg[flat] = xi.grad.to(F64)
            for n in grads:
                grads[n] += gi[n].to(F64)
        out.append((y.view(B, S, H), xg.view(B, S, H), grads, losses, kept, dropped))
    _REF_CACHE[key] = out
    return out


def check_against_references(results, L, case):
    y, xg, grads = assemble(results, L, case)
    (y_b, xg_b, g_b, losses_b, kept_b, dropped_b), (y_r, xg_r, g_r, losses_r, _, _) = reference(case, L)
    named = [("y", y, y_r, y_b), ("grad of x", xg, xg_r, xg_b)]
    named += [(f"grad of {n}", grads[n], g_r[n], g_b[n]) for n in g_b]
    assert set(grads) == set(g_b)
    for name, got, ref, base in named:
        assert_close_to_ref(name, got, ref, base.float())
        torch.testing.assert_close(got, base.float(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # losses: global values, equal on every rank, equal to the single-process layer's and the reference's
    for res in results:
        assert res["losses"].keys() == losses_b.keys()
        for k, v in res["losses"].items():
            assert v == pytest.approx(losses_b[k], rel=1e-5, abs=1e-7), k
            assert v == pytest.approx(losses_r[k], rel=1e-5, abs=1e-7), k
    # counts: each rank's own tokens
    if case in DROPLESS:
        assert [sum(col) for col in zip(*(res["kept"] for res in results))] == kept_b[0]
        assert all(res["dropped"] == 0 for res in results)
    else:
        assert [res["kept"] for res in results] == kept_b
        assert [res["dropped"] for res in results] == dropped_b


def _layout(world, name):
    return ParallelLayout.plan(world, **LAYOUTS[world][name])


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lay, case, disp", RUNS[2])
def test_world2_matches_single_process(world2, lay, case, disp):
    check_against_references([w["runs"][(lay, case, disp)] for w in world2], _layout(2, lay), case)


@pytest.mark.parametrize("lay, case, disp", RUNS[4])
def test_world4_matches_single_process(world4, lay, case, disp):
    check_against_references([w["runs"][(lay, case, disp)] for w in world4], _layout(4, lay), case)


def test_capacity_cases_really_drop():
    for case in ("capacity_packed", "capacity_padded", "uneven_capacity"):
        for world in (2, 4):
            if case == "uneven_capacity" and world == 2:
                continue
            L = _layout(world, "ep2_dp2" if world == 4 else "ep2")
            assert sum(reference(case, L)[0][5]) > 0, case


def test_zero_token_rank_and_idle_experts(world4):
    runs = [w["runs"][("ep2_etp2", "uneven_aux", "alltoall")] for w in world4]
    assert runs[1]["y"].shape == (0, H) and runs[1]["kept"] == [0] * E
    for lay in ("ep4", "ep2_etp2"):
        for disp in ("allgather", "alltoall"):
            runs = [w["runs"][(lay, "one_rank", disp)] for w in world4]
            assert [sum(col) for col in zip(*(r["kept"] for r in runs))] == [T, T] + [0] * (E - 2)
            L = _layout(4, lay)
            _, _, grads = assemble(runs, L, "one_rank")
            for n in ("experts.gate_up_proj", "experts.down_proj", "experts.down_proj_bias"):
                assert grads[n][2:].abs().max() == 0, n  # idle experts: exactly zero gradient
                assert grads[n][:2].abs().max() > 0, n


def test_expert_bias_update_uses_global_counts(world4):
    x, _, sd = DATA["uneven_bias"]
    one = MoELayer(make_cfg("uneven_bias"))
    one.load_state_dict(sd)
    one(x.reshape(-1, H))
    one.update_expert_bias()
    local_only = sd["router.expert_bias"]  # what the zero-token rank alone would keep (all its counts are 0)
    assert not torch.equal(one.router.expert_bias, local_only)
    for w in world4:
        torch.testing.assert_close(w["runs"][("ep4", "uneven_bias", "alltoall")]["bias"], one.router.expert_bias,
                                   rtol=0, atol=0)


def test_aux_losses_identical_across_layouts(world2, world4):
    # the same global batch split five ways: the same loss values (and, above, the same gradients)
    values = [w["runs"][(lay, "dropless_aux", d)]["losses"] for worlds, world in ((world2, 2), (world4, 4))
              for lay in LAYOUTS[world] for d in ("allgather", "alltoall") for w in worlds]
    assert set(values[0]) == {"aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss"}
    for v in values[1:]:
        for k in v:
            assert v[k] == pytest.approx(values[0][k], rel=1e-6), k


def test_checkpoint_reshards_across_ep_sizes(world2, world4, ckpt_dir):
    x, _, sd = CKPT_DATA
    one = MoELayer(make_cfg("dropless_aux"))
    load_checkpoint(one, ckpt_dir)  # one process, no process group
    for k, v in one.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        y_one = one.eval()(x)
    for worlds, world, names in ((world2, 2, ("ep2", "ep2_reload")), (world4, 4, ("ep4", "ep2_etp2"))):
        for name in names:
            L = _layout(world, "ep2" if name == "ep2_reload" else name)
            idx = partition(L, "dropless_aux")
            y = torch.zeros(T, H)
            for r, w in enumerate(worlds):
                y[idx[r].reshape(-1)] = w["ckpt_y"][name].reshape(-1, H)
            torch.testing.assert_close(y.view(B, S, H), y_one, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_checkpoint_written_under_etp_loads_in_one_process(world4, ckpt_dir):
    one = MoELayer(make_cfg("dropless_aux"))
    load_checkpoint(one, ckpt_dir + "_etp")
    for k, v in one.state_dict().items():
        torch.testing.assert_close(v, CKPT_DATA[2][k], rtol=0, atol=0, msg=k)


def test_autocast_communicates_and_computes_in_bf16(world2):
    x, _, sd = DATA["dropless_aux"]
    one = MoELayer(make_cfg("dropless_aux"))
    one.load_state_dict(sd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_one = one(x)
    L = _layout(2, "ep2")
    y = torch.zeros(T, H, dtype=torch.bfloat16)
    for idx, w in zip(partition(L, "dropless_aux"), world2):
        y_r, grad_ok = w["autocast"]
        assert y_r.dtype == torch.bfloat16 and grad_ok
        y[idx.reshape(-1)] = y_r.reshape(-1, H)
    torch.testing.assert_close(y.view(B, S, H).float(), y_one.float(), rtol=0.05, atol=0.05)


def test_mismatched_config_raises_on_every_rank(world2):
    for w in world2:
        msg, secs = w["mismatch"]
        assert "MoELayer settings differ across ranks" in msg
        assert "num_experts: 8 on ranks [0], 4 on ranks [1]" in msg
        assert "dtype: 'torch.float32' on ranks [0], 'torch.float64' on ranks [1]" in msg
        assert secs < 10
        assert "num_experts=5 must be divisible by the expert-parallel size ep=2" in w["indivisible"]


def test_host_syncs(world2):
    # alltoall: exactly one host read (the split sizes) per forward + backward; allgather and the static
    # (pad_to_capacity) alltoall: none
    for w in world2:
        s = w["syncs"]
        assert s[("dropless_aux", "alltoall")] == [("tolist", "dispatch/alltoall.py")]
        assert s[("capacity_packed", "alltoall")] == [("tolist", "dispatch/alltoall.py")]
        assert s[("capacity_padded", "alltoall")] == []
        assert s[("dropless_aux", "allgather")] == []
        assert s[("capacity_packed", "allgather")] == []
