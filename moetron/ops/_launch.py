"""Low-overhead Triton launches.

``kernel[grid](...)`` re-derives the kernel's specialization from every argument on every call; with twenty
arguments and two TMA descriptors that cost ~110 us of host time per launch on the H100 machine
(benchmarks/gmm_overhead.py), longer than a small grouped GEMM takes on the GPU. ``CachedLauncher`` keeps the
compiled kernel per specialization and calls it directly. Its key is at least as fine as Triton's own
(int: ==1, %16, 32-bit range; tensor: dtype and 16-byte alignment; host descriptor: dtype, block shape,
padding; constexprs by value), so a cache hit always runs the kernel Triton itself would pick. Under Triton's CPU
interpreter, or if a Triton release lacks the compiled-kernel call, it falls back to the normal launch.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

try:
    from triton.runtime import _allocation
except ImportError:  # a Triton without device-side descriptors: the TMA kernels are not used there
    _allocation = None


_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
               torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_recorded: set = set()


def _type_name(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def _record(kernel, runtime_args, constexprs: dict, options: dict) -> None:
    """With MOETRON_RECORD_KERNELS=<dir>, append each new specialization this process launches (kernel, argument
    types, constexprs, options) to <dir>/<pid>.jsonl. tests/test_sm90_compile.py compiles what a CPU run
    recorded for a Hopper GPU offline: Triton's interpreter accepts programs the compiler rejects."""
    out_dir = os.environ.get("MOETRON_RECORD_KERNELS")
    if not out_dir:
        return
    fn = getattr(kernel, "fn", kernel)
    line = json.dumps({"module": fn.__module__, "name": fn.__name__,
                       "types": [_type_name(a) for a in runtime_args], "constexprs": constexprs,
                       "options": options}, sort_keys=True)
    if line not in _recorded:
        _recorded.add(line)
        with open(os.path.join(out_dir, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(line + "\n")


_scratch_by_stream: dict = {}


def _torch_scratch(size: int, alignment: int, stream):
    """Triton asks for global scratch memory on every launch of a kernel that builds TMA descriptors on the
    device (128 bytes per descriptor per program). Launches on one stream run one after the other, so they
    share one buffer per (device, stream): an allocation per launch cost ~10 us of host time, more on autograd's
    thread. Under CUDA-graph capture each launch gets its own buffer from the graph's pool, since a replay may
    run beside eager work on the capture stream."""
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(size, dtype=torch.int8, device="cuda")
    key = (torch.cuda.current_device(), stream)
    buffer = _scratch_by_stream.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(max(size, 1 << 16), dtype=torch.int8, device="cuda")
        _scratch_by_stream[key] = buffer
    return buffer


def ensure_scratch_allocator():
    """Install a torch-backed Triton scratch allocator in this thread's context if none is set, and return the
    context's allocator. Triton keeps it in a ContextVar, so autograd's backward threads start without one;
    checking per launch (a ContextVar read) covers them. An allocator someone else installed stays in charge:
    Inductor installs one that allocates per launch, and under its CUDA graphs a buffer that ``_torch_scratch``
    kept from a warm-up run would be a live allocation in the graph's pool, which cudagraph trees reject."""
    if _allocation is None:
        return _torch_scratch
    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)
        return _torch_scratch
    return current


def _per_launch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def per_launch_scratch():
    """Inside, device-descriptor scratch is allocated per launch instead of taken from ``_torch_scratch``'s cache
    (as Inductor does for its own kernels). For moetron's custom ops, which run inside compiled graphs: CUDA-graph
    trees reject allocations in their pool that outlive the call, and a cache made during their warm-up is one."""
    if _allocation is None:
        yield
        return
    token = _allocation._allocator.set(_per_launch_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _launch_hooks_idle() -> bool:
    """No Triton launch hook is installed (a profiler such as proton installs them). Triton 3.6 keeps them as
    hook chains that are never None, so its own runner builds launch metadata and calls two empty chains from C on
    every launch."""
    runtime = triton.knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class _DirectLaunch:
    """Launches one compiled kernel through its C launcher, skipping Triton's Python runner: the stream is the
    caller's, the device-side descriptors' scratch comes from the context's allocator
    (``ensure_scratch_allocator``), and no launch metadata is built while no launch hook is installed (otherwise
    it defers to the runner, so hooks still see every launch). ``make`` returns None for a Triton whose compiled
    kernels are laid out differently; callers then keep the runner. Pointer arguments may be tensors or their
    ``data_ptr()`` ints (the C launcher takes an int as the device address as is, without a driver query)."""

    __slots__ = ("compiled", "launch", "function", "packed", "cooperative", "pdl", "scratch_size", "scratch_align",
                 "num_ctas")

    @classmethod
    def make(cls, compiled):
        try:
            launcher = compiled.run  # loads the module on first use
            self = cls()
            self.compiled = compiled
            self.launch = launcher.launch
            self.function = compiled.function
            self.packed = compiled.packed_metadata
            self.cooperative = launcher.launch_cooperative_grid
            self.pdl = launcher.launch_pdl
            self.scratch_size = launcher.global_scratch_size
            self.scratch_align = launcher.global_scratch_align
            self.num_ctas = launcher.num_ctas
            if launcher.profile_scratch_size:  # instrumented kernels: Triton's runner knows what they need
                return None
        except AttributeError:
            return None
        return self

    def __call__(self, grid, args, stream):
        """``grid``: three dims; ``args``: every kernel parameter in order, constexprs included."""
        if not _launch_hooks_idle():
            self.compiled[grid](*args, stream=stream)
            return
        scratch = None
        if self.scratch_size:
            scratch = ensure_scratch_allocator()(grid[0] * grid[1] * grid[2] * self.num_ctas * self.scratch_size,
                                                 self.scratch_align, stream)
        self.launch(grid[0], grid[1], grid[2], stream, self.function, self.cooperative, self.pdl, scratch, None,
                    self.packed, None, None, None, *args)


def _arg_key(value):
    kind = type(value)
    if kind is int:
        return (value == 1, value % 16 == 0, -(2**31) <= value < 2**31)
    if kind is torch.Tensor or isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if kind is TensorDescriptor:
        return (value.base.dtype, tuple(value.block_shape), value.padding)
    return (kind, value)


class CachedLauncher:
    """Wraps a ``@triton.jit`` kernel: ``launcher(grid, runtime_args, constexprs, **options)``.

    ``runtime_args`` lists the non-constexpr parameters in signature order; ``constexprs`` maps constexpr
    parameter names to values; ``options`` are launch options such as num_warps and num_stages."""

    def __init__(self, kernel, device_scratch: bool = False):
        self.kernel = kernel
        self.device_scratch = device_scratch  # the kernel builds TMA descriptors on the device
        self.names = list(kernel.arg_names)
        self._compiled: dict = {}

    # torch.compiler.disable here and on LaunchPlans: Dynamo does not trace into launches (Triton internals, calls
    # of compiled kernels, data pointers in cache keys), so a model compiled around moetron's ops runs them as
    # they run eagerly, behind a graph break (tests/test_compile.py). It costs ~0.3 us per call.
    @torch.compiler.disable
    def __call__(self, grid, runtime_args, constexprs: dict, **options):
        if not hasattr(self.kernel, "device_caches"):  # Triton's CPU interpreter
            return self._launch(grid, runtime_args, constexprs, options)
        key = self._key(runtime_args, constexprs, options)
        hit = self._compiled.get(key)
        if self.device_scratch and (hit is None or hit[1] is None):
            ensure_scratch_allocator()  # Triton's own launch asks its context; a direct launch does that itself
        if hit is None:
            compiled = self._launch(grid, runtime_args, constexprs, options)
            if hasattr(compiled, "__getitem__"):
                self._compiled[key] = (compiled, _DirectLaunch.make(compiled), [n in constexprs for n in self.names])
            return compiled
        compiled, direct, is_constexpr = hit
        it = iter(runtime_args)
        grid = tuple(grid) + (1,) * (3 - len(grid))  # the compiled kernel's runner wants all three dims
        args = [constexprs[n] if c else next(it) for n, c in zip(self.names, is_constexpr)]
        if direct is not None:
            direct(grid, args, torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice()))
        else:
            compiled[grid](*args)
        return compiled

    @staticmethod
    def _key(runtime_args, constexprs: dict, options: dict) -> tuple:
        return (torch._C._cuda_getDevice(), tuple(_arg_key(a) for a in runtime_args), tuple(constexprs.items()),
                tuple(options.items()))

    def relauncher(self, grid, runtime_args, constexprs: dict, options: dict):
        """After a launch with these arguments: ``f(tensors)`` launches the same compiled kernel with the same grid
        and non-tensor arguments, and ``tensors`` in place of the tensors of ``runtime_args`` (same order). None
        under the interpreter or before the first launch. The caller's cache key must pin everything the
        specialization and the non-tensor arguments depend on (dtypes, 16-byte alignment, shapes, strides)."""
        hit = self._compiled.get(self._key(runtime_args, constexprs, options)) if self._compiled else None
        if hit is None:
            return None
        compiled, direct, is_constexpr = hit
        it = iter(runtime_args)
        template = [constexprs[n] if c else next(it) for n, c in zip(self.names, is_constexpr)]
        slots = [i for i, v in enumerate(template) if isinstance(v, torch.Tensor)]
        for i in slots:
            template[i] = None  # hold no reference to this call's tensors
        grid = tuple(grid) + (1,) * (3 - len(grid))
        device = torch.cuda.current_device()
        current_stream = torch._C._cuda_getCurrentRawStream

        if direct is not None:
            def relaunch(tensors):
                args = template.copy()
                for i, t in zip(slots, tensors):
                    args[i] = t.data_ptr()  # the plan's key pinned device, dtype and alignment
                direct(grid, args, current_stream(device))

            return relaunch

        runner = compiled[grid]
        scratch = self.device_scratch

        def relaunch(tensors):
            if scratch:
                ensure_scratch_allocator()
            args = template.copy()
            for i, t in zip(slots, tensors):
                args[i] = t
            # the stream straight from torch (what Triton's runner would look up through its driver layer)
            runner(*args, stream=current_stream(device))

        return relaunch

    def _launch(self, grid, runtime_args, constexprs, options):
        _record(self.kernel, runtime_args, constexprs, options)
        runtime_names = [n for n in self.names if n not in constexprs]
        return self.kernel[grid](**dict(zip(runtime_names, runtime_args)), **constexprs, **options)


class LaunchPlans:
    """Ready-to-run launches of one call site, keyed by everything that decides the launch except the tensors'
    addresses. A hit skips the call site's Python (config choice, argument lists, specialization key) and runs
    the compiled kernel straight away: the host cost of a small grouped GEMM is mostly that Python, and it runs
    2-4x slower on autograd's backward thread than on the main thread (benchmarks/NOTES.md)."""

    def __init__(self, max_entries: int = 512):
        self._plans: dict = {}
        self.max_entries = max_entries

    @torch.compiler.disable
    def run(self, key, tensors) -> bool:
        """Launch the plan of ``key`` with ``tensors``; False if there is none yet."""
        plan = self._plans.get(key)
        if plan is None:
            return False
        plan(tensors)
        return True

    @torch.compiler.disable
    def add(self, key, launcher: CachedLauncher, grid, runtime_args, constexprs: dict, options: dict,
            pick: tuple | None = None) -> None:
        """Remember the launch just made through ``launcher`` with these arguments under ``key``. ``pick``: where
        the launch's tensor arguments sit in the ``tensors`` that ``run`` is given, when not in the same order."""
        relaunch = launcher.relauncher(grid, runtime_args, constexprs, options)
        if relaunch is None:
            return
        if pick is not None:
            launch_tensors = relaunch

            def relaunch(tensors):
                launch_tensors([tensors[i] for i in pick])
        if len(self._plans) >= self.max_entries:  # e.g. a new row count every step: start over, never grow
            self._plans.clear()
        self._plans[key] = relaunch

    def clear(self) -> None:
        self._plans.clear()
