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
below read their results. Shapes are tiny and fp32. The cases, data, assembly and references live in
tests/_ep_harness.py, shared with the NCCL version of these checks (tests/gpu/test_ep_nccl.py).
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

from moetron import MoEConfig, MoELayer
from moetron.parallel import ParallelGroups, ParallelLayout, load_checkpoint, save_checkpoint
from tests._ep_harness import (B, DATA, E, F64, FF, H, K, S, T, assemble, check_against_references, make_cfg,
                               make_data, partition, reference, run_layout)
from tests.test_parallel import run_world

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


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------


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
        out["runs"][(lay, case, disp)] = run_layout(built[lay], rank, case, disp, data)

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
# Parent side: worlds and references (tests/_ep_harness.py)
# ---------------------------------------------------------------------------------------------------------

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
