"""Shared benchmark plumbing: timing, metadata and the DESIGN.md results format."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess

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
