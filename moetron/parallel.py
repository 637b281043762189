"""Process groups for expert parallelism, folded apart from the attention groups (Megatron-Core's "MoE parallel
folding"), gradient reduction, and global-expert-id checkpoints.

Legend: W world size, TP/CP/DP/PP attention tensor/context/data/pipeline parallel sizes, ETP/EP/EDP expert
tensor/expert/expert-data parallel sizes, E experts.

Two independent orderings of the same W ranks (the first name varies fastest):

    attention   tp-cp-dp-pp      rank = tp + TP·(cp + CP·(dp + DP·pp))          TP·CP·DP·PP = W
    MoE         etp-ep-edp-pp    rank = etp + ETP·(ep + EP·(edp + EDP·pp))       ETP·EP·EDP·PP = W

Both share PP (the slowest dimension), so inside one pipeline stage the EP×ETP groups are subgroups of the
stage's TP×CP×DP ranks: EP can reuse the ranks of attention DP, CP and TP at once (CP=8 with EP=8 needs 8 ranks,
not 64), and the experts can use a tensor-parallel size (ETP) other than attention's. Every rank of a stage holds
its own tokens (TP with sequence parallelism, CP and DP all split tokens), so the MoE layer sees ``[T_local, H]``
on each rank and never needs attention TP itself: it only sums the router's gradient and aux-loss counts over
the whole stage.

Example layouts, W = 8 (``ParallelLayout.plan(8, tp=2, ep=4).table()``; each cell is the group holding the
rank, named by its lowest rank):

    W=8 tp=2 cp=1 dp=4 pp=1 | etp=1 ep=4 edp=2
    rank | tp cp dp pp | etp ep edp | tp-grp dp-grp | ep-grp edp-grp
       0 |  0  0  0  0 |   0  0   0 |      0      0 |      0       0
       1 |  1  0  0  0 |   0  1   0 |      0      1 |      0       1
       2 |  0  0  1  0 |   0  2   0 |      2      0 |      0       2
       3 |  1  0  1  0 |   0  3   0 |      2      1 |      0       3
       4 |  0  0  2  0 |   0  0   1 |      4      0 |      4       0
       5 |  1  0  2  0 |   0  1   1 |      4      1 |      4       1
       6 |  0  0  3  0 |   0  2   1 |      6      0 |      4       2
       7 |  1  0  3  0 |   0  3   1 |      6      1 |      4       3

    W=8 tp=1 cp=2 dp=4 pp=1 | etp=2 ep=2 edp=2   (experts split in F over rank pairs {0,1}, {2,3}, ...;
                                                  ep groups {0,2}, {1,3}, {4,6}, {5,7}; edp {0,4}, ...)

Group names accepted by ``ParallelGroups.get`` (each partitions the world):

    "tp", "cp", "dp", "pp"   attention tensor / context / data / pipeline parallel
    "tp_cp"                  ranks holding pieces of the same sequences (sequence aux loss counts)
    "dp_cp"                  attention's data-parallel replicas (gradients of TP-sharded dense weights)
    "tp_cp_dp"               every rank of this pipeline stage: the router, shared experts, aux-loss counts
    "etp", "ep", "edp"       expert tensor / expert / expert-data parallel
    "ep_etp"                 ranks that exchange tokens (the allgather dispatcher's group)
    "etp_edp"                ranks holding the same experts (ETP-replicated expert weights such as down_proj_bias)

Gradients (``reduce_gradients``): a parameter's gradient is summed over the ranks that hold a copy of it and see
different tokens. Expert weights sharded over EP/ETP: over "edp". Expert weights replicated over ETP
(``down_proj_bias``, applied on ETP rank 0 only): over "etp_edp". Everything else in moetron (router, shared
experts, and by default any other parameter): over "tp_cp_dp". A parameter that is itself split over attention
TP marks this with ``param.moetron_grad_group = "dp_cp"``. The default sums: each rank's loss is its share of the
global objective, and the router's aux losses are written that way (see ``moetron/router.py``).
``average=True`` divides by DP·CP instead, Megatron's scaling, for losses that are means over each replica's
tokens; then scale the aux losses to match with ``AuxLossAutoScaler.set_loss_scale(DP·CP)``.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

__all__ = ["ParallelLayout", "ParallelGroups", "GROUP_NAMES", "reduce_gradients", "save_checkpoint",
           "load_checkpoint"]

_ATTN_DIMS = ("pp", "dp", "cp", "tp")  # slowest to fastest
_MOE_DIMS = ("pp", "edp", "ep", "etp")
# name -> (ordering, dimensions varying inside one group)
_KINDS = {
    "tp": ("attn", ("tp",)),
    "cp": ("attn", ("cp",)),
    "dp": ("attn", ("dp",)),
    "pp": ("attn", ("pp",)),
    "tp_cp": ("attn", ("cp", "tp")),
    "dp_cp": ("attn", ("dp", "cp")),
    "tp_cp_dp": ("attn", ("dp", "cp", "tp")),
    "etp": ("moe", ("etp",)),
    "ep": ("moe", ("ep",)),
    "edp": ("moe", ("edp",)),
    "ep_etp": ("moe", ("ep", "etp")),
    "etp_edp": ("moe", ("edp", "etp")),
}
GROUP_NAMES = tuple(_KINDS)

# where each parameter's gradient is summed (reduce_gradients); unmarked parameters use the default
GRAD_GROUP_ATTR = "moetron_grad_group"
_DEFAULT_GRAD_GROUP = "tp_cp_dp"


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


@dataclass(frozen=True)
class ParallelLayout:
    """The sizes of a folded layout and the rank arithmetic, without torch.distributed. Build with ``plan``."""

    world_size: int
    tp: int
    cp: int
    dp: int
    pp: int
    etp: int
    ep: int
    edp: int

    @classmethod
    def plan(cls, world_size: int, *, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1,
             etp: int = 1) -> "ParallelLayout":
        """Derive DP and EDP and check that the sizes fit: TP·CP·PP must divide W (DP = W / (TP·CP·PP)), and
        EP·ETP must divide a stage's TP·CP·DP ranks (EDP = W / (PP·EP·ETP)). Raises ValueError naming the
        numbers otherwise."""
        for name, v in (("world_size", world_size), ("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep), ("etp", etp)):
            _positive_int(name, v)
        if world_size % (tp * cp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp·cp·pp = {tp}·{cp}·{pp} = "
                             f"{tp * cp * pp}; the attention layout needs W = tp·cp·dp·pp")
        stage = world_size // pp
        if stage % (ep * etp):
            raise ValueError(f"ep·etp = {ep}·{etp} = {ep * etp} must divide the {stage} ranks of a pipeline stage "
                             f"(tp·cp·dp = {tp}·{cp}·{stage // (tp * cp)}, world size {world_size} / pp {pp}); "
                             "expert groups fold inside a stage")
        return cls(world_size, tp, cp, stage // (tp * cp), pp, etp, ep, stage // (ep * etp))

    # -- rank arithmetic --------------------------------------------------------------------------------------

    def _shape(self, order: str) -> dict:
        dims = _ATTN_DIMS if order == "attn" else _MOE_DIMS
        return {d: getattr(self, d) for d in dims}

    def coords(self, rank: int) -> dict:
        """{dimension: index} of a rank in both orderings (keys tp, cp, dp, pp, etp, ep, edp)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {rank}")
        out = {}
        for order in ("attn", "moe"):
            r = rank
            for d, size in reversed(list(self._shape(order).items())):
                out[d] = r % size
                r //= size
        return out

    def _rank(self, order: str, c: dict) -> int:
        r = 0
        for d, size in self._shape(order).items():
            r = r * size + c[d]
        return r

    def group_ranks(self, name: str) -> list[list[int]]:
        """All groups of one kind (a partition of the ranks), each an ascending list of ranks."""
        if name not in _KINDS:
            raise ValueError(f"group name must be one of {GROUP_NAMES}, got {name!r}")
        order, vary = _KINDS[name]
        shape = self._shape(order)
        fixed = [d for d in shape if d not in vary]
        groups = []
        for fixed_idx in itertools.product(*(range(shape[d]) for d in fixed)):
            c = dict(zip(fixed, fixed_idx))
            members = []
            for vary_idx in itertools.product(*(range(shape[d]) for d in vary)):
                c.update(zip(vary, vary_idx))
                members.append(self._rank(order, c))
            groups.append(sorted(members))
        return sorted(groups)

    def ranks_of(self, name: str, rank: int) -> list[int]:
        """The ranks in ``rank``'s group of kind ``name``."""
        for g in self.group_ranks(name):
            if rank in g:
                return g
        raise AssertionError("unreachable: every kind partitions the ranks")

    def size(self, name: str) -> int:
        order, vary = _KINDS[name]
        n = 1
        for d in vary:
            n *= getattr(self, d)
        return n

    def table(self) -> str:
        """The layout as text: sizes, then one row per rank with its coordinates and groups (the documentation
        table above is this output)."""
        head = (f"W={self.world_size} tp={self.tp} cp={self.cp} dp={self.dp} pp={self.pp} | "
                f"etp={self.etp} ep={self.ep} edp={self.edp}")
        rows = [head, "rank | tp cp dp pp | etp ep edp | tp-grp dp-grp | ep-grp edp-grp"]
        for r in range(self.world_size):
            c = self.coords(r)
            g = {n: self.ranks_of(n, r)[0] for n in ("tp", "dp", "ep", "edp")}
            rows.append(f"{r:4d} | {c['tp']:2d} {c['cp']:2d} {c['dp']:2d} {c['pp']:2d} | {c['etp']:3d} {c['ep']:2d} "
                        f"{c['edp']:3d} | {g['tp']:6d} {g['dp']:6d} | {g['ep']:6d} {g['edp']:7d}")
        return "\n".join(rows)


class ParallelGroups:
    """The process groups of one folded layout, for this rank.

    Build with ``ParallelGroups.build(tp=..., cp=..., pp=..., ep=..., etp=...)`` after
    ``torch.distributed.init_process_group`` (every rank calls it with the same sizes, in the same order
    relative to other group creation), or ``ParallelGroups.single()`` for one process.

    ``get(name)`` returns the ``ProcessGroup`` of that kind holding this rank (``GROUP_NAMES``), or None where the
    group has one rank (nothing to communicate). ``size(name)``, ``rank_in(name)`` (this rank's index inside the
    group, the backend's group rank) and ``ranks(name)`` (global ranks) describe it; ``layout`` holds the sizes,
    and ``tp_size``, ``ep_rank``, ... are shortcuts.
    """

    def __init__(self, layout: ParallelLayout, rank: int, groups: dict, device_type: str | None = None):
        self.layout = layout
        self.rank = rank
        self._groups = groups
        self.device_type = device_type
        self._meshes: dict = {}
        self._coords = layout.coords(rank)

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def single(cls) -> "ParallelGroups":
        """One process, every group of size one."""
        return cls(ParallelLayout.plan(1), 0, {})

    @classmethod
    def build(cls, *, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1, etp: int = 1, mesh=None,
              timeout: timedelta | None = None) -> "ParallelGroups":
        """Create the groups of the layout over the default process group (a collective: every rank calls it
        with the same arguments).

        ``mesh``: optionally a ``torch.distributed.device_mesh.DeviceMesh`` of the whole world describing the
        attention side, with dimension names from ("pp", "dp", "cp", "tp") in that order (as
        ``init_device_mesh(device, (dp, tp), mesh_dim_names=("dp", "tp"))`` builds it). Its sizes override
        tp/cp/pp, its groups are reused for those dimensions, and its device type is remembered for checkpoints.

        Raises ValueError on an invalid layout, or when ranks passed different arguments (all ranks raise).
        With NCCL, call ``torch.cuda.set_device(local_rank)`` first (the argument check is an
        ``all_gather_object``, as is MoELayer's config check).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("ParallelGroups.build needs torch.distributed.init_process_group first "
                             "(use ParallelGroups.single() for one process)")
        world, rank = dist.get_world_size(), dist.get_rank()
        mesh_groups, device_type = {}, None
        if mesh is not None:
            sizes, mesh_groups, device_type = _read_mesh(mesh, world)
            tp, cp, pp = sizes.get("tp", 1), sizes.get("cp", 1), sizes.get("pp", 1)
            want_dp = sizes.get("dp")
        # every rank must agree before any group is created, or group creation itself would hang
        args = dict(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, world=world)
        seen = [None] * world
        dist.all_gather_object(seen, args)
        _raise_on_mismatch("ParallelGroups.build arguments", seen)
        layout = ParallelLayout.plan(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)
        if mesh is not None and want_dp is not None and want_dp != layout.dp:
            raise ValueError(f"mesh dimension 'dp' has size {want_dp}, but the world of {world} ranks with "
                             f"tp={tp}, cp={cp}, pp={pp} gives dp={layout.dp}")
        groups, made = {}, {}
        for name in GROUP_NAMES:  # the same order on every rank
            if layout.size(name) == 1:
                continue
            if name in mesh_groups:
                groups[name] = mesh_groups[name]
                continue
            key = tuple(map(tuple, layout.group_ranks(name)))
            if key not in made:
                kw = {} if timeout is None else {"timeout": timeout}
                made[key] = dist.new_subgroups_by_enumeration([list(g) for g in key], **kw)[0]
            groups[name] = made[key]
        return cls(layout, rank, groups, device_type)

    # -- queries ----------------------------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if name not in _KINDS:
            raise ValueError(f"group name must be one of {GROUP_NAMES}, got {name!r}")

    def get(self, name: str):
        """The ProcessGroup of kind ``name`` holding this rank, or None when that group has one rank."""
        self._check_name(name)
        return self._groups.get(name)

    def size(self, name: str) -> int:
        self._check_name(name)
        return self.layout.size(name)

    def ranks(self, name: str) -> list[int]:
        """Global ranks of this rank's group of kind ``name``, ascending (the backend's group order)."""
        self._check_name(name)
        return self.layout.ranks_of(name, self.rank)

    def rank_in(self, name: str) -> int:
        """This rank's index inside its group of kind ``name``."""
        return self.ranks(name).index(self.rank)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def __getattr__(self, attr):
        # tp_size, ep_rank, ... : sizes from the layout, ranks from the coordinates (this is only reached for
        # attributes not found normally; copy/pickle probe a half-built object, hence the .get)
        coords = self.__dict__.get("_coords")
        if coords is not None and attr.endswith("_rank") and attr[:-5] in coords:
            return coords[attr[:-5]]
        if attr.endswith("_size") and "layout" in self.__dict__ and attr[:-5] in coords:
            return getattr(self.layout, attr[:-5])
        raise AttributeError(f"{type(self).__name__} has no attribute {attr!r}")

    def __repr__(self) -> str:
        L = self.layout
        return (f"ParallelGroups(rank={self.rank}, world={L.world_size}, tp={L.tp}, cp={L.cp}, dp={L.dp}, "
                f"pp={L.pp}, etp={L.etp}, ep={L.ep}, edp={L.edp})")

    def expert_mesh(self, device_type: str):
        """A 2-D DeviceMesh ("expert_replica", "ep") over this stage, for expert weights as DTensors: rows are
        the ranks holding the same experts (EDP×ETP), columns the EP ranks. Built once per device type."""
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import DeviceMesh

            L = self.layout
            stage = self.ranks("tp_cp_dp")
            base = stage[0]
            # rank = base + etp + ETP·(ep + EP·edp); replica index = etp + ETP·edp (ascending in rank)
            grid = torch.empty(L.edp * L.etp, L.ep, dtype=torch.int64)
            for edp in range(L.edp):
                for etp in range(L.etp):
                    for ep in range(L.ep):
                        grid[etp + L.etp * edp, ep] = base + etp + L.etp * (ep + L.ep * edp)
            groups = [self._mesh_group("etp_edp"), self._mesh_group("ep")]
            self._meshes[device_type] = DeviceMesh.from_group(groups, device_type, mesh=grid,
                                                              mesh_dim_names=("expert_replica", "ep"))
        return self._meshes[device_type]

    def _mesh_group(self, name: str):
        g = self.get(name)
        if g is None:  # a one-rank dimension still needs a group object in a DeviceMesh
            import torch.distributed as dist

            key = ("_single", name)
            if key not in self._groups:
                # every rank creates its own one-rank group in the same call order: a collective over the world
                made = dist.new_subgroups_by_enumeration([[r] for r in range(self.world_size)])[0]
                self._groups[key] = made
            g = self._groups[key]
        return g


def _read_mesh(mesh, world: int):
    names = mesh.mesh_dim_names
    if not names:
        raise ValueError("mesh must have mesh_dim_names from ('pp', 'dp', 'cp', 'tp')")
    bad = [n for n in names if n not in _ATTN_DIMS]
    if bad:
        raise ValueError(f"mesh dimension names must come from ('pp', 'dp', 'cp', 'tp'), got {tuple(names)}")
    ordered = [n for n in _ATTN_DIMS if n in names]
    if list(names) != ordered:
        raise ValueError(f"mesh dimensions must be in the order pp, dp, cp, tp (slowest first, Megatron's "
                         f"tp-cp-dp-pp), got {tuple(names)}")
    flat = mesh.mesh.flatten().tolist()
    if flat != list(range(world)):
        raise ValueError(f"mesh must span the world's {world} ranks in order (as init_device_mesh builds it), got "
                         f"ranks {flat}")
    sizes = dict(zip(names, mesh.mesh.shape))
    groups = {n: mesh.get_group(n) for n in names if sizes[n] > 1}
    return sizes, groups, mesh.device_type


def _raise_on_mismatch(what: str, values: list) -> None:
    """Raise ValueError naming every field that differs across ranks (values: one dict per rank)."""
    diffs = []
    for key in values[0]:
        by_value: dict = {}
        for r, v in enumerate(values):
            by_value.setdefault(repr(v.get(key)), []).append(r)
        if len(by_value) > 1:
            diffs.append(f"{key}: " + ", ".join(f"{val} on ranks {ranks}" for val, ranks in by_value.items()))
    if diffs:
        raise ValueError(f"{what} differ across ranks (every rank must pass the same): " + "; ".join(diffs))


def check_same_on_all_ranks(what: str, value: dict, group) -> None:
    """One all_gather_object over ``group``; raises the same ValueError on every rank if any entry of ``value``
    differs between ranks (instead of a collective hanging later)."""
    import torch.distributed as dist

    if group is None:
        return
    seen = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, value, group=group)
    _raise_on_mismatch(what, seen)


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reduce_gradients(module: torch.nn.Module, groups: ParallelGroups, *, average: bool = False,
                     params=None) -> None:
    """Sum every parameter's gradient over the ranks holding a copy of it (see the module docstring): expert
    shards over "edp", ETP-replicated expert weights over "etp_edp", all others over "tp_cp_dp" unless marked
    ``param.moetron_grad_group = name``. A None gradient takes part as zeros (an idle expert's bias, or ETP rank
    > 0's ``down_proj_bias``) and is set afterwards. One all_reduce per (group, dtype, device) bucket.

    ``average=True`` divides by DP·CP afterwards (Megatron's data-parallel scaling, the same for expert and
    dense weights). ``params``: the tensors whose ``.grad`` to reduce instead of ``module.parameters()`` (fp32
    master copies that carry their parameter's ``moetron_grad_group``). Call on every rank, after backward, before
    the optimizer step."""
    import torch.distributed as dist

    buckets: dict = {}
    for p in (module.parameters() if params is None else params):
        if not p.requires_grad:
            continue
        name = getattr(p, GRAD_GROUP_ATTR, _DEFAULT_GRAD_GROUP)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((name, p.grad.dtype, p.grad.device), []).append(p)
    scale = 1.0 / (groups.dp_size * groups.cp_size) if average else None
    for (name, _, _), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), str(kv[0][2]))):
        group = groups.get(name)
        if group is not None:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        if scale is not None:
            for p in params:
                p.grad.mul_(scale)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def save_checkpoint(module: torch.nn.Module, path) -> None:
    """Write ``module.state_dict()`` with ``torch.distributed.checkpoint`` (every rank calls it). Expert weights
    of expert-parallel MoELayers are DTensors of their global shape [E, ...], so the files are keyed by global
    expert id and load at any EP/ETP size, or in one process."""
    import torch.distributed.checkpoint as dcp

    state = module.state_dict()
    with _single_process_quietly() as no_dist:
        dcp.save(state, checkpoint_id=str(path), no_dist=no_dist)


def load_checkpoint(module: torch.nn.Module, path) -> None:
    """Read a ``save_checkpoint`` directory into ``module`` at its own layout (every rank calls it; one process
    works too): each rank reads the slices of the global tensors it holds."""
    import torch.distributed.checkpoint as dcp

    sd = module.state_dict()
    with _single_process_quietly() as no_dist:
        dcp.load(sd, checkpoint_id=str(path), no_dist=no_dist)
    module.load_state_dict(sd)


@contextlib.contextmanager
def _single_process_quietly():
    """Yields whether torch.distributed is off; then DCP's "assuming a single process" warning is the intent."""
    import torch.distributed as dist

    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield no_dist
