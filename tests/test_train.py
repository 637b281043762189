"""`moetron train` end to end on the CPU: outputs, exact resume, bad inputs, checkpoint integrity, generation.

Every run here is a 2-layer, 32-wide model on a synthetic corpus, a few steps long (well under a second of
training each); what is checked is the plumbing, not the learning (the default run's learning is measured in the
README/report, not in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moetron import cli
from moetron.train import CheckpointError, DataError, ResumeError, TrainConfig, train
from moetron.train import checkpoint as ckpt
from moetron.train.data import ByteDataset, load_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough that each step takes milliseconds; two MoE layers so per-layer statistics have something to show.
SMALL_MODEL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, max_seq_len=32, num_experts=4,
                   top_k=2, moe_ffn_hidden_size=32)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """About 40 KB of Python-like text; distinct lines so the model has something to learn."""
    d = tmp_path_factory.mktemp("corpus")
    lines = [f"def f_{i}(x, y={i % 7}):\n    return x * {i} + y  # line {i}\n" for i in range(900)]
    path = d / "code.py"
    path.write_text("".join(lines))
    return str(path)


def _cfg(tmp_path, corpus_file, **kw):
    base = dict(preset="tiny", model_overrides=dict(SMALL_MODEL), data=[corpus_file], steps=6, batch_size=4,
                seq_len=32, warmup_steps=2, eval_every=3, eval_batches=2, log_every=3, ckpt_every=0,
                runs_dir=str(tmp_path / "runs"), name="r", progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(*_args, **_kw):
    pass


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_run_writes_every_output(tmp_path, corpus_file):
    summary = train(_cfg(tmp_path, corpus_file, ckpt_every=3), log=_quiet)
    run = summary["run_dir"]
    assert run == str(tmp_path / "runs" / "r")
    for name in ("config.json", "metrics.jsonl", "loss.png", "expert_load.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    for name in ("loss.png", "expert_load.png"):
        with open(os.path.join(run, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["model"]["hidden_size"] == 32 and saved["train"]["steps"] == 6
    assert saved["data"]["sha256"] == load_corpus([corpus_file]).sha256

    # every step's loss, evaluations at 0, 3 and 6, per-layer MoE statistics on each log step
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _records(run, "eval")] == [0, 3, 6]
    moe = _records(run, "moe")
    assert [r["step"] for r in moe] == [3, 6]
    for layer in moe[-1]["layers"]:
        assert set(layer) >= {"layer", "tokens_per_expert", "load_imbalance", "num_dropped", "losses"}
        assert len(layer["tokens_per_expert"]) == 4
        # counts accumulated over the 3 steps of the interval: 3 steps x 4 x 32 tokens x top-2
        assert sum(layer["tokens_per_expert"]) == 3 * 4 * 32 * 2
        assert layer["num_dropped"] == 0 and "aux_loss" in layer["losses"]
    assert summary["first_val_loss"] == _records(run, "eval")[0]["val_loss"]
    assert summary["last_val_loss"] == _records(run, "eval")[-1]["val_loss"]

    # two checkpoints kept (steps 3 and 6), each complete, and `latest` names the newest
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3, 6]
    latest = ckpt.find_checkpoint(run)
    assert latest.endswith("step_00000006")
    assert sorted(os.listdir(latest)) == ["manifest.json", "model.safetensors", "train_state.pt"]
    from safetensors import safe_open

    with safe_open(os.path.join(latest, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_norm.weight", "model.layers.1.mlp.router.weight",
            "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
            "model.norm.weight", "lm_head.weight"} <= keys


def _final_weights(run):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt.find_checkpoint(run), "model.safetensors"))


@pytest.mark.parametrize("variant", [
    # softmax top-2 with the aux loss (the default router)
    {},
    # sigmoid router with expert-bias balancing and input jitter (global RNG and router buffers must be restored),
    # two micro-batches per step
    {"model": dict(score_function="sigmoid", expert_bias=True, load_balancing="none",
                   moe_extra={"input_jitter": 0.05}), "grad_accum": 2},
])
def test_resume_is_exact(tmp_path, corpus_file, variant):
    over = dict(SMALL_MODEL, **variant.get("model", {}))
    kw = dict(model_overrides=over, steps=8, eval_every=4, log_every=2, grad_accum=variant.get("grad_accum", 1))
    full = train(_cfg(tmp_path, corpus_file, name="full", **kw), log=_quiet)
    half = train(_cfg(tmp_path, corpus_file, name="split", stop_at=4, **kw), log=_quiet)
    assert half["step"] == 4 and half["checkpoint"].endswith("step_00000004")
    resumed = train(_cfg(tmp_path, corpus_file, name="split", resume=True, **kw), log=_quiet)

    a, b = _records(full["run_dir"], "train"), _records(resumed["run_dir"], "train")
    assert [r["step"] for r in b] == list(range(1, 9))  # no step lost or repeated across the resume
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise: JSON keeps a float's exact repr
    assert resumed["last_val_loss"] == full["last_val_loss"]
    wa, wb = _final_weights(full["run_dir"]), _final_weights(resumed["run_dir"])
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    if variant:
        bias = [k for k in wa if k.endswith("router.expert_bias")]
        assert bias and any(wa[k].abs().sum() > 0 for k in bias)  # the bias really moved


def test_resume_refuses_an_incompatible_config(tmp_path, corpus_file, capsys):
    train(_cfg(tmp_path, corpus_file, steps=4, stop_at=2), log=_quiet)
    with pytest.raises(ResumeError, match=r"model\.hidden_size: checkpoint 32, now 64"):
        train(_cfg(tmp_path, corpus_file, steps=4, resume=True, model_overrides=dict(SMALL_MODEL, hidden_size=64)),
              log=_quiet)
    with pytest.raises(ResumeError, match=r"lr: checkpoint 0.003, now 0.001"):
        train(_cfg(tmp_path, corpus_file, steps=4, resume=True, lr=1e-3), log=_quiet)
    other = os.path.join(str(tmp_path), "other.txt")
    with open(other, "w") as f:
        f.write("completely different text\n" * 2000)
    with pytest.raises(ResumeError, match="training text changed"):
        train(_cfg(tmp_path, corpus_file, steps=4, resume=True, data=[other]), log=_quiet)
    # the CLI starts from the saved settings, so a bare --resume works and a conflicting option is refused
    assert cli.main(["train", "--resume", "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--no-progress"]) == 0
    assert cli.main(["train", "--resume", "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--steps", "6",
                     "--set", "num_experts=8", "--no-progress"]) == 2
    # a config.json with a setting this version does not know is named, not a TypeError
    path = os.path.join(str(tmp_path / "runs"), "r", "config.json")
    saved = json.load(open(path))
    saved["train"]["warp_drive"] = True
    json.dump(saved, open(path, "w"))
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--no-progress"]) == 2
    assert "TrainConfig has no fields ['warp_drive']" in capsys.readouterr().err


def test_bad_data_errors(tmp_path, corpus_file):
    with pytest.raises(DataError, match="no such file or folder: .*missing.txt"):
        load_corpus([str(tmp_path / "missing.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt' is empty"):
        load_corpus([str(empty)])
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"ELF\x7f" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match="blob.bin' is not a text file .*NUL byte at offset 4"):
        load_corpus([str(binary)])
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    with pytest.raises(DataError, match="empty_folder' holds no non-empty files"):
        load_corpus([str(folder)])
    (folder / "x.pyc").write_bytes(b"\x00\x01binary")
    with pytest.raises(DataError, match="holds only binary files"):
        load_corpus([str(folder)])
    (folder / "notes.txt").write_text("text")
    c = load_corpus([str(folder)])
    assert c.data == b"text" and len(c.skipped_binary) == 1  # binaries inside a folder are skipped and listed
    with pytest.raises(DataError, match="holds 4 bytes; with seq_len=32 it needs at least 660"):
        ByteDataset(c, 32)
    # and through the CLI: a clear message, exit status 2, no traceback
    assert cli.main(["train", "--data", str(binary), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 2


def test_data_is_deterministic_and_split(corpus_file):
    ds = ByteDataset(load_corpus([corpus_file]), 32, seed=3)
    x1, y1 = ds.train_batch(17, 0, 4)
    x2, y2 = ByteDataset(load_corpus([corpus_file]), 32, seed=3).train_batch(17, 0, 4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # labels are the next bytes
    assert not torch.equal(ds.train_batch(18, 0, 4)[0], x1)
    assert not torch.equal(ds.train_batch(17, 1, 4)[0], x1)
    total = len(load_corpus([corpus_file]).data)
    block = total // 1000  # 1000 blocks of at least one window, every 10th held out
    assert ds.val.numel() == block * 100 and ds.train.numel() == block * 900
    v1, v2 = ds.val_batches(2, 4), ds.val_batches(2, 4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2))


def test_default_corpus_is_the_stdlib():
    c = load_corpus(None, max_bytes=200_000)
    assert c.files and all(f.endswith(".py") for f in c.files)
    assert len(c.data) <= 200_000 and c.files == sorted(c.files, key=c.files.index)
    assert load_corpus(None, max_bytes=200_000).sha256 == c.sha256


def test_corrupt_or_incomplete_checkpoint(tmp_path, corpus_file):
    run = train(_cfg(tmp_path, corpus_file, steps=4, stop_at=2), log=_quiet)["run_dir"]
    path = ckpt.find_checkpoint(run)
    model_file = os.path.join(path, "model.safetensors")
    state_file = os.path.join(path, "train_state.pt")
    original = open(model_file, "rb").read()

    with open(model_file, "wb") as f:  # truncated, as by a full disk
        f.write(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        train(_cfg(tmp_path, corpus_file, steps=4, resume=True), log=_quiet)
    with open(model_file, "wb") as f:
        f.write(original)

    data = bytearray(open(state_file, "rb").read())  # one flipped byte, same size
    data[len(data) // 2] ^= 0xFF
    with open(state_file, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(CheckpointError, match="train_state.pt is corrupt"):
        train(_cfg(tmp_path, corpus_file, steps=4, resume=True), log=_quiet)
    assert cli.main(["train", "--resume", "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--no-progress"]) == 2

    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.verify_checkpoint(path)


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, corpus_file):
    run = train(_cfg(tmp_path, corpus_file, steps=4, stop_at=2), log=_quiet)["run_dir"]
    good = ckpt.find_checkpoint(run)
    # a write cut short leaves only a hidden temporary folder: it is never picked up
    partial = os.path.join(run, "checkpoints", ".tmp-step_00000004-999")
    os.makedirs(partial)
    with open(os.path.join(partial, "model.safetensors"), "wb") as f:
        f.write(b"partial")
    assert ckpt.find_checkpoint(run) == good
    ckpt.verify_checkpoint(good)
    out = train(_cfg(tmp_path, corpus_file, steps=4, resume=True), log=_quiet)
    assert out["step"] == 4 and [r["step"] for r in _records(run, "train")] == [1, 2, 3, 4]


def test_sigterm_stops_after_a_checkpointed_step(tmp_path, corpus_file):
    """A scheduler's SIGTERM (or Ctrl-C) ends the run after the current step, with a checkpoint to resume from."""
    import signal

    def log(msg):
        if msg.startswith("step 2:"):
            os.kill(os.getpid(), signal.SIGTERM)

    out = train(_cfg(tmp_path, corpus_file, steps=10, log_every=1), log=log)
    assert out["interrupted"] and out["step"] == 2 and out["checkpoint"].endswith("step_00000002")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    out = train(_cfg(tmp_path, corpus_file, steps=10, log_every=1, resume=True), log=_quiet)
    assert out["step"] == 10 and not out["interrupted"]
    assert [r["step"] for r in _records(out["run_dir"], "train")] == list(range(1, 11))


def test_out_of_memory_says_how_to_split_the_step(tmp_path, corpus_file, monkeypatch, capsys):
    # A training step that runs out of GPU memory (simulated: the forward raises what the CUDA allocator raises)
    # ends with a clear error naming the micro-batch and the next --grad-accum that divides the batch, and the
    # CLI turns it into "error: ..." and exit status 2, not a traceback.
    from moetron.models import MoETransformer
    from moetron.train import GPUMemoryError

    real_forward = MoETransformer.forward

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(MoETransformer, "forward", forward)
    with pytest.raises(GPUMemoryError, match=r"in step 1.* micro-batches of 9 sequences x 32 bytes .*"
                                             r"--grad-accum 3 .*--resume continues") as info:
        train(_cfg(tmp_path, corpus_file, batch_size=9, name="oom"), log=_quiet)  # 2 does not divide 9
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    rc = cli.main(["train", "--data", corpus_file, "--runs-dir", str(tmp_path / "runs"), "--name", "oom2",
                   "--steps", "2", "--no-progress", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32",
                   "--set", "hidden_size=32", "--set", "num_layers=1", "--set", "num_heads=2",
                   "--set", "num_kv_heads=2", "--set", "num_experts=4", "--set", "moe_ffn_hidden_size=16",
                   "--set", "max_seq_len=32"])
    assert rc == 2
    assert "--grad-accum 4" in capsys.readouterr().err


def test_generate(tmp_path, corpus_file, capsys):
    run = train(_cfg(tmp_path, corpus_file, steps=3), log=_quiet)["run_dir"]
    capsys.readouterr()
    assert cli.main(["generate", "--run", run, "--prompt", "def ", "--max-new-tokens", "24", "--seed", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ") and len(first.encode()) > 4
    assert cli.main(["generate", "--run", run, "--prompt", "def ", "--max-new-tokens", "24", "--seed", "0"]) == 0
    assert capsys.readouterr().out == first  # seeded sampling repeats
    assert cli.main(["generate", "--run", str(tmp_path / "nope")]) == 2
    # generate reads only the weights: a damaged training state does not matter, damaged weights do
    ck = ckpt.find_checkpoint(run)
    with open(os.path.join(ck, ckpt.STATE_FILE), "r+b") as f:
        f.write(b"garbage")
    assert cli.main(["generate", "--run", run, "--prompt", "def ", "--max-new-tokens", "24", "--seed", "0"]) == 0
    assert capsys.readouterr().out == first
    with open(os.path.join(ck, ckpt.MODEL_FILE), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"garbage!")
    assert cli.main(["generate", "--run", run, "--prompt", "def "]) == 2
    assert "model.safetensors is corrupt" in capsys.readouterr().err


def test_new_runs_never_overwrite(tmp_path, corpus_file):
    a = train(_cfg(tmp_path, corpus_file, steps=2, name=None), log=_quiet)["run_dir"]
    b = train(_cfg(tmp_path, corpus_file, steps=2, name=None), log=_quiet)["run_dir"]
    assert os.path.basename(a) == "tiny" and os.path.basename(b) == "tiny-2"
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        train(_cfg(tmp_path, corpus_file, steps=2, name="tiny"), log=_quiet)


def test_expert_parallel_needs_torchrun(tmp_path, corpus_file, capsys, monkeypatch):
    """--ep > 1 in one process, or sizes that do not fit, fail before any process group exists, naming the numbers
    (tests/test_train_ep.py runs the real thing)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"--ep 2 needs 2 processes .* single process .*torchrun "
                                         r"--nproc-per-node=2 -m moetron train --ep 2"):
        train(_cfg(tmp_path, corpus_file, ep=2), log=_quiet)
    assert cli.main(["train", "--ep", "2", "--data", corpus_file, "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "--ep 2 needs 2 processes" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path, corpus_file):
    """`python -m moetron train` runs in a fresh interpreter and prints the summary."""
    cmd = [sys.executable, "-m", "moetron", "train", "--data", corpus_file, "--steps", "2", "--batch-size", "2",
           "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--no-progress",
           "--runs-dir", str(tmp_path / "runs"), "--name", "cli"]
    for field, value in SMALL_MODEL.items():
        cmd += ["--set", f"{field}={value}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "val loss" in out.stdout and os.path.isfile(tmp_path / "runs" / "cli" / "loss.png")


def test_cuda_graphs_setting(tmp_path, corpus_file):
    """cuda_graphs must be a bool (named in the error); on the CPU it changes nothing (tests/gpu/test_train_gpu.py
    compares graph and eager runs on a GPU); a graph needs CUDA tensors."""
    with pytest.raises(ValueError, match="cuda_graphs"):
        TrainConfig(preset="tiny", cuda_graphs="yes")
    a = train(_cfg(tmp_path, corpus_file, steps=2, name="g1", cuda_graphs=True), log=_quiet)
    b = train(_cfg(tmp_path, corpus_file, steps=2, name="g0", cuda_graphs=False), log=_quiet)
    assert a["last_val_loss"] == b["last_val_loss"]
    from moetron.models import MoETransformer, ModelConfig
    from moetron.train.graphs import GraphedMicroStep

    model = MoETransformer(ModelConfig(**SMALL_MODEL))
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="x must be on a CUDA device"):
        GraphedMicroStep(model, x, x, loss_div=1.0, autocast_dtype=None, moe_layers=model.moe_layers())


def test_cpu_warns_about_gpu_sized_steps():
    from moetron.models import preset
    from moetron.train.config import PRESET_TRAIN
    from moetron.train.loop import _cpu_step_warning

    def step_flops(name):
        t = PRESET_TRAIN[name]
        return preset(name).flops_per_token(t["seq_len"]) * t["batch_size"] * t["seq_len"]

    assert _cpu_step_warning(step_flops("tiny"), torch.device("cpu")) is None
    msg = _cpu_step_warning(step_flops("small"), torch.device("cpu"))
    assert msg is not None and "77 TFLOP" in msg and "--device cuda" in msg
    assert _cpu_step_warning(step_flops("small"), torch.device("cuda")) is None
