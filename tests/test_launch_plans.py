"""LaunchPlans: a plan relaunches its kernel with the tensors of the new call; with ``pick`` it takes them from the
positions the call site lists (the Gluon gmm kernel's tensor arguments are a subset of the tl kernel's)."""

from moetron.ops._launch import LaunchPlans


class _Recorder:
    """Stands in for a CachedLauncher: its relaunch records the tensors it is handed."""

    def __init__(self):
        self.calls = []

    def relauncher(self, grid, runtime_args, constexprs, options):
        return lambda tensors: self.calls.append(list(tensors))


def test_plan_hands_the_kernel_the_tensors_in_call_order():
    plans, launcher = LaunchPlans(), _Recorder()
    plans.add("key", launcher, (1,), (), {}, {})
    assert plans.run("key", ("x", "w", "bias", "out", "sizes", "gather"))
    assert launcher.calls == [["x", "w", "bias", "out", "sizes", "gather"]]


def test_plan_with_pick_hands_the_kernel_the_picked_tensors():
    plans, launcher = LaunchPlans(), _Recorder()
    plans.add("key", launcher, (1,), (), {}, {}, pick=(0, 1, 3, 4))
    assert plans.run("key", ("x", "w", "bias", "out", "sizes", "gather"))
    assert launcher.calls == [["x", "w", "out", "sizes"]]
    assert not plans.run("other", ("x",))
