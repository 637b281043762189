"""The training loop behind ``moetron train``.

AdamW with linear warm-up then cosine decay, gradient clipping, gradient accumulation, bf16 autocast on CUDA,
expert-bias updates, validation every ``eval_every`` steps, checkpoints and exact resume.

Several processes (``torchrun --nproc-per-node=N -m moetron train --ep EP``): expert parallelism over EP ranks,
data parallelism over all N for the rest, computing the same steps as one process on the same global batch
(``moetron.train.distributed`` says how). Rank 0 alone logs, plots and writes the run folder.

Exact resume: the batch at step s is a pure function of (seed, s) (``ByteDataset.train_batch``); a checkpoint
holds the weights, the optimizer and scheduler, every RNG state and the non-persistent buffers (router counters).
On the CPU, a run of 2N steps and a run stopped at N (``stop_at``) then resumed give bitwise the same losses.

Host syncs: the per-step losses and MoE counters stay on the device and are read once per log step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time

import torch

from ..models.transformer import ModelConfig, MoETransformer, preset
from ..router import AuxLossAutoScaler
from . import checkpoint as ckpt
from .config import RESUME_MUST_MATCH, TrainConfig
from .data import ByteDataset, load_corpus
from .master import MasterWeights
from . import distributed as D

__all__ = ["train", "ResumeError", "GPUMemoryError", "WarmupCosine", "build_model_config", "resolve_run_dir",
           "peak_flops"]

# Dense bf16 peak of one GPU (spec sheet, without sparsity), for MFU. DESIGN.md measured 709 TFLOP/s of real matmul on
# the H100; MFU conventionally divides by the spec peak.
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                     "B200": 2250.0}

# fp32 master weights (moetron.train.master) are used for bf16 training on CUDA. Tests set this to torch.float32 to
# run the same bookkeeping on the CPU, where fp32 "low" weights give exactly the numbers of plain fp32 training.
_MASTER_DTYPE_ON_CPU: torch.dtype | None = None


class ResumeError(ValueError):
    """--resume asked for something the checkpoint cannot continue (another model, data or update rule)."""


# FLOPs per training step above which a CPU run gets a warning: the tiny preset's step is ~9 GFLOP, the small one's
# ~77 TFLOP (hours per step on a few cores).
_CPU_WARN_STEP_FLOPS = 1e12


def _cpu_step_warning(step_flops: float, device: torch.device) -> str | None:
    """A warning for a run whose steps are far too large for the CPU it runs on, else None."""
    if device.type != "cpu" or step_flops < _CPU_WARN_STEP_FLOPS:
        return None
    return (f"warning: each step is {step_flops / 1e12:,.0f} TFLOP on the CPU: at the ~0.1-1 TFLOP/s of a few cores "
            "that is minutes to hours per step. This model is meant for a GPU (--device cuda); on the CPU use "
            "--preset tiny, or a smaller --batch-size / --seq-len")


class GPUMemoryError(ValueError):
    """A training step ran out of GPU memory; the message says how to split the step (the run resumes from its
    last checkpoint)."""


def _out_of_memory_message(cfg: TrainConfig, rows: int, world: int, device: torch.device, step: int) -> str:
    accum = next(a for a in range(cfg.grad_accum + 1, cfg.batch_size + 1)
                 if cfg.batch_size % (a * world) == 0) if rows > 1 else None
    used = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        used = f" ({torch.cuda.max_memory_allocated(device) / 2**30:.1f} of {total:.1f} GiB allocated at the peak)"
    fix = (f"pass --grad-accum {accum} to split each step into more micro-batches (the same batch and update, "
           "less activation memory), " if accum else "")
    return (f"out of GPU memory on {device} in step {step + 1}{used}, with micro-batches of {rows} sequences x "
            f"{cfg.seq_len} bytes per process; {fix}or lower --batch-size or --seq-len. Checkpoints written so far "
            "are complete: --resume continues from the last one.")


class WarmupCosine:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup`` steps, then a cosine from 1 down to ``min_ratio``
    at ``total`` steps (and ``min_ratio`` after). A class, not a lambda, so LambdaLR's state_dict keeps it."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one GPU, or None when unknown (MFU is then not shown)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def build_model_config(cfg: TrainConfig) -> ModelConfig:
    """The model of ``cfg``. With ``ep > 1`` the dispatcher defaults to "allgather" (and "local" is refused): it
    never syncs with the host, so the micro-steps are CUDA-graph captured (train_h200x2.json: 1.87x alltoall's
    tokens/s on the earlier small preset at EP=2)."""
    overrides = dict(cfg.model_overrides)
    if cfg.dispatcher is not None:
        overrides["dispatcher"] = cfg.dispatcher
    elif cfg.ep > 1:
        overrides["dispatcher"] = "allgather"
    mcfg = preset(cfg.preset, **overrides)
    if cfg.ep > 1:
        if mcfg.dispatcher == "local":
            raise ValueError(f"--dispatcher local keeps every expert in one process; with --ep {cfg.ep} use "
                             "--dispatcher allgather (the default), fused or alltoall")
        if mcfg.num_experts % cfg.ep:
            raise ValueError(f"--ep {cfg.ep} must divide num_experts={mcfg.num_experts} (each of the {cfg.ep} "
                             f"expert-parallel ranks holds num_experts / ep experts)")
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len must be <= the model's max_seq_len ({mcfg.max_seq_len}), got "
                         f"{cfg.seq_len}; raise max_seq_len with --set max_seq_len=...")
    return mcfg


def resolve_run_dir(cfg: TrainConfig) -> str:
    """runs_dir/name. A fresh run never writes into an existing run: without --overwrite it takes name-2, name-3...
    --resume without a name continues the most recently checkpointed run."""
    if cfg.resume:
        if cfg.name is not None:
            path = os.path.join(cfg.runs_dir, cfg.name)
            if not os.path.isdir(path):
                raise ResumeError(f"--resume: no run folder {path!r}")
            return path
        candidates = []
        if os.path.isdir(cfg.runs_dir):
            for name in os.listdir(cfg.runs_dir):
                path = os.path.join(cfg.runs_dir, name)
                latest = os.path.join(path, "checkpoints", "latest")
                if os.path.isfile(latest):
                    candidates.append((os.path.getmtime(latest), path))
        if not candidates:
            raise ResumeError(f"--resume: no run with a checkpoint under {cfg.runs_dir!r}; pass --name")
        return max(candidates)[1]
    base = cfg.name or cfg.preset
    path = os.path.join(cfg.runs_dir, base)
    if cfg.overwrite:
        if os.path.isdir(path):
            import shutil

            shutil.rmtree(path)
        return path
    i = 2
    while os.path.exists(path):
        if cfg.name is not None:
            raise ValueError(f"run folder {path!r} already exists; pass --resume to continue it, --overwrite to "
                             "replace it, or another --name")
        path = os.path.join(cfg.runs_dir, f"{base}-{i}")
        i += 1
    return path


def _check_resume(saved: dict, cfg: TrainConfig, mcfg: ModelConfig, data_sha: str, path: str) -> None:
    problems = []
    saved_model = dict(saved.get("model", {}))
    new_model = mcfg.to_dict()
    for key in sorted(set(saved_model) | set(new_model)):
        if key == "dispatcher":  # changes how tokens move, not what the model computes
            continue
        if saved_model.get(key) != new_model.get(key):
            problems.append(f"model.{key}: checkpoint {saved_model.get(key)!r}, now {new_model.get(key)!r}")
    saved_train = saved.get("train", {})
    for key in RESUME_MUST_MATCH:
        if saved_train.get(key) != getattr(cfg, key):
            problems.append(f"{key}: checkpoint {saved_train.get(key)!r}, now {getattr(cfg, key)!r}")
    saved_sha = saved.get("data", {}).get("sha256")
    if saved_sha != data_sha:
        problems.append(f"data: the training text changed (sha256 {str(saved_sha)[:12]}... then, {data_sha[:12]}... "
                        "now)")
    if problems:
        raise ResumeError(f"cannot resume {path!r} with this config:\n  " + "\n  ".join(problems) +
                          "\nresume with the original settings, or start a new run with --name")


def _rng_state(device: torch.device) -> dict:
    import numpy as np

    np_state = np.random.get_state()
    # the training GPU's generator only: get_rng_state_all would open a context on every visible GPU from every rank
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}


def _set_rng_state(state: dict, device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type == "cuda" and cuda:  # one state (this format) or one per GPU (checkpoints before it)
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[device.index or 0], device)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _extra_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (router counters): not in the weights file, yet needed for an exact resume. (Read
    from the modules, not from state_dict(), which is a collective for an expert-parallel model.) Across ranks,
    rank 0's are saved: the global aux counts are global, and the expert-bias counts are zero after every step."""
    out = {}
    for mod_name, mod in model.named_modules():
        for n, b in mod._buffers.items():
            name = f"{mod_name}.{n}" if mod_name else n
            if b is not None and n in mod._non_persistent_buffers_set and not name.startswith("model.rope_"):
                out[name] = b.detach().clone()
    return out


def _param_groups(params: list[torch.Tensor], weight_decay: float):
    decay, no_decay = [], []
    for p in params:  # model.parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Metrics:
    """Append-only metrics.jsonl; on resume, records past the checkpoint's step are dropped first."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is not None and os.path.isfile(path):
            kept = []
            with open(path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if r.get("step", 0) <= resume_step and r.get("kind") != "summary":
                        kept.append(line if line.endswith("\n") else line + "\n")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)
        self.f = open(path, "a")

    def write(self, records: list[dict]) -> None:
        for r in records:
            self.f.write(json.dumps(r) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def _fmt_list(vals, fmt="{:.2f}"):
    return "[" + " ".join(fmt.format(v) for v in vals) + "]"


def _device(cfg: TrainConfig, world: int = 1) -> torch.device:
    """The training device; with several processes, rank LOCAL_RANK of this host takes cuda:LOCAL_RANK."""
    if cfg.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine (use --device cpu)")
    if world > 1 and dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(f"--device {cfg.device}: with {world} processes each one uses cuda:LOCAL_RANK; pass "
                             "--device cuda (or auto)")
        local = D.env_local_rank()
        if not 0 <= local < torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but this host has {torch.cuda.device_count()} GPUs; run at most "
                             "that many processes per node")
        dev = torch.device("cuda", local)
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # torch.cuda.set_device needs an index
    return dev


def _check_parallel(cfg: TrainConfig, world: int) -> None:
    """Sizes that cannot work, raised before any process group exists (the same error on every rank)."""
    if cfg.ep > 1 and world == 1:
        raise ValueError(f"--ep {cfg.ep} needs {cfg.ep} processes (one per expert-parallel rank), but this is a "
                         f"single process (WORLD_SIZE unset or 1); launch with torchrun --nproc-per-node={cfg.ep} "
                         f"-m moetron train --ep {cfg.ep} ...")
    if world % cfg.ep:
        raise ValueError(f"--ep {cfg.ep} must divide the world size {world} (the torchrun processes): experts are "
                         f"split over ep ranks, and world / ep such groups replicate each other")
    micro = cfg.micro_batch_size()
    if micro % world:
        raise ValueError(f"each micro-batch of {micro} sequences (--batch-size {cfg.batch_size} / --grad-accum "
                         f"{cfg.grad_accum}) must split evenly over the {world} processes; pass a --batch-size that "
                         f"is a multiple of {cfg.grad_accum * world}")


def train(cfg: TrainConfig, *, log=print) -> dict:
    """Run (or resume) training as ``cfg`` says; returns the summary dict (also the last metrics.jsonl record).

    Under torchrun (WORLD_SIZE > 1) every rank calls this; the process group is created from the environment
    (or the caller's is used) and every rank returns rank 0's summary."""
    world = D.env_world_size()
    _check_parallel(cfg, world)
    device = _device(cfg, world)
    mcfg = build_model_config(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = D.init_distributed(cfg.ep, device)
    try:
        return _train(cfg, mcfg, device, ctx, log if ctx.is_main else _silent)
    finally:
        ctx.close()


def _silent(*_args, **_kw) -> None:
    pass


def _capture_micro_step(model, x, y, loss_div, use_bf16, moe_layers, master, log):
    """The micro-step as a CUDA graph (moetron.train.graphs), or None (with a warning) if it cannot be captured."""
    from .graphs import GraphedMicroStep

    kw = {} if master is None else dict(grad_params=master.autograd_params,
                                        after_backward=lambda: master.accumulate(keep_grads=True))
    try:
        return GraphedMicroStep(model, x, y, loss_div=loss_div, autocast_dtype=torch.bfloat16 if use_bf16 else None,
                                moe_layers=moe_layers, **kw)
    except Exception as e:  # never lose a run to the capture: train eagerly instead
        log(f"warning: capturing the micro-step in a CUDA graph failed ({type(e).__name__}: {e}); running it "
            "eagerly (--no-cuda-graphs skips the attempt)")
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return None
    finally:
        if master is not None:  # the warm-up and capture also added into the fp32 gradients
            master.zero_grad(set_to_none=False)


def _build_model(mcfg: ModelConfig, device: torch.device, ctx: "D.DistContext") -> MoETransformer:
    """The model for this rank, with the weights of the one-process model of the same seed."""
    if ctx.groups.ep_size == 1:
        # replicated experts: the same shapes and random draws as one process (MoELayer re-broadcasts them anyway)
        return MoETransformer(mcfg, device=device, parallel=ctx.groups if ctx.distributed else None)
    import dataclasses

    # Expert shards drawn directly would differ from the one-process init: build that model, then slice its experts
    # by global expert id (MoELayer's load hook). The RNG then continues from where one process would be.
    full = MoETransformer(dataclasses.replace(mcfg, dispatcher="local"), device=device)
    global_sd = full.state_dict()
    del full
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    model = MoETransformer(mcfg, device=device, parallel=ctx.groups)
    model.load_state_dict(global_sd)
    del global_sd
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    return model


def _train(cfg: TrainConfig, mcfg: ModelConfig, device: torch.device, ctx: "D.DistContext", log) -> dict:
    t_start = time.perf_counter()
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    sharded = ctx.groups.ep_size > 1

    corpus = load_corpus(cfg.data, max_bytes=cfg.max_data_bytes if cfg.max_data_bytes is not None or cfg.data
                         else cfg.default_corpus_bytes)
    dataset = ByteDataset(corpus, cfg.seq_len, seed=cfg.seed)
    data_info = {"source": corpus.source, "bytes": len(corpus.data), "files": len(corpus.files),
                 "sha256": corpus.sha256, "train_bytes": dataset.train.numel(), "val_bytes": dataset.val.numel()}
    if corpus.skipped_binary:
        log(f"data: skipped {len(corpus.skipped_binary)} binary files, e.g. {corpus.skipped_binary[0]}")

    def prepare_run_dir():  # rank 0 picks (and creates) the folder; its errors raise on every rank
        run_dir = resolve_run_dir(cfg)
        resume_path = saved = None
        if cfg.resume:
            config_path = os.path.join(run_dir, "config.json")
            if not os.path.isfile(config_path):
                raise ResumeError(f"--resume: {run_dir!r} has no config.json; it is not a moetron run folder")
            with open(config_path) as f:
                saved = json.load(f)
            _check_resume(saved, cfg, mcfg, corpus.sha256, run_dir)
            resume_path = ckpt.find_checkpoint(run_dir)
            ckpt.verify_checkpoint(resume_path)
        os.makedirs(run_dir, exist_ok=True)
        return run_dir, resume_path, saved

    run_dir, resume_path, saved = ctx.run_on_main(prepare_run_dir)

    # Everything random starts from the seed; a resume then overwrites the RNG states with the checkpoint's.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    try:
        import numpy as np

        np.random.seed(cfg.seed)
    except ImportError:
        pass

    model = _build_model(mcfg, device, ctx)  # built in place: a 1B model initialises in seconds on a GPU
    state = None
    if resume_path is not None:
        # verified by rank 0 above; every rank reads the one-process format and keeps its own experts
        state = ckpt.load_checkpoint(resume_path, model, map_location="cpu", verify=False)
        if state.get("format_version") != ckpt.FORMAT_VERSION:
            raise ckpt.CheckpointError(f"checkpoint {resume_path!r} has format {state.get('format_version')!r}, "
                                       f"this moetron reads {ckpt.FORMAT_VERSION}")
    # bf16 weights with fp32 masters (moetron.train.master), from the fp32 weights just initialised or loaded
    master_dtype = torch.bfloat16 if use_bf16 and device.type == "cuda" else _MASTER_DTYPE_ON_CPU
    master = MasterWeights(model, dtype=master_dtype) if cfg.master_weights and master_dtype is not None else None
    params = master.params if master is not None else list(model.parameters())
    opt = torch.optim.AdamW(_param_groups(params, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.adam_eps, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    moe_layers = model.moe_layers()
    use_expert_bias = mcfg.expert_bias

    start_step = 0
    prev = {"train_time": 0.0, "tokens": 0}
    if state is not None:
        opt.load_state_dict(D.slice_optimizer_state(state["optimizer"], opt, model, master) if sharded
                            else state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        # The horizon is this run's (steps may have grown); warm-up and floor are checked equal above.
        sched.lr_lambdas[0] = WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        bufs = dict(model.named_buffers())
        for name, value in state.get("buffers", {}).items():
            if name in bufs and bufs[name] is not None:
                bufs[name].copy_(value)
        _set_rng_state(state["rng"], device)
        start_step = int(state["step"])
        if state["data"]["seed"] != cfg.seed:
            raise ResumeError(f"checkpoint data seed {state['data']['seed']} != --seed {cfg.seed}")
        prev = state.get("totals", prev)
        if start_step >= cfg.steps:
            raise ResumeError(f"--resume: {resume_path!r} is at step {start_step}, already >= steps={cfg.steps}; "
                              "pass a larger --steps to train further")
        old_steps = saved.get("train", {}).get("steps")
        if old_steps != cfg.steps:
            log(f"note: steps changed from {old_steps} to {cfg.steps}; the cosine now ends at step {cfg.steps}")
        saved_world = saved.get("world_size", 1)
        if saved_world != ctx.world:
            log(f"note: the checkpoint was written by {saved_world} process(es), this run has {ctx.world}")

    metrics = None
    if ctx.is_main:
        with open(os.path.join(run_dir, "config.json.tmp"), "w") as f:
            json.dump({"model": mcfg.to_dict(), "train": cfg.to_dict(), "data": data_info,
                       "params": mcfg.num_params(), "flops_per_token": mcfg.flops_per_token(cfg.seq_len),
                       "device": str(device), "world_size": ctx.world, "torch": torch.__version__}, f, indent=1)
        os.replace(os.path.join(run_dir, "config.json.tmp"), os.path.join(run_dir, "config.json"))
        metrics = _Metrics(os.path.join(run_dir, "metrics.jsonl"), start_step if resume_path else None)

    n_params = mcfg.num_params()
    micro_bs = cfg.micro_batch_size()
    rows = micro_bs // ctx.world  # this rank's sequences of each micro-batch
    row0 = ctx.rank * rows
    tokens_per_step = cfg.batch_size * cfg.seq_len  # the global batch
    flops_tok = mcfg.flops_per_token(cfg.seq_len)
    peak = peak_flops(device, cfg.peak_tflops)
    if peak is not None:
        peak *= ctx.world  # MFU per GPU: global FLOP/s over every GPU's peak
    val_set = [(x[row0:row0 + rows].to(device), y[row0:row0 + rows].to(device))
               for x, y in dataset.val_batches(cfg.eval_batches, micro_bs)]
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    end_step = cfg.stop_at if cfg.stop_at is not None else cfg.steps

    par = ""
    if ctx.distributed:
        par = (f", {ctx.world} processes (ep {ctx.groups.ep_size} x expert-dp {ctx.groups.edp_size}, "
               f"dispatcher {mcfg.dispatcher})")
    log(f"run {run_dir}: {'resuming at step ' + str(start_step) if resume_path else 'new'}, preset {cfg.preset}, "
        f"{n_params['total'] / 1e6:.2f}M params ({n_params['active'] / 1e6:.2f}M active), "
        f"{mcfg.num_moe_layers}/{mcfg.num_layers} MoE layers x {mcfg.num_experts} experts top-{mcfg.top_k}, "
        f"device {device}{' bf16' if use_bf16 else ' fp32'}{par}")
    log(f"data: {corpus.source}: {data_info['train_bytes']:,} train / {data_info['val_bytes']:,} val bytes; "
        f"{cfg.batch_size} x {cfg.seq_len} bytes per step, {end_step - start_step} steps to go")
    slow = _cpu_step_warning(flops_tok * tokens_per_step / ctx.world, device)
    if slow:
        log(slow)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad(), autocast():
            total = torch.zeros((), device=device)
            for x, y in val_set:
                total += model(x, y)
        model.train()
        return ctx.mean(total).item() / len(val_set)

    def save(step: int) -> str:
        buffers = _extra_buffers(model)
        if sharded:  # collectives: every rank sends its experts, rank 0 writes
            weights = D.gather_model_state(model, ctx, master)
            opt_state = D.gather_optimizer_state(opt, model, ctx, master)
        else:
            weights = model if master is None else master.state_dict_tensors()  # fp32 either way
            opt_state = opt.state_dict() if ctx.is_main else None
        if not ctx.is_main:
            return os.path.join(run_dir, "checkpoints", ckpt.step_dirname(step))
        state = {"format_version": ckpt.FORMAT_VERSION, "step": step, "optimizer": opt_state,
                 "scheduler": sched.state_dict(),
                 "rng": _rng_state(device), "data": {"seed": cfg.seed, "next_step": step},
                 "buffers": buffers, "totals": totals}
        return ckpt.save_checkpoint(run_dir, step, weights, state, keep=cfg.keep_checkpoints)

    def plot():
        if not ctx.is_main:
            return
        from .plots import plot_run

        try:
            plot_run(run_dir)
        except Exception as e:  # a plot must never cost a run
            log(f"warning: plotting failed: {type(e).__name__}: {e}")

    def write(records):
        if metrics is not None:
            metrics.write(records)

    totals = dict(prev)
    records: list[dict] = []
    eval_time = 0.0
    if resume_path is None:
        t = time.perf_counter()
        v = evaluate()
        eval_time += time.perf_counter() - t
        write([{"kind": "eval", "step": 0, "val_loss": v}])
        log(f"step 0: val loss {v:.4f}")

    try:
        from tqdm import tqdm
    except ImportError:  # a GPU box without tqdm still trains; the log lines carry the numbers
        tqdm = _NoBar

    def say(msg: str) -> None:
        if not ctx.is_main:
            return
        if cfg.progress:
            bar.write(msg)  # above the bar, which then redraws
        else:
            log(msg)

    # Redrawn twice a second on a terminal; every 30 s into a log file, so logs stay readable.
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0, unit="step", file=sys.stderr)
    pending_loss: list[torch.Tensor] = []
    pending_meta: list[tuple[int, float]] = []
    pending_gnorm: list[torch.Tensor] = []
    tpe_acc = torch.zeros(len(moe_layers), mcfg.num_experts, device=device)
    interval_t = time.perf_counter()
    interval_steps = 0
    last_ckpt = None
    last_val = None
    interrupted = False
    step = start_step
    stop_signal = _GracefulStop()
    AuxLossAutoScaler.set_loss_scale(1.0 / cfg.grad_accum)  # global aux losses: each rank adds its share
    loss_div = cfg.grad_accum * ctx.world  # each rank's mean loss / W: the ranks' gradients sum to the global mean's
    model.train()
    # Several processes: only when no MoE layer syncs with the host (the allgather and fused dispatchers; NCCL
    # collectives and symmetric-memory barriers are captured with the rest)
    use_graphs = cfg.cuda_graphs and device.type == "cuda" and (
        not ctx.distributed or not any(layer.dispatcher.syncs for _, layer in moe_layers))
    graphed = None
    try:
        stop_signal.install()
        while step < end_step:
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = dataset.train_batch(step, micro, micro_bs)
                if ctx.distributed:
                    x, y = x[row0:row0 + rows], y[row0:row0 + rows]
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if use_graphs and graphed is None:
                    graphed = _capture_micro_step(model, x, y, loss_div, use_bf16, moe_layers, master, log)
                    if ctx.any(graphed is None):  # every rank replays, or none does: their collectives must pair up
                        graphed = None
                        model.zero_grad(set_to_none=True)
                    use_graphs = graphed is not None
                if graphed is not None and x.shape == graphed.x.shape:
                    loss = graphed(x, y)
                else:
                    with autocast():
                        loss = model(x, y)
                    (loss / loss_div).backward()
                    if master is not None:
                        master.accumulate(keep_grads=graphed is not None)
                loss_sum += loss.detach()
                for j, (_, layer) in enumerate(moe_layers):
                    tpe_acc[j] += layer.last_stats["tokens_per_expert"].to(tpe_acc.dtype)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            if ctx.distributed:
                D.reduce_grads(model, ctx, master)
                gnorm = D.clip_grad_norm(params, max_norm, ctx)
            else:
                gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            if master is not None:
                master.publish()
                master.zero_grad(set_to_none=graphed is None)
            else:
                opt.zero_grad(set_to_none=graphed is None)  # a graph adds into the same gradient tensors every step
            if use_expert_bias:
                for _, layer in moe_layers:
                    layer.update_expert_bias()  # counts summed over every rank by the layer
            step += 1
            pending_loss.append(loss_sum / cfg.grad_accum)
            pending_gnorm.append(gnorm.detach())
            pending_meta.append((step, lr))
            interval_steps += 1
            bar.update(1)
            # Ctrl-C or SIGTERM: finish this step as the last one (log, evaluate, checkpoint), then stop. Every
            # rank agrees on it (a signal may reach one rank a step before another).
            stopping = ctx.any(stop_signal.received is not None)
            final = step == end_step or stopping

            if step % cfg.log_every == 0 or final:
                losses = ctx.mean(torch.stack(pending_loss)).tolist()  # the one sync of the interval
                gnorms = torch.stack(pending_gnorm).float().tolist()
                now = time.perf_counter()
                tok_s = interval_steps * tokens_per_step / max(now - interval_t, 1e-9)
                totals["train_time"] += now - interval_t
                totals["tokens"] += interval_steps * tokens_per_step
                for (s, lr_s), l, g in zip(pending_meta, losses, gnorms):
                    records.append({"kind": "train", "step": s, "loss": l, "lr": lr_s, "grad_norm": g})
                all_counts = ctx.sum_(tpe_acc).tolist()
                tpe_acc.zero_()
                layers_rec = []
                for (i, layer), counts, st in zip(moe_layers, all_counts, D.global_layer_stats(moe_layers, ctx)):
                    mean = sum(counts) / len(counts) if counts else 0.0
                    layers_rec.append({"layer": i, "tokens_per_expert": counts,
                                       "interval_imbalance": (max(counts) / mean) if mean else 0.0,
                                       **{k: v for k, v in st.items() if k != "tokens_per_expert"}})
                rec = {"kind": "moe", "step": step, "tokens_per_s": tok_s, "layers": layers_rec}
                mfu = None
                if peak is not None:
                    mfu = tok_s * flops_tok / peak
                    rec["mfu"] = mfu
                records.append(rec)
                write(records)
                records = []
                aux = [_aux_value(l) for l in layers_rec]
                imb = [l.get("load_imbalance", l["interval_imbalance"]) for l in layers_rec]
                drop = [l.get("num_dropped", 0) for l in layers_rec]
                post = {"loss": f"{losses[-1]:.3f}", "tok/s": f"{tok_s:,.0f}"}
                if mfu is not None:
                    post["MFU"] = f"{100 * mfu:.1f}%"
                bar.set_postfix(post, refresh=False)
                say(f"step {step}: loss {losses[-1]:.4f} lr {pending_meta[-1][1]:.2e} "
                    f"gnorm {gnorms[-1]:.2f} {tok_s:,.0f} tok/s"
                    + (f" MFU {100 * mfu:.1f}%" if mfu is not None else "")
                    + f" | aux {_fmt_list(aux, '{:.3f}')} imbalance {_fmt_list(imb)} dropped "
                    f"{_fmt_list(drop, '{:.0f}')}")
                pending_loss, pending_gnorm, pending_meta = [], [], []
                interval_steps = 0
                interval_t = time.perf_counter()

            if step % cfg.eval_every == 0 or final:
                t = time.perf_counter()
                last_val = evaluate()
                write([{"kind": "eval", "step": step, "val_loss": last_val}])
                say(f"step {step}: val loss {last_val:.4f}")
                eval_time += time.perf_counter() - t
                interval_t += time.perf_counter() - t

            stopping = stopping or ctx.any(stop_signal.received is not None)  # a signal during the log or eval
            final = final or stopping
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or final:
                t = time.perf_counter()
                last_ckpt = save(step)
                if not final:  # the end of the run plots once, after the summary
                    plot()
                interval_t += time.perf_counter() - t
            if stopping:
                interrupted = True
                by = stop_signal.name or "a signal to another rank"
                say(f"stopped by {by} after step {step}; checkpoint written, continue with --resume")
                break
    except torch.OutOfMemoryError as e:  # a clear way out instead of an allocator traceback
        bar.close()
        raise GPUMemoryError(_out_of_memory_message(cfg, rows, ctx.world, device, step)) from e
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once; the last complete checkpoint stays the latest
        bar.close()
        log(f"interrupted during step {step + 1}; resume continues from {last_ckpt or 'the last checkpoint'}")
        raise
    finally:
        stop_signal.uninstall()
        bar.close()
        AuxLossAutoScaler.set_loss_scale(1.0)

    summary = None
    if ctx.is_main:
        summary = _summarize(cfg, metrics, run_dir, step, t_start, totals, eval_time, last_ckpt, interrupted, log)
        plot()
        log(f"wrote {run_dir}/: config.json metrics.jsonl loss.png expert_load.png"
            + (f" checkpoints/{os.path.basename(last_ckpt)}" if last_ckpt else ""))
    return ctx.broadcast_object(summary)  # the other ranks wait here for rank 0's files


def _summarize(cfg, metrics, run_dir, step, t_start, totals, eval_time, last_ckpt, interrupted, log) -> dict:
    """The summary over the whole run, earlier invocations included (the last metrics.jsonl record)."""
    from .plots import read_metrics

    evals = sorted((r["step"], r["val_loss"]) for r in read_metrics(metrics.path) if r.get("kind") == "eval")
    wall = time.perf_counter() - t_start
    first_val = evals[0][1] if evals else float("nan")
    last_val = evals[-1][1] if evals else float("nan")
    summary = {"kind": "summary", "step": step, "steps": cfg.steps, "first_val_loss": first_val,
               "last_val_loss": last_val, "val_drop_pct": 100 * (first_val - last_val) / first_val if evals else None,
               "wall_s": wall, "train_s": totals["train_time"], "eval_s": eval_time,
               "tokens": totals["tokens"], "tokens_per_s": totals["tokens"] / max(totals["train_time"], 1e-9),
               "run_dir": run_dir, "checkpoint": last_ckpt, "interrupted": interrupted}
    peak_mem = ""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        summary["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30  # this process's current GPU
        peak_mem = f", peak GPU memory {summary['peak_gpu_mem_gib']:.1f} GiB"
    metrics.write([summary])
    metrics.close()
    log(f"done: step {step}/{cfg.steps} in {wall:.1f} s this invocation (train {totals['train_time']:.1f} s over "
        f"the run, eval {eval_time:.1f} s), {summary['tokens_per_s']:,.0f} tokens/s{peak_mem}")
    if evals:
        log(f"val loss {first_val:.4f} -> {last_val:.4f} nats/byte ({-summary['val_drop_pct']:+.1f}%)")
    return summary


class _GracefulStop:
    """SIGINT/SIGTERM handlers that ask the loop to stop after the current step (which is then checkpointed)
    instead of killing it mid-update. A second signal raises KeyboardInterrupt at once. Handlers are installed only
    from the main thread, and SIGINT only where Python's default handler is in place (not where it is ignored)."""

    def __init__(self):
        self.received = None
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            try:
                if signal.getsignal(sig) is default:
                    self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class _NoBar:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def write(self, msg):
        print(msg)

    def close(self):
        pass


def _aux_value(layer_rec: dict) -> float:
    """The first load-balancing loss of a layer's stats (loss / coeff; 1.0 = balanced for the aux loss)."""
    losses = layer_rec.get("losses")
    if isinstance(losses, dict) and losses:
        return float(next(iter(losses.values())))
    return float("nan")
