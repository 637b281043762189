"""Shared pieces of the expert-parallel equivalence tests: tests/test_dispatch_ep.py (gloo on the CPU) and
tests/gpu/test_ep_nccl.py (NCCL on CUDA).

Every layout runs the same global weights on the same global batch (B=4 sequences of S=6 tokens), each rank
holding the tokens the layout gives it (``partition``). The workers call ``run_layout``; the parent joins the
ranks' pieces back into the global output, input gradient and parameter gradients (``assemble``) and compares them
with the single-process layer and an independent float64 reference (``check_against_references``).

Also here: ``run_cuda_world``, the NCCL counterpart of tests/test_parallel.py's gloo ``run_world`` (one spawned
process per GPU).
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import pytest
import torch

from moetron import MoEConfig, MoELayer
from moetron.parallel import ParallelLayout, reduce_gradients
from tests._spawn import collect_world
from tests._tolerance import assert_close_to_ref

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
# per world size: rank r holds flattened tokens [rows[r], rows[r + 1]); rank 1 holds none in both
UNEVEN_ROWS = {4: [0, 7, 7, 16, 24], 2: [0, 24, 24]}


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


def round_data(data: tuple, dtype: torch.dtype) -> tuple:
    """The same (x, dy, state dict) rounded to ``dtype`` and kept in fp32: a layer in ``dtype`` then holds exactly
    these values, so the float64 reference computes the same function."""
    x, dy, sd = data
    r = lambda t: t.to(dtype).float() if t.is_floating_point() else t  # noqa: E731
    return r(x), r(dy), {k: r(v) for k, v in sd.items()}


DATA = {case: make_data(case, seed) for seed, case in enumerate(CASES, start=40)}


def partition(L: ParallelLayout, case: str) -> list[torch.Tensor]:
    """Per rank, the indices of its tokens in the flattened global batch: [B_local, S_local] (a DP slice of the
    sequences, a TP·CP chunk of each), or a 1-D row range for the uneven cases."""
    if case.startswith("uneven"):
        rows = UNEVEN_ROWS[L.world_size]
        return [torch.arange(rows[r], rows[r + 1]) for r in range(L.world_size)]
    grid = torch.arange(T).view(B, S)
    out = []
    for r in range(L.world_size):
        c = L.coords(r)
        sp, sp_r = L.tp * L.cp, c["tp"] + L.tp * c["cp"]
        out.append(grid[c["dp"] * B // L.dp:(c["dp"] + 1) * B // L.dp, sp_r * S // sp:(sp_r + 1) * S // sp])
    return out


def to_cpu(obj):
    """Tensors (in nested dicts, lists, tuples) moved to the CPU, for results leaving a CUDA worker."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------


def run_layout(groups, rank, case, dispatcher, data, device="cpu", dtype=torch.float32):
    """One rank's forward + backward of ``case`` in the layout of ``groups``: its output, input gradient, reduced
    parameter gradients, losses and counts (on ``device``; the caller moves them)."""
    x, dy, sd = data[case]
    idx = partition(groups.layout, case)[rank]
    layer = MoELayer(make_cfg(case, dispatcher), parallel=groups, device=device, dtype=dtype)
    layer.load_state_dict(sd)
    if dispatcher == "fused":  # ranks may hold different token counts (EP=8: four hold none): one bound for all
        layer.dispatcher.max_tokens_per_rank = T
    x_l = x.reshape(-1, H)[idx].to(device, dtype).requires_grad_()
    y = layer(x_l)
    (y * dy.reshape(-1, H)[idx].to(device, dtype)).sum().backward()
    reduce_gradients(layer, groups)
    s = layer.last_stats
    if layer.router.expert_bias is not None:
        layer.update_expert_bias()
    return dict(bias=None if layer.router.expert_bias is None else layer.router.expert_bias.clone(),
                y=y.detach(), xg=x_l.grad, grads={n: p.grad.clone() for n, p in layer.named_parameters()},
                coords=(groups.ep_rank, groups.etp_rank, groups.edp_rank),
                losses={k: float(v) for k, v in s["losses"].items()}, kept=s["tokens_per_expert"].tolist(),
                dropped=int(s["num_dropped"]))


# ---------------------------------------------------------------------------------------------------------
# Parent side: assembly, references, checks
# ---------------------------------------------------------------------------------------------------------


def join_etp(shards: list[torch.Tensor], name: str) -> torch.Tensor:
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
    """Global y, x grad, {param: grad} (fp32) from every rank's pieces; checks that replicas agree."""
    idx = partition(L, case)
    y, xg = torch.zeros(T, H), torch.zeros(T, H)
    for r, res in enumerate(results):
        y[idx[r].reshape(-1)] = res["y"].reshape(-1, H).float()
        xg[idx[r].reshape(-1)] = res["xg"].reshape(-1, H).float()
    grads = {}
    for name in results[0]["grads"]:
        if not name.startswith("experts."):
            grads[name] = results[0]["grads"][name].float()
            for res in results[1:]:  # replicated weights: identical after the reduction
                torch.testing.assert_close(res["grads"][name].float(), grads[name], rtol=0, atol=0)
            continue
        by_ep = []
        for ep in range(L.ep):
            shards = []
            for etp in range(L.etp):
                copies = [res["grads"][name] for res in results if res["coords"][:2] == (ep, etp)]
                assert len(copies) == L.edp
                for c in copies[1:]:
                    torch.testing.assert_close(c, copies[0], rtol=0, atol=0)
                shards.append(copies[0].float())
            by_ep.append(join_etp(shards, name))
        grads[name] = torch.cat(by_ep, dim=0)
    return y.view(B, S, H), xg.view(B, S, H), grads


_REF_CACHE: dict = {}


def reference(case: str, L: ParallelLayout, data: dict | None = None, device="cpu", dtype=torch.float32):
    """(baseline, fp64 reference), each (y, x grad, {param: grad}, losses, kept per rank, dropped per rank): the
    single-process layer (on ``device`` in ``dtype``) and the float64 reference (CPU), on the global batch
    (dropless) or on each rank's tokens (capacity), gradients summed over the pieces."""
    from tests.test_layer import reference_layer

    data = DATA if data is None else data
    pieces = [torch.arange(T).view(B, S)] if case in DROPLESS else partition(L, case)
    key = (case, tuple(tuple(p.reshape(-1).tolist()) for p in pieces), str(device), dtype, id(data[case][0]))
    if key in _REF_CACHE:
        return _REF_CACHE[key]
    x, dy, sd = data[case]
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
                layer = MoELayer(cfg, device=device, dtype=dtype)
                layer.load_state_dict(sd)
                xi = x_flat[flat].to(device, dtype).requires_grad_()
                yi = layer(xi, seq_len)
                (yi * dy_flat[flat].to(device, dtype)).sum().backward()
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
            y[flat] = yi.detach().cpu().to(F64)
            xg[flat] = xi.grad.cpu().to(F64)
            for n in grads:
                grads[n] += gi[n].cpu().to(F64)
        out.append((y.view(B, S, H), xg.view(B, S, H), grads, losses, kept, dropped))
    _REF_CACHE[key] = out
    return out


def check_against_references(results, L, case, *, data=None, device="cpu", dtype=torch.float32, rtol=1e-5,
                             atol=1e-6, scale_atol=False, slack=1e-5, loss_rel=1e-5):
    """The layout's global output and every gradient:

    - equal the single-process layer's (same device and dtype) within ``rtol``/``atol`` (``atol`` times the
      tensor's largest magnitude when ``scale_atol``); ``rtol=None`` skips this check;
    - obey the DESIGN.md rule against the float64 reference (error at most 2x the single-process layer's, plus
      ``slack``);
    - losses equal on every rank, to the single-process layer's and the reference's; counts per rank exact."""
    y, xg, grads = assemble(results, L, case)
    base, high = reference(case, L, data, device, dtype)
    (y_b, xg_b, g_b, losses_b, kept_b, dropped_b), (y_r, xg_r, g_r, losses_r, _, _) = base, high
    named = [("y", y, y_r, y_b), ("grad of x", xg, xg_r, xg_b)]
    named += [(f"grad of {n}", grads[n], g_r[n], g_b[n]) for n in g_b]
    assert set(grads) == set(g_b)
    for name, got, ref, b in named:
        assert_close_to_ref(name, got, ref, b.float(), slack=slack)
        if rtol is not None:
            a = atol * max(1.0, b.abs().max().item()) if scale_atol and b.numel() else atol
            torch.testing.assert_close(got, b.float(), rtol=rtol, atol=a, msg=lambda m: f"{name}: {m}")
    # losses: global values, equal on every rank, equal to the single-process layer's and the reference's
    for res in results:
        assert res["losses"].keys() == losses_b.keys()
        for k, v in res["losses"].items():
            assert v == pytest.approx(losses_b[k], rel=loss_rel, abs=1e-7), k
            assert v == pytest.approx(losses_r[k], rel=loss_rel, abs=1e-7), k
    # counts: each rank's own tokens
    if case in DROPLESS:
        assert [sum(col) for col in zip(*(res["kept"] for res in results))] == kept_b[0]
        assert all(res["dropped"] == 0 for res in results)
    else:
        assert [res["kept"] for res in results] == kept_b
        assert [res["dropped"] for res in results] == dropped_b


# ---------------------------------------------------------------------------------------------------------
# NCCL worlds (one spawned process per GPU)
# ---------------------------------------------------------------------------------------------------------

NCCL_ENV = {
    # multicast (NVLS) off on the shared machines: see the device notes; harmless elsewhere
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}


def _cuda_worker(rank, world, store_path, out_dir, fn, args, timeout_s):
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.pop("MOETRON_DEBUG", None)
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    # fp32 must be true fp32: the router matmul (cuBLAS) and moetron's gmm (input_precision "ieee") both read it
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        out = {"result": to_cpu(fn(rank, world, *args))}
    except BaseException:  # reported by the parent with the rank's traceback
        out = {"error": traceback.format_exc()}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_cuda_world(world: int, fn, *args, timeout: float = 600.0, collective_timeout_s: int = 120) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes, rank r on cuda:r, NCCL, TF32 off; return the
    ranks' results (tensors moved to the CPU) in rank order. ``fn`` must be importable (module level). Spawn, not
    fork: the parent may already hold a CUDA context."""
    return collect_world(
        _cuda_worker, lambda tmp: (world, os.path.join(tmp, "store"), tmp, fn, args, collective_timeout_s), world,
        start_method="spawn", timeout=timeout, label="NCCL world")
