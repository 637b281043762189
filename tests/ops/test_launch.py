"""moetron.ops._launch: LaunchPlans, the container of ready-to-run launches, and _DirectLaunch, the call into a
compiled kernel's C launcher, against stand-ins for Triton's objects (the launches themselves need compiled
kernels: the GPU suite runs every kernel through them, and tests/gpu/test_gmm_gpu.py reruns real plans with new
tensors)."""

import pytest
import torch
import triton

from moetron.ops._launch import LaunchPlans, _DirectLaunch


class _FakeLauncher:
    """Stands in for a CachedLauncher: its relauncher records the tensors each replay gets."""

    def __init__(self, compiled=True):
        self.compiled = compiled
        self.calls = []

    def relauncher(self, grid, runtime_args, constexprs, options):
        if not self.compiled:
            return None
        return lambda tensors: self.calls.append((grid, tuple(tensors)))


def test_run_misses_until_added_then_replays_with_the_new_tensors():
    plans, launcher = LaunchPlans(), _FakeLauncher()
    a, b = torch.zeros(2), torch.ones(3)
    assert not plans.run("k", (a,))
    plans.add("k", launcher, (4,), (a, 7), {}, {})
    assert plans.run("k", (b,))
    assert launcher.calls == [((4,), (b,))]
    assert not plans.run("other", (b,))


def test_nothing_is_stored_without_a_compiled_kernel():
    plans = LaunchPlans()
    plans.add("k", _FakeLauncher(compiled=False), (1,), (), {}, {})  # e.g. under Triton's interpreter
    assert not plans.run("k", ())


def test_a_full_cache_starts_over_instead_of_growing():
    plans, launcher = LaunchPlans(max_entries=3), _FakeLauncher()
    for m in range(7):  # a new row count every call
        plans.add(("rows", m), launcher, (1,), (), {}, {})
        assert len(plans._plans) <= 3
    assert plans.run(("rows", 6), ())
    plans.clear()
    assert not plans.run(("rows", 6), ())


class _FakeCLauncher:
    """The parts of Triton's CudaLauncher that _DirectLaunch reads, recording each call of the C entry point."""

    def __init__(self, scratch_size=0, profile_scratch_size=0):
        self.calls = []
        self.launch = lambda *args: self.calls.append(args)
        self.launch_cooperative_grid, self.launch_pdl = False, True
        self.global_scratch_size, self.global_scratch_align = scratch_size, 128
        self.profile_scratch_size = profile_scratch_size
        self.num_ctas = 1


class _FakeCompiled:
    """The parts of Triton's CompiledKernel that _DirectLaunch reads; ``compiled[grid](*args, stream=s)`` is the
    runner it falls back to."""

    def __init__(self, **launcher_kw):
        self.run = _FakeCLauncher(**launcher_kw)
        self.function, self.packed_metadata = 1234, (8, 1, 0)
        self.runner_calls = []

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.runner_calls.append((grid, args, stream))


def test_direct_launch_passes_the_c_launcher_its_arguments_in_order():
    compiled = _FakeCompiled()
    direct = _DirectLaunch.make(compiled)
    direct((3, 1, 1), [7, "ptr", 2.5], 99)
    # grid, stream, function, cooperative, pdl, global scratch, profile scratch, packed metadata, launch metadata,
    # enter hook, exit hook, then the kernel's own arguments
    assert compiled.run.calls == [(3, 1, 1, 99, 1234, False, True, None, None, (8, 1, 0), None, None, None,
                                   7, "ptr", 2.5)]
    assert compiled.runner_calls == []


def test_direct_launch_takes_the_scratch_from_the_contexts_allocator():
    # the allocator in Triton's context decides (Inductor installs its own; moetron's only where none is set), and
    # it is asked for one scratch slot per program
    allocation = pytest.importorskip("triton.runtime._allocation")
    asked = []
    token = allocation._allocator.set(lambda size, align, stream: asked.append((size, align, stream)) or "scratch")
    try:
        compiled = _FakeCompiled(scratch_size=256)
        _DirectLaunch.make(compiled)((4, 2, 1), [1], 5)
    finally:
        allocation._allocator.reset(token)
    assert asked == [(4 * 2 * 256, 128, 5)]
    assert compiled.run.calls[0][7] == "scratch"


def test_direct_launch_defers_to_triton_while_a_launch_hook_is_installed():
    compiled = _FakeCompiled()
    direct = _DirectLaunch.make(compiled)
    hook = lambda metadata: None  # noqa: E731
    chain = triton.knobs.runtime.launch_enter_hook
    if chain is None or not hasattr(chain, "add"):
        pytest.skip("this Triton keeps its launch hooks differently")
    chain.add(hook)
    try:
        direct((2, 1, 1), [1, 2], 7)
    finally:
        chain.remove(hook)
    assert compiled.run.calls == [] and compiled.runner_calls == [((2, 1, 1), (1, 2), 7)]
    direct((2, 1, 1), [1, 2], 7)
    assert len(compiled.run.calls) == 1


def test_direct_launch_declines_unknown_or_instrumented_kernels():
    assert _DirectLaunch.make(object()) is None  # another Triton's compiled-kernel layout
    assert _DirectLaunch.make(_FakeCompiled(profile_scratch_size=64)) is None


def test_per_launch_scratch_swaps_the_contexts_allocator_and_restores_it():
    # moetron's custom ops run their kernels with a scratch allocation per launch (CUDA-graph trees reject a
    # cache made inside their pool); outside, the allocator in Triton's context is what it was
    allocation = pytest.importorskip("triton.runtime._allocation")
    from moetron.ops._launch import _per_launch_scratch, ensure_scratch_allocator, per_launch_scratch

    before = allocation._allocator.get()
    with per_launch_scratch():
        assert ensure_scratch_allocator() is _per_launch_scratch
    assert allocation._allocator.get() is before
