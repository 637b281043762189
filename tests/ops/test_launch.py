"""moetron.ops._launch.LaunchPlans, the container of ready-to-run launches (the launches themselves need compiled
kernels: tests/gpu/test_gmm_gpu.py reruns real plans with new tensors on a GPU)."""

import torch

from moetron.ops._launch import LaunchPlans


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
