"""The ``moetron`` command (also ``python -m moetron``).

    moetron train [--preset tiny] [--data PATH ...] [--steps N] [--name NAME] [--seed S] [--device cpu|cuda]
                  [--resume] [--set FIELD=VALUE ...] ...
    moetron generate [--run runs/NAME] [--prompt "def "] [--max-new-tokens 300]
    moetron plot [--run runs/NAME]
    moetron convert [--from hf|moetron|dcp] [--to hf|moetron|dcp] SRC DST   (moetron/integrations/convert.py)

``moetron train`` with no arguments trains the ``tiny`` preset on the Python standard library's source on the CPU
(about 3 minutes on 2 cores) and writes ``runs/tiny/``. ``torchrun --nproc-per-node=N -m moetron train --ep N``
trains the same steps with the experts spread over N processes (moetron/train/distributed.py). ``--resume``
continues a run from its latest checkpoint with its saved settings; options given beside ``--resume`` override
them, and one that would change the model, the data or the update rule is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

__all__ = ["main", "build_parser"]

_S = argparse.SUPPRESS  # options left out stay out of the namespace, so --resume can tell what was asked for


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _model_overrides(items: list[str]) -> dict:
    from .models.transformer import ModelConfig
    import dataclasses

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise ValueError(f"--set {key}: ModelConfig has no such field; fields: {', '.join(sorted(fields))}")
        out[key] = _parse_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moetron", description="moetron: Mixture-of-Experts for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a small MoE language model on bytes of text",
                       description="Train a decoder-only MoE transformer on bytes. Defaults come from the preset; "
                                   "every run writes runs/<name>/ (config.json, metrics.jsonl, loss.png, "
                                   "expert_load.png, checkpoints/).")
    t.add_argument("--preset", default=_S, help="model preset: tiny (CPU, default) or small (one GPU)")
    t.add_argument("--data", nargs="+", default=_S, metavar="PATH",
                   help="text files or folders (default: the Python standard library's .py files)")
    t.add_argument("--max-data-bytes", type=int, default=_S, help="read at most this many bytes of --data")
    t.add_argument("--steps", type=int, default=_S, help="optimizer steps (the LR schedule's horizon)")
    t.add_argument("--stop-at", type=int, default=_S, help="stop and checkpoint after this step (resume later)")
    t.add_argument("--name", default=_S, help="run folder under --runs-dir (default: the preset name)")
    t.add_argument("--runs-dir", default=_S, help="parent of run folders (default: runs)")
    t.add_argument("--seed", type=int, default=_S, help="seed of the init, the data order and all RNGs")
    t.add_argument("--device", default=_S, help="auto (default), cpu, cuda or cuda:N")
    t.add_argument("--dtype", default=_S, choices=["auto", "bf16", "fp32"],
                   help="compute dtype (auto: bf16 autocast on CUDA, fp32 on CPU)")
    t.add_argument("--ep", type=int, default=_S,
                   help="expert-parallel size (default 1); > 1 runs under torchrun: torchrun --nproc-per-node=N "
                        "-m moetron train --ep N (the N processes are also data parallel)")
    t.add_argument("--dispatcher", default=_S,
                   help="MoE token dispatcher: local (one process), allgather (default with --ep > 1), fused, alltoall")
    t.add_argument("--resume", action="store_true", default=_S, help="continue the run from its latest checkpoint")
    t.add_argument("--overwrite", action="store_true", default=_S, help="replace an existing run of the same name")
    t.add_argument("--batch-size", type=int, default=_S, help="sequences per optimizer step")
    t.add_argument("--grad-accum", type=int, default=_S, help="micro-batches per optimizer step")
    t.add_argument("--seq-len", type=int, default=_S, help="bytes per sequence")
    t.add_argument("--lr", type=float, default=_S, help="peak learning rate")
    t.add_argument("--min-lr-ratio", type=float, default=_S, help="final LR as a fraction of the peak")
    t.add_argument("--warmup-steps", type=int, default=_S, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=float, default=_S, help="AdamW weight decay (matrices only)")
    t.add_argument("--grad-clip", type=float, default=_S, help="max global gradient norm (0: off)")
    t.add_argument("--eval-every", type=int, default=_S, help="validate every N steps")
    t.add_argument("--eval-batches", type=int, default=_S, help="validation batches per evaluation")
    t.add_argument("--log-every", type=int, default=_S, help="log losses and MoE statistics every N steps")
    t.add_argument("--ckpt-every", type=int, default=_S, help="checkpoint every N steps (0: only at the end)")
    t.add_argument("--keep-checkpoints", type=int, default=_S, help="complete checkpoints kept (default 2)")
    t.add_argument("--peak-tflops", type=float, default=_S, help="GPU peak bf16 TFLOP/s for MFU")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=_S, help="no progress bar")
    t.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=_S,
                   help="issue every micro-step op by op instead of replaying a CUDA graph of it")
    t.add_argument("--no-master-weights", dest="master_weights", action="store_false", default=_S,
                   help="keep fp32 weights cast by autocast every micro-step, instead of bf16 weights with fp32 "
                        "master copies")
    t.add_argument("--set", dest="model_set", action="append", default=_S, metavar="FIELD=VALUE",
                   help="override a ModelConfig field, e.g. --set num_experts=16 (JSON values)")

    g = sub.add_parser("generate", help="sample text from a trained run")
    g.add_argument("--run", default=None, help="run folder (default: the most recently checkpointed under runs/)")
    g.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the run's latest)")
    g.add_argument("--prompt", default="def ", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=300, help="bytes to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=40, help="sample among the k most likely bytes (0: all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")

    pl = sub.add_parser("plot", help="redraw loss.png and expert_load.png of a run")
    pl.add_argument("--run", default=None, help="run folder (default: the most recently checkpointed under runs/)")

    from .integrations import convert as _convert  # its arguments live beside the conversion code

    _convert.build_parser(sub.add_parser("convert", help="convert checkpoints: Hugging Face <-> moetron <-> DCP",
                                         description=_convert.__doc__.split("\n\n")[0]))
    return p


def _latest_run(runs_dir: str = "runs") -> str:
    best = None
    if os.path.isdir(runs_dir):
        for name in os.listdir(runs_dir):
            latest = os.path.join(runs_dir, name, "checkpoints", "latest")
            if os.path.isfile(latest):
                key = (os.path.getmtime(latest), os.path.join(runs_dir, name))
                best = key if best is None or key > best else best
    if best is None:
        raise ValueError(f"no run with a checkpoint under {runs_dir!r}; pass --run runs/NAME")
    return best[1]


def _train_config(given: dict):
    from .train.config import TrainConfig
    from .train.loop import resolve_run_dir

    overrides = _model_overrides(given.pop("model_set", []))
    if not given.get("resume"):
        return TrainConfig(**given, model_overrides=overrides)
    # --resume: start from the run's saved settings; what was given on the command line overrides them.
    probe = TrainConfig(**{k: v for k, v in given.items() if k in ("name", "runs_dir", "resume", "preset")})
    run_dir = resolve_run_dir(probe)
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--resume: {run_dir!r} has no config.json; it is not a moetron run folder")
    with open(path) as f:
        saved = json.load(f)["train"]
    saved.update(stop_at=None, resume=True, overwrite=False, progress=True, name=os.path.basename(run_dir),
                 runs_dir=os.path.dirname(run_dir) or ".")
    saved["model_overrides"] = {**saved.get("model_overrides", {}), **overrides}
    saved.update(given)
    return TrainConfig.from_dict(saved)


def _cmd_train(args) -> int:
    from .train.loop import train

    given = {k: v for k, v in vars(args).items() if k != "command"}
    cfg = _train_config(given)
    summary = train(cfg)
    return 130 if summary["interrupted"] else 0  # a stopped run says so to its scheduler


def _load_run_model(run_dir: str, checkpoint: str | None, device: str):
    import torch

    from .models.transformer import ModelConfig, MoETransformer
    from .train import checkpoint as ckpt

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--run: {run_dir!r} has no config.json; it is not a moetron run folder")
    with open(path) as f:
        saved = json.load(f)
    mcfg = ModelConfig.from_dict(saved["model"])
    ck = checkpoint or ckpt.find_checkpoint(run_dir)
    model = MoETransformer(mcfg, device=torch.device(device))  # built where it runs: no CPU init of a 1B model
    step = ckpt.load_weights(ck, model)
    return model.eval(), ck, step


def _cmd_generate(args) -> int:
    import torch

    from .train.data import decode, encode

    run_dir = args.run or _latest_run()
    model, ck, step = _load_run_model(run_dir, args.checkpoint, args.device)
    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    print(f"# sampling from {ck} (step {step})", file=sys.stderr, flush=True)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    ids = torch.tensor([encode(args.prompt)], device=args.device)
    # on a GPU in bf16 as the model trained (the weights stay fp32; autocast casts them per matmul)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if ids.is_cuda else contextlib.nullcontext()
    with amp:
        out = model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k or None, generator=g)
    sys.stdout.write(decode(out[0].tolist()) + "\n")
    return 0


def _cmd_plot(args) -> int:
    from .train.plots import plot_run

    run_dir = args.run or _latest_run()
    for path in plot_run(run_dir):
        print(path)
    return 0


def _cmd_convert(args) -> int:
    from .integrations.convert import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .train.checkpoint import CheckpointError

    handlers = {"train": _cmd_train, "generate": _cmd_generate, "plot": _cmd_plot, "convert": _cmd_convert}
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, CheckpointError, NotImplementedError) as e:
        print(f"moetron {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moetron {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
