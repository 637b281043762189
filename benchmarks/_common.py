"""Shared benchmark plumbing: timing, metadata and the DESIGN.md results format."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import threading
import time

import torch


def gpu_tag() -> str:
    """Short device name for result files: 'h100', 'h200', ... or 'cpu'."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    match = re.search(r"\b([abhl]\d{2,3}|gb\d{3}|b\d{3})\b", name)
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def meta() -> dict:
    import triton

    # the device machine gets a copy of the tree without .git: pass MOETRON_COMMIT there
    commit = os.environ.get("MOETRON_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
        except OSError:
            commit = "unknown"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_ms(fn, grad_to_none=None, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() with triton.testing.do_bench, after an explicit warm-up call."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                   return_mode="median")


def write_results(name: str, rows: list[dict], extra_meta: dict | None = None, out_dir: str | None = None) -> str:
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}_{gpu_tag()}.json")
    with open(path, "w") as f:
        json.dump({"meta": {**meta(), **(extra_meta or {})}, "rows": rows}, f, indent=1)
    return path


def dump_results(filename: str, rows: list[dict], extra_meta: dict | None = None, out_dir: str | None = None) -> str:
    """Like write_results, with the whole file name given (``ep_h200x2.json``)."""
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, filename)
    with open(path, "w") as f:
        json.dump({"meta": {**meta(), **(extra_meta or {})}, "rows": rows}, f, indent=1)
    return path


def megatron_without_te() -> None:
    """Let Megatron-Core releases that reference Transformer Engine's GEMM unguarded run without it: 0.16.1 (the
    version in this workplace's local index) reads ``moe_utils.te_general_gemm`` in its router GEMM, a name it
    defines only when Transformer Engine imports, so the router raised NameError; None is what later releases set
    (0.19.2 runs as is). No-op where the name exists."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class PowerSampler:
    """The GPU's SM clock and board power, sampled by ``nvidia-smi`` every ``interval_ms`` in a background thread,
    averaged over windows of the caller's choosing. An H100 running dense GEMMs meets its 700 W cap and clocks
    down (to ~1350-1600 MHz of 1980 here), so a compute-bound step's time follows the energy it spends, while a
    lighter one runs at full clock (benchmarks/NOTES.md, session 22): these numbers say which a timing was. The
    clock is read as it is; the driver's power.draw is a one-second average on Ampere and newer, so over windows
    shorter than that it blends in what ran just before.

        sampler = PowerSampler()              # CUDA device 0 (by UUID); nothing sampled without nvidia-smi
        t0 = time.monotonic(); run(); t1 = time.monotonic()
        sampler.mean(t0, t1)                  # {"sm_clock_mhz": ..., "power_w": ...}, or {} with no samples
        sampler.close()

    ``command`` replaces the nvidia-smi command line (tests): each line it prints is ``clock, power``."""

    def __init__(self, interval_ms: int = 50, device: int = 0, command: list[str] | None = None):
        self.samples: list[tuple[float, float, float]] = []  # (time.monotonic(), MHz, W)
        if command is None:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"  # CUDA_VISIBLE_DEVICES-proof
            command = ["nvidia-smi", f"--id={uuid}", "--query-gpu=clocks.sm,power.draw",
                       "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"]
        try:
            self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi: windows come back empty
            self._proc = None
            return
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                clock, power = (float(v) for v in line.split(","))
            except ValueError:  # a header, "[N/A]", a driver message
                continue
            self.samples.append((time.monotonic(), clock, power))

    def mean(self, t0: float, t1: float) -> dict:
        """Mean clock and power of the samples taken in [t0, t1] (time.monotonic())."""
        inside = [(c, p) for t, c, p in list(self.samples) if t0 <= t <= t1]
        if not inside:
            return {}
        return {"sm_clock_mhz": sum(c for c, _ in inside) / len(inside),
                "power_w": sum(p for _, p in inside) / len(inside)}

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._reader.join(timeout=5)


class StepClock:
    """Timestamps in stream order: CUDA events on the current stream (no sync when taken), or the host clock on the
    CPU (where every op has finished when it returns). ``ms(a, b)`` needs ``sync()`` after ``b`` on CUDA."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            import time

            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _allreduce_max(v: float, group=None) -> float:
    import torch.distributed as dist

    dev = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([float(v)], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def bench_ms_ranks(fn, *, cuda: bool, collective: bool = True, group=None, warmup: int = 3, rep_ms: float = 500,
                   min_reps: int = 5, max_reps: int = 200, flush_l2: bool = True) -> float:
    """Median milliseconds of fn() on this rank, with the same number of calls on every rank of ``group``.

    For code that runs collectives: triton.testing.do_bench picks its repetition count from its own timing, which
    can differ between ranks and leave one rank waiting in a collective the others never call. Here the count comes
    from the slowest rank's estimate (one all_reduce), the ranks start together (a barrier), and each call is timed
    with CUDA events (L2 flushed before each, as do_bench does). ``collective=False``: one process timing alone
    (no all_reduce, no barrier), with the same method. ``cuda=False``: host clock, no flush (CPU smoke runs)."""
    import statistics

    import torch.distributed as dist

    clock = StepClock(cuda)
    for _ in range(warmup):
        fn()
    clock.sync()
    a = clock.mark()
    for _ in range(3):
        fn()
    b = clock.mark()
    clock.sync()
    est = max(clock.ms(a, b) / 3, 1e-3)
    if collective and dist.is_initialized():
        est = _allreduce_max(est, group)
    n = int(min(max_reps, max(min_reps, rep_ms / est)))
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if (cuda and flush_l2) else None
    if collective and dist.is_initialized():
        dist.barrier(group=group)
    pairs = []
    for _ in range(n):
        if cache is not None:
            cache.zero_()
        a = clock.mark()
        fn()
        pairs.append((a, clock.mark()))
    clock.sync()
    return statistics.median(clock.ms(a, b) for a, b in pairs)


def host_and_wall_ms(step, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(host ms per step to issue the work, wall ms per step until the GPU finished it), after ``warmup`` steps.
    Host close to wall means the host is the bottleneck (or something syncs)."""
    import time

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - t) / steps * 1e3
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t) / steps * 1e3


def print_kernel_table(step, steps: int, rows: int, name_width: int = 70, show: bool = True) -> None:
    """GPU kernels of ``steps`` calls of ``step``, sorted by total time (torch.profiler). ``show=False`` runs the
    same steps without printing (the other ranks of a multi-process profile)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    if show:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=name_width))

