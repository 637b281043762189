"""Training configuration: one flat dataclass, plus the training defaults that go with each model preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from .._checks import config_error, config_from_dict, is_int, is_real

__all__ = ["TrainConfig", "PRESET_TRAIN", "RESUME_MUST_MATCH"]

# Training defaults per model preset (moetron.models.PRESETS). Fields of TrainConfig left at None take these.
PRESET_TRAIN: dict[str, dict] = {
    # 2 CPU cores: the whole default run (startup, training, evals, checkpoints, plots) in about 3 minutes.
    "tiny": dict(steps=900, batch_size=16, grad_accum=1, seq_len=128, lr=3e-3, warmup_steps=50, eval_every=100,
                 log_every=100, ckpt_every=500, eval_batches=8, default_corpus_bytes=8 << 20),
    # One GPU, bf16: 64 x 1024 bytes per step in one micro-batch (34 GiB peak on an H100, measured). The default
    # corpus is the whole standard library (about 12 MB without its tests), so 500 steps (33M bytes) pass over it
    # about 3 times: enough to measure throughput and MFU; pass --data with more text for a real run.
    "small": dict(steps=500, batch_size=64, grad_accum=1, seq_len=1024, lr=6e-4, warmup_steps=50, eval_every=50,
                  log_every=10, ckpt_every=250, eval_batches=8, default_corpus_bytes=1 << 30),
}

# A run resumes only when these match its checkpoint (they decide the model, the data order and the update rule),
# besides the model config and the data itself. steps may change: the cosine then ends at the new horizon.
RESUME_MUST_MATCH = ("preset", "seed", "batch_size", "grad_accum", "seq_len", "lr", "min_lr_ratio", "warmup_steps",
                     "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip")


def _bad(field: str, expected: str, got) -> ValueError:
    return config_error("TrainConfig", field, expected, got)


@dataclass
class TrainConfig:
    # Model preset from moetron.models.PRESETS ("tiny" for CPU, "small" for one GPU).
    preset: str = "tiny"
    # ModelConfig fields overriding the preset, e.g. {"num_experts": 16}.
    model_overrides: dict = field(default_factory=dict)
    # Text files or folders; None: the Python standard library's .py files (moetron.train.data).
    data: list[str] | None = None
    # Read at most this many bytes of --data or of the default corpus (None: all of --data, and
    # default_corpus_bytes of the default corpus).
    max_data_bytes: int | None = None
    # Bytes of the default corpus read when there is no --data (startup time vs. variety). None: the preset's.
    default_corpus_bytes: int | None = None
    # Total optimizer steps (the LR schedule's horizon). None: the preset's.
    steps: int | None = None
    # Stop after this many steps, checkpointing as if interrupted; --resume then continues to `steps`.
    stop_at: int | None = None
    # Sequences per optimizer step (all micro-batches together; under torchrun, of all processes together: each
    # process takes its share of every micro-batch). None: the preset's.
    batch_size: int | None = None
    # Micro-batches per optimizer step; batch_size must be a multiple of it. None: the preset's.
    grad_accum: int | None = None
    # Bytes per training sequence (<= the model's max_seq_len). None: the preset's.
    seq_len: int | None = None
    # Peak learning rate of AdamW. None: the preset's.
    lr: float | None = None
    # The cosine decays the LR to lr * min_lr_ratio at the last step.
    min_lr_ratio: float = 0.1
    # Steps of linear warm-up from 0 to lr. None: the preset's.
    warmup_steps: int | None = None
    # AdamW decoupled weight decay, on matrices only (not norms).
    weight_decay: float = 0.1
    # AdamW betas and epsilon.
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    # Clip the global gradient norm to this (0: no clipping; the norm is still logged).
    grad_clip: float = 1.0
    # Evaluate on the validation split every this many steps (and at step 0 and at the end). None: the preset's.
    eval_every: int | None = None
    # Validation batches (of batch_size // grad_accum sequences) per evaluation. None: the preset's.
    eval_batches: int | None = None
    # Record losses, tokens/s and per-layer MoE statistics every this many steps. None: the preset's.
    log_every: int | None = None
    # Checkpoint every this many steps (0: only at the end). None: the preset's.
    ckpt_every: int | None = None
    # Complete checkpoints kept on disk (the newest ones).
    keep_checkpoints: int = 2
    # Seeds the model init, the data order and every RNG.
    seed: int = 0
    # "cpu", "cuda" or "auto" (cuda when available).
    device: str = "auto"
    # Compute dtype: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32". Weights stay fp32.
    dtype: str = "auto"
    # Run folder name under runs_dir. None: the preset name (plus -2, -3, ... if taken).
    name: str | None = None
    # Parent folder of the run folders.
    runs_dir: str = "runs"
    # Continue the run in runs_dir/name from its latest checkpoint.
    resume: bool = False
    # Replace an existing run folder of the same name instead of picking a new name.
    overwrite: bool = False
    # Expert-parallel size: experts spread over ep processes (torchrun --nproc-per-node=N, N a multiple of ep; all N
    # are data parallel for the rest). Not part of RESUME_MUST_MATCH: a checkpoint resumes at any ep.
    ep: int = 1
    # MoE dispatcher of every MoE layer (MoEConfig.dispatcher). None: the model config's ("local"), or "allgather"
    # when ep > 1 (sync-free, so CUDA graphs apply; "fused" is too; "alltoall" syncs once per layer).
    dispatcher: str | None = None
    # Show a tqdm progress bar.
    progress: bool = True
    # Capture each micro-step in a CUDA graph (moetron.train.graphs) on CUDA: one process, or several whose MoE
    # layers never sync with the host (dispatcher "allgather" or "fused"); no effect on the CPU or with the
    # alltoall dispatcher. Off: every micro-step is issued op by op from Python.
    cuda_graphs: bool = True
    # Keep the matrices in bf16 with fp32 master copies and fp32 gradient accumulation (moetron.train.master) on
    # a CUDA bf16 run (one process or expert-parallel); no effect on the CPU. Off: fp32 weights cast by autocast
    # in every micro-step.
    master_weights: bool = True
    # Peak dense bf16 TFLOP/s of one GPU for MFU. None: looked up from the GPU name (H100/H200: 989).
    peak_tflops: float | None = None

    def __post_init__(self):
        if not isinstance(self.preset, str):
            raise _bad("preset", "a preset name", self.preset)
        from ..models.transformer import PRESETS

        if self.preset not in PRESETS:
            raise _bad("preset", f"one of {sorted(PRESETS)}", self.preset)
        for k, v in PRESET_TRAIN.get(self.preset, PRESET_TRAIN["tiny"]).items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.data is not None and (not isinstance(self.data, (list, tuple)) or
                                      not all(isinstance(p, str) for p in self.data)):
            raise _bad("data", "None or a list of paths", self.data)
        if self.data is not None:
            self.data = list(self.data) or None
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "log_every",
                     "keep_checkpoints", "ep", "default_corpus_bytes"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise _bad(name, "a positive int", v)
        for name in ("warmup_steps", "ckpt_every", "seed"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise _bad(name, "an int >= 0", v)
        if self.stop_at is not None and (not is_int(self.stop_at) or not 1 <= self.stop_at <= self.steps):
            raise _bad("stop_at", f"None or an int in [1, steps={self.steps}]", self.stop_at)
        if self.max_data_bytes is not None and (not is_int(self.max_data_bytes) or self.max_data_bytes < 1):
            raise _bad("max_data_bytes", "None or a positive int", self.max_data_bytes)
        if self.batch_size % self.grad_accum:
            raise _bad("batch_size", f"a multiple of grad_accum={self.grad_accum}", self.batch_size)
        for name in ("lr", "adam_eps"):
            v = getattr(self, name)
            if not is_real(v) or v <= 0:
                raise _bad(name, "a finite float > 0", v)
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not is_real(v) or v < 0:
                raise _bad(name, "a finite float >= 0", v)
        for name in ("min_lr_ratio", "beta1", "beta2"):
            v = getattr(self, name)
            if not is_real(v) or not 0 <= v <= 1:
                raise _bad(name, "a float in [0, 1]", v)
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise _bad("device", '"auto", "cpu", "cuda" or "cuda:N"', self.device)
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise _bad("dtype", '"auto", "bf16" or "fp32"', self.dtype)
        if self.name is not None and (not isinstance(self.name, str) or not self.name or "/" in self.name
                                      or self.name in (".", "..")):
            raise _bad("name", "a folder name (no '/')", self.name)
        if not isinstance(self.model_overrides, dict):
            raise _bad("model_overrides", "a dict of ModelConfig fields", self.model_overrides)
        for name in ("cuda_graphs", "master_weights"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "a bool", getattr(self, name))
        if self.peak_tflops is not None and (not is_real(self.peak_tflops) or self.peak_tflops <= 0):
            raise _bad("peak_tflops", "None or a float > 0", self.peak_tflops)

    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d)


