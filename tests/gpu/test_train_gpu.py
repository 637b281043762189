"""`moetron train` on a GPU: a run whose micro-steps replay a CUDA graph (the default) follows the same loss curve
as the same run issued op by op (--no-cuda-graphs), with gradient accumulation and the aux-loss-free expert bias
(a router buffer the graph updates in place) on."""

import json
import os

import pytest
import torch

from moetron.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64, num_experts=8, top_k=2,
             moe_ffn_hidden_size=64, score_function="sigmoid", expert_bias=True)


def _curves(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["kind"] == "train"]
    return [r["loss"] for r in train], [r["grad_norm"] for r in train], [r["val_loss"] for r in records
                                                                          if r["kind"] == "eval"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cuda_graph_run_matches_eager_run(tmp_path, dtype):
    corpus = tmp_path / "code.py"
    corpus.write_text("".join(f"def f_{i}(x, y={i % 7}):\n    return x * {i} + y\n" for i in range(2000)))
    runs = {}
    for graphs in (True, False):
        cfg = TrainConfig(preset="tiny", model_overrides=dict(MODEL), data=[str(corpus)], steps=8, batch_size=8,
                          grad_accum=2, seq_len=64, warmup_steps=2, eval_every=4, eval_batches=2, log_every=1,
                          ckpt_every=0, runs_dir=str(tmp_path / "runs"), name=f"g{graphs}", progress=False, seed=3,
                          device="cuda", dtype=dtype, cuda_graphs=graphs)
        runs[graphs] = _curves(train(cfg, log=lambda *a, **k: None)["run_dir"])
    (loss_g, gnorm_g, val_g), (loss_e, gnorm_e, val_e) = runs[True], runs[False]
    assert len(loss_g) == len(loss_e) == 8
    # the first step starts from the same weights: its loss and gradient norm agree to float rounding
    assert abs(loss_g[0] - loss_e[0]) <= 1e-6 * loss_e[0] and abs(gnorm_g[0] - gnorm_e[0]) <= 1e-5 * gnorm_e[0]
    # later steps drift apart as any two runs do whose kernels add in a different order (cuDNN attention's
    # backward and the embedding's use atomics); the drift stays at that size, never a different curve
    rtol = 2e-2 if dtype == "bf16" else 1e-3
    for a, b in zip(loss_g + val_g, loss_e + val_e):
        assert abs(a - b) <= rtol * abs(b), (loss_g, loss_e, val_g, val_e)


def test_master_weights_run_matches_fp32_weights_run(tmp_path):
    """bf16 weights with fp32 masters (the default on one CUDA process) against fp32 weights cast by autocast: the
    same forward (both round the same fp32 values to bf16), gradients that differ by bf16 rounding only, the same
    curve; the checkpoint holds the fp32 masters."""
    from safetensors.torch import load_file

    corpus = tmp_path / "code.py"
    corpus.write_text("".join(f"def g_{i}(a, b={i % 5}):\n    return a - {i} * b\n" for i in range(2000)))
    runs, dirs = {}, {}
    for master in (True, False):
        cfg = TrainConfig(preset="tiny", model_overrides=dict(MODEL), data=[str(corpus)], steps=8, batch_size=8,
                          grad_accum=2, seq_len=64, warmup_steps=2, eval_every=4, eval_batches=2, log_every=1,
                          ckpt_every=0, runs_dir=str(tmp_path / "runs"), name=f"m{master}", progress=False, seed=5,
                          device="cuda", dtype="bf16", master_weights=master)
        dirs[master] = train(cfg, log=lambda *a, **k: None)["run_dir"]
        runs[master] = _curves(dirs[master])
    (loss_m, gnorm_m, val_m), (loss_f, gnorm_f, val_f) = runs[True], runs[False]
    assert abs(loss_m[0] - loss_f[0]) <= 1e-6 * loss_f[0]
    assert abs(gnorm_m[0] - gnorm_f[0]) <= 1e-2 * gnorm_f[0]
    for a, b in zip(loss_m + val_m, loss_f + val_f):
        assert abs(a - b) <= 2e-2 * abs(b), (loss_m, loss_f, val_m, val_f)
    ckpt_dir = os.path.join(dirs[True], "checkpoints", "step_00000008")
    weights = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    assert all(t.dtype == torch.float32 for name, t in weights.items() if name.endswith("weight")), \
        {n: t.dtype for n, t in weights.items()}


def test_master_weights_resume_continues_the_same_run(tmp_path):
    """A master-weights run stopped at step 4 and resumed (fp32 masters and optimizer state from the checkpoint)
    follows the uninterrupted run, within the drift any two GPU runs show (atomics in cuDNN attention's and the
    embedding's backward); the exact-resume logic itself is checked bitwise on the CPU (tests/test_train.py)."""
    corpus = tmp_path / "code.py"
    corpus.write_text("".join(f"def h_{i}(p, q={i % 3}):\n    return p + {i} * q\n" for i in range(2000)))

    def cfg(name, **kw):
        return TrainConfig(preset="tiny", model_overrides=dict(MODEL), data=[str(corpus)], steps=8, batch_size=8,
                           grad_accum=2, seq_len=64, warmup_steps=2, eval_every=4, eval_batches=2, log_every=1,
                           ckpt_every=0, runs_dir=str(tmp_path / "runs"), name=name, progress=False, seed=7,
                           device="cuda", dtype="bf16", **kw)

    full = _curves(train(cfg("full"), log=lambda *a, **k: None)["run_dir"])
    train(cfg("split", stop_at=4), log=lambda *a, **k: None)
    split = _curves(train(cfg("split", resume=True), log=lambda *a, **k: None)["run_dir"])
    (loss_f, _, val_f), (loss_s, _, val_s) = full, split
    assert len(loss_s) == len(loss_f) == 8
    for a, b in zip(loss_s + val_s, loss_f + val_f):
        assert abs(a - b) <= 2e-2 * abs(b), (loss_s, loss_f, val_s, val_f)
