"""moetron.parallel: the folded layout arithmetic (pure), the process groups in a real gloo world, and
reduce_gradients. Also home of ``run_world``, the spawn harness the distributed tests share.

The layout tests recompute every group from the definition (ranks sharing all coordinates but the varying ones)
instead of trusting ``group_ranks``; the spawned world checks the backend's groups against the same lists.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moetron.parallel import GROUP_NAMES, ParallelGroups, ParallelLayout, reduce_gradients
from tests._spawn import collect_world

# ---------------------------------------------------------------------------------------------------------
# Spawn harness (gloo on the CPU)
# ---------------------------------------------------------------------------------------------------------

COLLECTIVE_TIMEOUT_S = 60  # a hang fails the test instead of blocking CI


def _worker(rank, world, store_path, out_dir, fn, args):
    os.environ["MOETRON_BACKEND"] = "torch"
    os.environ.pop("MOETRON_DEBUG", None)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        out = {"result": fn(rank, world, *args)}
    except BaseException:  # reported by the parent with the rank's traceback
        out = {"error": traceback.format_exc()}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _start_method() -> str:
    """forkserver where available: one server process imports torch, triton and moetron once and forks every
    rank from there (about 2.5 s of imports per rank otherwise, which on 2 cores dominates these tests)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "moetron", "tests.test_parallel"])
    return "forkserver"


def run_world(world: int, fn, *args, timeout: float = 150.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh gloo ranks; return the ranks' results in rank order.
    ``fn`` must be importable (a module-level function) and return picklable values (tensors are fine)."""
    return collect_world(_worker, lambda tmp: (world, os.path.join(tmp, "store"), tmp, fn, args), world,
                         start_method=_start_method(), timeout=timeout, label="gloo world")


# ---------------------------------------------------------------------------------------------------------
# Layout arithmetic
# ---------------------------------------------------------------------------------------------------------

ATTN = ("tp", "cp", "dp", "pp")
MOE = ("etp", "ep", "edp", "pp")
VARY = {"tp": ("tp",), "cp": ("cp",), "dp": ("dp",), "pp": ("pp",), "tp_cp": ("tp", "cp"), "dp_cp": ("dp", "cp"),
        "tp_cp_dp": ("tp", "cp", "dp"), "etp": ("etp",), "ep": ("ep",), "edp": ("edp",), "ep_etp": ("ep", "etp"),
        "etp_edp": ("etp", "edp")}


def expected_groups(L: ParallelLayout, name: str) -> list[list[int]]:
    """Ranks sharing every coordinate of the kind's ordering except the varying ones."""
    dims = ATTN if name in ("tp", "cp", "dp", "pp", "tp_cp", "dp_cp", "tp_cp_dp") else MOE
    key = lambda r: tuple(L.coords(r)[d] for d in dims if d not in VARY[name])  # noqa: E731
    groups: dict = {}
    for r in range(L.world_size):
        groups.setdefault(key(r), []).append(r)
    return sorted(groups.values())


LAYOUTS = [
    # (world, sizes): one reason each
    (8, dict(tp=2, ep=4)),  # the docstring example: EP spans attention TP and DP
    (8, dict(cp=2, ep=2, etp=2)),  # ETP pairs inside CP×DP
    (8, dict(tp=2, cp=2, ep=8)),  # EP over every rank of the stage (CP=2 with EP=8 on 8 ranks, not 16)
    (8, dict(pp=2, tp=2, ep=2)),  # two pipeline stages, folding inside each
    (12, dict(tp=3, pp=2, ep=3, etp=2)),  # odd sizes
    (4, dict()),  # plain data parallel
    (1, dict()),  # one process
]


@pytest.mark.parametrize("world, sizes", LAYOUTS)
def test_layout_groups_match_the_definition(world, sizes):
    L = ParallelLayout.plan(world, **sizes)
    assert L.tp * L.cp * L.dp * L.pp == world == L.etp * L.ep * L.edp * L.pp
    for r in range(world):  # coordinates invert the rank formulas of both orderings
        c = L.coords(r)
        assert r == c["tp"] + L.tp * (c["cp"] + L.cp * (c["dp"] + L.dp * c["pp"]))
        assert r == c["etp"] + L.etp * (c["ep"] + L.ep * (c["edp"] + L.edp * c["pp"]))
    stages = expected_groups(L, "tp_cp_dp")
    for name in GROUP_NAMES:
        groups = L.group_ranks(name)
        assert groups == expected_groups(L, name), name
        assert sorted(sum(groups, [])) == list(range(world))  # a partition
        assert all(len(g) == L.size(name) for g in groups)
    for g in L.group_ranks("ep_etp"):  # folding: every EP×ETP group lies inside one stage's TP×CP×DP ranks
        assert any(set(g) <= set(s) for s in stages)
    assert L.group_ranks("pp") == expected_groups(L, "pp")


def test_docstring_table_is_the_code_output():
    import moetron.parallel as mp_

    table = ParallelLayout.plan(8, tp=2, ep=4).table()
    doc_lines = [line.strip() for line in mp_.__doc__.splitlines()]
    for line in table.splitlines():
        assert line.strip() in doc_lines, line


@pytest.mark.parametrize("world, sizes, match", [
    (8, dict(tp=3), r"world size 8 is not divisible by tp·cp·pp = 3·1·1 = 3"),
    (8, dict(tp=2, pp=3), r"tp·cp·pp = 2·1·3 = 6"),
    (8, dict(ep=3), r"ep·etp = 3·1 = 3 must divide the 8 ranks"),
    (8, dict(pp=2, ep=8), r"ep·etp = 8·1 = 8 must divide the 4 ranks of a pipeline stage"),
    (4, dict(ep=2, etp=4), r"ep·etp = 2·4 = 8"),
    (4, dict(ep=0), r"ep must be a positive int, got 0"),
    (4, dict(tp=True), r"tp must be a positive int, got True"),
])
def test_invalid_layouts_name_the_numbers(world, sizes, match):
    with pytest.raises(ValueError, match=match):
        ParallelLayout.plan(world, **sizes)


def test_single_process_groups():
    g = ParallelGroups.single()
    assert all(g.get(n) is None and g.size(n) == 1 and g.ranks(n) == [0] for n in GROUP_NAMES)
    assert (g.ep_size, g.ep_rank, g.etp_rank, g.world_size) == (1, 0, 0, 1)
    with pytest.raises(ValueError, match="group name must be one of"):
        g.get("expert")
    with pytest.raises(ValueError, match="needs torch.distributed.init_process_group"):
        ParallelGroups.build(ep=2)


# ---------------------------------------------------------------------------------------------------------
# A real world of 4 ranks: groups, DeviceMesh input, errors on every rank, reduce_gradients
# ---------------------------------------------------------------------------------------------------------


def _groups_world(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    for sizes in (dict(tp=2, ep=4), dict(cp=2, ep=2, etp=2), dict(ep=2)):
        g = ParallelGroups.build(**sizes)
        out[str(sizes)] = {n: (None if g.get(n) is None else dist.get_process_group_ranks(g.get(n)),
                               g.ranks(n), g.rank_in(n)) for n in GROUP_NAMES}
        # the groups really communicate among exactly those ranks
        t = torch.tensor([float(rank)])
        if g.get("ep") is not None:
            dist.all_reduce(t, group=g.get("ep"))
        out[str(sizes)]["ep_sum"] = t.item()

    # a DeviceMesh describing attention (dp=2, tp=2): its sizes and tp/dp groups are used
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    g = ParallelGroups.build(mesh=mesh, ep=4)
    out["mesh"] = (g.tp_size, g.dp_size, g.ep_size, g.get("tp") is mesh.get_group("tp"), g.device_type)

    errors = {}
    for what, kw in [("bad", dict(ep=3)), ("ranks_disagree", dict(ep=2 if rank < 2 else 4))]:
        t0 = time.monotonic()
        try:
            ParallelGroups.build(**kw)
        except ValueError as e:
            errors[what] = (str(e), time.monotonic() - t0)
    out["errors"] = errors

    # reduce_gradients: default group, a marked group, a None gradient, average=True
    mod = torch.nn.Module()
    mod.a = torch.nn.Parameter(torch.zeros(3))
    mod.b = torch.nn.Parameter(torch.zeros(2))
    mod.c = torch.nn.Parameter(torch.zeros(1))
    mod.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    mod.b.moetron_grad_group = "ep"
    g = ParallelGroups.build(ep=2)  # ep groups {0, 1}, {2, 3}
    mod.a.grad = torch.full((3,), float(rank + 1))
    mod.b.grad = torch.full((2,), float(10 * (rank + 1)))
    if rank == 0:
        mod.c.grad = torch.ones(1)
    reduce_gradients(mod, g)
    summed = (mod.a.grad.clone(), mod.b.grad.clone(), mod.c.grad.clone(), mod.frozen.grad)
    reduce_gradients(mod, g, average=True)  # sums again, then divides by dp·cp = 4
    out["grads"] = summed, (mod.a.grad.clone(), mod.b.grad.clone())
    return out


@pytest.fixture(scope="module")
def world4_groups():
    return run_world(4, _groups_world)


def test_backend_groups_are_the_layout_groups(world4_groups):
    for sizes in (dict(tp=2, ep=4), dict(cp=2, ep=2, etp=2), dict(ep=2)):
        L = ParallelLayout.plan(4, **sizes)
        for rank, res in enumerate(world4_groups):
            got = res[str(sizes)]
            for name in GROUP_NAMES:
                backend, ranks, index = got[name]
                expect = L.ranks_of(name, rank)
                assert ranks == expect and index == expect.index(rank), (sizes, name)
                assert backend == (None if len(expect) == 1 else expect), (sizes, name)
            assert got["ep_sum"] == sum(L.ranks_of("ep", rank))


def test_device_mesh_input(world4_groups):
    assert all(res["mesh"] == (2, 2, 4, True, "cpu") for res in world4_groups)


def test_layout_errors_raise_on_every_rank(world4_groups):
    for res in world4_groups:
        msg, secs = res["errors"]["bad"]
        assert "ep·etp = 3·1 = 3 must divide the 4 ranks" in msg and secs < 10
        msg, secs = res["errors"]["ranks_disagree"]
        assert "differ across ranks" in msg and "ep: 2 on ranks [0, 1], 4 on ranks [2, 3]" in msg and secs < 10


def test_reduce_gradients(world4_groups):
    for rank, res in enumerate(world4_groups):
        (a, b, c, frozen), (a_avg, b_avg) = res["grads"]
        assert a.tolist() == [10.0] * 3  # 1 + 2 + 3 + 4 over the stage
        assert b.tolist() == [30.0 if rank < 2 else 70.0] * 2  # over the marked group only
        assert c.tolist() == [1.0] and frozen is None  # a None gradient joins as zeros; frozen ones are left
        assert a_avg.tolist() == [10.0] * 3  # 4 · 10 / 4
        assert b_avg.tolist() == [(30.0 if rank < 2 else 70.0) * 2 / 4] * 2
