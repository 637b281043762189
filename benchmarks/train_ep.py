"""Training throughput with expert parallelism: the ``small`` preset with ``--ep 1`` on one GPU against
``torchrun --nproc-per-node=2 -m moetron train --ep 2`` on two, with the same batch per GPU.

    python benchmarks/train_ep.py                      # on a 2-GPU machine (2x H200): about 5 minutes
    python benchmarks/train_ep.py --steps 40 --dispatchers allgather fused alltoall

Both runs train the same model from the same seed for ``--steps`` optimizer steps; the EP run's global batch is
twice the one-GPU batch (``--batch-size`` per GPU; by default the preset's batch and micro-batches, 64 x 1024
bytes in one micro-batch for ``small``). Throughput comes from the trainer's own log (``metrics.jsonl``): tokens/s
of the global batch per log interval of ``--log-every`` steps, without evaluation and checkpoint time. The first
interval (Triton compiles and autotuning, allocator warm-up) is dropped; rows report the median of the rest. MFU is per GPU: global FLOPs /
(GPUs x 989 TFLOP/s), with the FLOPs per token of ``ModelConfig.flops_per_token`` (6 x active parameters plus
attention).

Writes ``benchmarks/results/train_<gpu>x2.json`` (DESIGN.md format) with rows ``small_ep1`` and
``small_ep2_<dispatcher>`` (provider "moetron"; ``ms`` per optimizer step, ``tokens_per_s``, ``mfu``, ``tflops``
per GPU) and prints a table.
Run folders go to a temporary directory (each ends with a ~10 GB checkpoint) and are deleted unless --keep-runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _moe_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "moe"]


def _run(cmd: list[str], env: dict, log_path: str, timeout: float) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"command failed with status {proc.returncode}:\n{' '.join(cmd)}\n--- log tail ---\n{tail}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--log-every", type=int, default=10, help="steps per throughput interval")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per optimizer step on each GPU (default: the preset's batch)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default: the "
                   "preset's)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the EP run; --ep equals it")
    p.add_argument("--dispatchers", nargs="+", default=["allgather"], choices=["alltoall", "allgather", "fused"],
                   help="dispatchers of the EP run (one run each)")
    p.add_argument("--device", default="cuda", help="cuda (each rank takes cuda:LOCAL_RANK), or cpu for a dry run")
    p.add_argument("--runs-dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders (checkpoints included)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/train_<gpu>x<gpus>.json)")
    args = p.parse_args()
    from moetron.train.config import PRESET_TRAIN

    preset_train = PRESET_TRAIN.get(args.preset, {})
    if args.batch_size is None:
        args.batch_size = preset_train.get("batch_size", 32)
    if args.grad_accum is None:
        args.grad_accum = preset_train.get("grad_accum", 1)
    if args.steps <= args.log_every:
        raise SystemExit("--steps must exceed --log-every: the first interval is dropped as warm-up")

    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="moetron_train_ep_")
    os.makedirs(runs_dir, exist_ok=True)
    common = ["--preset", args.preset, "--steps", str(args.steps), "--log-every", str(args.log_every),
              "--seq-len", str(args.seq_len), "--grad-accum", str(args.grad_accum),
              "--eval-every", str(10 * args.steps), "--eval-batches", "1", "--ckpt-every", "0",
              "--keep-checkpoints", "1", "--runs-dir", runs_dir, "--overwrite", "--no-progress", "--seed", "0",
              "--device", args.device]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", ROOT)

    jobs = [(f"{args.preset}_ep1", 1, None,
             [sys.executable, "-m", "moetron", "train", *common, "--ep", "1", "--batch-size", str(args.batch_size),
              "--name", f"{args.preset}_ep1"])]
    for d in args.dispatchers:
        case = f"{args.preset}_ep{args.gpus}_{d}"
        jobs.append((case, args.gpus, d,
                     [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc-per-node={args.gpus}", "-m", "moetron", "train", *common, "--ep", str(args.gpus),
                      "--dispatcher", d, "--batch-size", str(args.batch_size * args.gpus), "--name", case]))

    rows = []
    for case, gpus, dispatcher, cmd in jobs:
        run_env = dict(env)
        if gpus == 1:
            run_env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        wall = _run(cmd, run_env, os.path.join(runs_dir, f"{case}.log"), args.timeout)
        run_dir = os.path.join(runs_dir, case)
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
        recs = _moe_records(run_dir)[1:]  # the first interval is warm-up
        tok_s = statistics.median(r["tokens_per_s"] for r in recs)
        mfus = [r["mfu"] for r in recs if "mfu" in r]
        global_batch = args.batch_size * gpus
        tokens_per_step = global_batch * args.seq_len
        rows.append({
            "case": case, "provider": "moetron", "mode": "train_step", "gpus": gpus, "ep": gpus,
            "dispatcher": dispatcher or saved["model"]["dispatcher"],
            "global_batch": global_batch, "batch_per_gpu": args.batch_size, "grad_accum": args.grad_accum,
            "seq_len": args.seq_len, "steps": args.steps, "intervals": len(recs),
            "ms": 1e3 * tokens_per_step / tok_s,
            "tokens_per_s": tok_s,
            "tokens_per_s_per_gpu": tok_s / gpus,
            "mfu": statistics.median(mfus) if mfus else None,
            "tflops": tok_s * saved["flops_per_token"] / gpus / 1e12,
            "tokens_per_s_intervals": [r["tokens_per_s"] for r in recs],
            "wall_s": wall,
        })
        print(f"{case}: {tok_s:,.0f} tokens/s, {rows[-1]['ms']:.1f} ms/step"
              + (f", MFU {100 * rows[-1]['mfu']:.1f}%" if rows[-1]["mfu"] is not None else ""), flush=True)

    from benchmarks._common import gpu_tag, meta

    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_ep1"] = r["tokens_per_s"] / base
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"train_{gpu_tag()}x{args.gpus}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd_line = "python benchmarks/train_ep.py " + " ".join(sys.argv[1:])
    with open(out, "w") as f:
        json.dump({"meta": {**meta(), "command": cmd_line.strip(),
                            "note": f"{args.preset} preset; ep1 on one GPU vs torchrun --ep N, same batch per GPU; "
                                    "median tokens/s over log intervals after the first; MFU per GPU"},
                   "rows": rows}, f, indent=1)

    print(f"\n{'case':<22} {'gpus':>4} {'ms/step':>9} {'tokens/s':>11} {'tok/s/GPU':>10} {'MFU':>6} {'vs ep1':>7}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['case']:<22} {r['gpus']:>4} {r['ms']:>9.1f} {r['tokens_per_s']:>11,.0f} "
              f"{r['tokens_per_s_per_gpu']:>10,.0f} {mfu:>6} {r['speedup_vs_ep1']:>6.2f}x")
    print(f"wrote {out}")
    if not args.keep_runs and args.runs_dir is None:
        shutil.rmtree(runs_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
