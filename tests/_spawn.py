"""Start a world of test processes, wait with a deadline, and collect each rank's result or traceback.

Every multi-process test (gloo worlds on the CPU, NCCL worlds on GPUs, ``moetron train --ep``) runs its ranks
through ``collect_world``. The worker writes ``{"result": ...}`` or ``{"error": traceback}`` to
``<out_dir>/rank<r>.pt``; a rank that never finishes fails the test after ``timeout`` seconds instead of hanging
CI.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.multiprocessing as mp


def collect_world(worker, make_args, world: int, *, start_method: str, timeout: float, label: str) -> list:
    """Run ``worker(rank, *make_args(out_dir))`` on ``world`` processes; return the ranks' results in rank order.
    Raises AssertionError with every failing rank's traceback, or when the deadline passes."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(worker, args=make_args(tmp), nprocs=world, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise AssertionError(f"{label} of {world} ranks did not finish within {timeout} s")
        outs = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    errors = [f"rank {r}:\n{o['error']}" for r, o in enumerate(outs) if "error" in o]
    assert not errors, "\n".join(errors)
    return [o["result"] for o in outs]
