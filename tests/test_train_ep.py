"""`moetron train` with expert parallelism: two gloo processes started the way torchrun starts them (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK in the environment; ``train`` creates the process group itself) against
the one-process run with the same seed and global batch.

What must hold (moetron/train/distributed.py says why it does):

- the per-step training losses, validation losses, expert counts and final weights of ``--ep 2`` equal the
  one-process run's within fp32 rounding (alltoall; allgather with the sigmoid router, aux-loss-free expert bias
  and two micro-batches, whose counts must be reduced over both ranks);
- ``--resume`` in EP mode (through the CLI, from the saved settings) continues bitwise as the uninterrupted EP run;
- a checkpoint written at ep 2 resumes in one process (ep 1) and continues as the one-process run, and
  ``moetron generate`` reads it;
- with fp32 master weights (the GPU default, run here with fp32 storage) ep 2 still equals one process, and its
  resume is exact;
- sizes that cannot work fail before any process group exists, naming the numbers.

One spawned world of 2 ranks runs every EP job in sequence (process start-up dominates on 2 cores); the tests read
the run folders it leaves. The model is tests/test_train.py's 2-layer, 32-wide one, 6 steps of 4 x 32 bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import traceback

import pytest
import torch

from moetron import cli
from moetron._env import triton_interpreter_enabled
from moetron.train import TrainConfig, train
from moetron.train import checkpoint as ckpt
from tests._spawn import collect_world

SMALL_MODEL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, max_seq_len=32, num_experts=4,
                   top_k=2, moe_ffn_hidden_size=32)
# sigmoid router with the aux-loss-free expert bias instead of the aux loss
BIAS_MODEL = dict(SMALL_MODEL, score_function="sigmoid", expert_bias=True, load_balancing="none",
                  bias_update_rate=0.01)
STEPS = 6
RTOL = 1e-5  # fp32: only the order of sums differs (per-rank means, expert-gradient sums over sources)


def make_cfg(runs_dir: str, corpus: str, **kw) -> TrainConfig:
    # on CPU (gloo) on every machine: the references are fp32 CPU runs, and a GPU machine may hold one GPU only
    base = dict(preset="tiny", device="cpu", model_overrides=dict(SMALL_MODEL), data=[corpus], steps=STEPS,
                batch_size=4, seq_len=32, warmup_steps=2, eval_every=3, eval_batches=2, log_every=3, ckpt_every=0,
                runs_dir=runs_dir, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(*_a, **_k):
    pass


# ---------------------------------------------------------------------------------------------------------
# A world of processes started as torchrun starts them
# ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, ports, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MOETRON_BACKEND="torch")
    os.environ.pop("MOETRON_DEBUG", None)
    torch.set_num_threads(1)
    ports = iter(ports)

    def next_port():  # one rendezvous per train() call: each one creates and destroys its process group
        os.environ["MASTER_PORT"] = str(next(ports))

    try:
        out = {"result": fn(rank, next_port, *args)}
    except BaseException:
        out = {"error": traceback.format_exc()}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn(world: int, fn, *args, ports: int = 8, timeout: float = 240.0) -> list:
    """Run ``fn(rank, next_port, *args)`` in ``world`` fresh processes; their results in rank order."""
    import multiprocessing

    method = "spawn"
    if "forkserver" in multiprocessing.get_all_start_methods():
        multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "moetron", "moetron.train.loop",
                                                "tests.test_train_ep"])
        method = "forkserver"
    port_list = [_free_port() for _ in range(ports)]
    return collect_world(_worker, lambda tmp: (world, port_list, tmp, fn, args), world, start_method=method,
                         timeout=timeout, label="world")


def _ep_jobs(rank, next_port, runs_dir, corpus):
    out = {}
    next_port()
    out["a2a"] = train(make_cfg(runs_dir, corpus, name="a2a", ep=2, dispatcher="alltoall"), log=_quiet)
    next_port()
    out["bias_ag"] = train(make_cfg(runs_dir, corpus, name="bias_ag", ep=2, dispatcher="allgather",
                                    model_overrides=dict(BIAS_MODEL), grad_accum=2, batch_size=8), log=_quiet)
    if triton_interpreter_enabled():  # the fused kernels on CPU tensors (tests/conftest.py: no GPU present)
        next_port()
        out["fused"] = train(make_cfg(runs_dir, corpus, name="fused", ep=2, dispatcher="fused"), log=_quiet)
    next_port()
    out["split"] = train(make_cfg(runs_dir, corpus, name="split", ep=2, stop_at=3), log=_quiet)
    if rank == 0:  # the step-3 checkpoint, for the one-process resume in the parent
        shutil.copytree(os.path.join(runs_dir, "split"), os.path.join(runs_dir, "split_ep1"))
    next_port()
    # from the saved settings (ep 2, allgather: the default), as a user types it under torchrun
    out["resume_rc"] = cli.main(["train", "--resume", "--runs-dir", runs_dir, "--name", "split", "--no-progress"])
    # fp32 master weights (on GPUs the bf16 default) at ep 2: the masters' gradients are reduced, clipped and
    # checkpointed (gathered, then sliced back on resume) in place of the parameters'. With fp32 storage the
    # numbers are those of plain fp32 training.
    import moetron.train.loop as loop

    loop._MASTER_DTYPE_ON_CPU = torch.float32
    try:
        next_port()
        out["master"] = train(make_cfg(runs_dir, corpus, name="master", ep=2), log=_quiet)
        next_port()
        train(make_cfg(runs_dir, corpus, name="master_split", ep=2, stop_at=3), log=_quiet)
        next_port()
        out["master_resumed"] = train(make_cfg(runs_dir, corpus, name="master_split", ep=2, resume=True),
                                      log=_quiet)
    finally:
        loop._MASTER_DTYPE_ON_CPU = None
    return out


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the EP world and the one-process references
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = [f"def f_{i}(x, y={i % 7}):\n    return x * {i} + y  # line {i}\n" for i in range(900)]
    path = d / "code.py"
    path.write_text("".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    runs_dir = str(tmp_path_factory.mktemp("runs"))
    results = spawn(2, _ep_jobs, runs_dir, corpus)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: a second thread only fights the other test processes on 2 cores
    try:
        ref = train(make_cfg(runs_dir, corpus, name="ref"), log=_quiet)
        ref_bias = train(make_cfg(runs_dir, corpus, name="ref_bias", model_overrides=dict(BIAS_MODEL),
                                  grad_accum=2, batch_size=8), log=_quiet)
        # the ep-2 checkpoint of step 3, resumed in one process: --ep 1 overrides the saved ep 2 (and its allgather
        # dispatcher then runs the one-process path)
        rc = cli.main(["train", "--resume", "--runs-dir", runs_dir, "--name", "split_ep1", "--ep", "1",
                       "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return dict(dir=runs_dir, ep=results, ref=ref, ref_bias=ref_bias, ep1_rc=rc)


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt.find_checkpoint(run_dir), ckpt.MODEL_FILE))


def _assert_same_training(run, ref, exact=False):
    tr, tr_ref = _records(run, "train"), _records(ref, "train")
    assert [r["step"] for r in tr] == [r["step"] for r in tr_ref] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        got, want = [r[key] for r in tr], [r[key] for r in tr_ref]
        if exact:
            assert got == want, key
        else:
            assert got == pytest.approx(want, rel=RTOL), key
    ev, ev_ref = _records(run, "eval"), _records(ref, "eval")
    assert [r["step"] for r in ev] == [r["step"] for r in ev_ref] == [0, 3, 6]
    assert [r["val_loss"] for r in ev] == pytest.approx([r["val_loss"] for r in ev_ref], rel=0 if exact else RTOL)
    # expert counts of the whole global batch (summed over ranks), the same routing as one process
    moe, moe_ref = _records(run, "moe"), _records(ref, "moe")
    for a, b in zip(moe, moe_ref):
        assert [l["tokens_per_expert"] for l in a["layers"]] == [l["tokens_per_expert"] for l in b["layers"]]
        assert [l["num_dropped"] for l in a["layers"]] == [l["num_dropped"] for l in b["layers"]]
        for la, lb in zip(a["layers"], b["layers"]):
            assert la["losses"] == pytest.approx(lb["losses"], rel=RTOL)


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_ep2_alltoall_matches_one_process(runs):
    run, ref = os.path.join(runs["dir"], "a2a"), runs["ref"]["run_dir"]
    _assert_same_training(run, ref)
    moe = _records(run, "moe")
    assert sum(moe[0]["layers"][0]["tokens_per_expert"]) == 3 * 4 * 32 * 2  # 3 steps x global batch x top-2
    # the checkpoint is gathered into the one-process format: same keys and shapes, the same weights
    w, w_ref = _weights(run), _weights(ref)
    assert w.keys() == w_ref.keys()
    for k in w:
        # Adam turns rounding-level gradient differences of near-zero gradients into at most a few 1e-6
        torch.testing.assert_close(w[k], w_ref[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["world_size"] == 2 and saved["train"]["ep"] == 2 and saved["model"]["dispatcher"] == "alltoall"
    # every rank returns rank 0's summary
    a, b = (res["a2a"] for res in runs["ep"])
    assert a == b and a["step"] == STEPS and not a["interrupted"]


@pytest.mark.skipif(not triton_interpreter_enabled(), reason="the fused kernels run on CPU tensors only in Triton's "
                    "interpreter, which tests/conftest.py switches on where no GPU is present")
def test_ep2_fused_dispatcher_matches_one_process(runs):
    """The fused dispatch/combine (no host sync; on GPUs the micro-step is then CUDA-graph captured) trains the
    same model as one process."""
    _assert_same_training(os.path.join(runs["dir"], "fused"), runs["ref"]["run_dir"])


def test_ep2_allgather_expert_bias_matches_one_process(runs):
    run, ref = os.path.join(runs["dir"], "bias_ag"), runs["ref_bias"]["run_dir"]
    _assert_same_training(run, ref)
    w, w_ref = _weights(run), _weights(ref)
    bias = [k for k in w if k.endswith("router.expert_bias")]
    assert bias and any(w_ref[k].abs().sum() > 0 for k in bias)  # the bias moved, and moved the same way
    for k in bias:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=0)


def test_ep2_resume_is_exact(runs):
    assert all(res["resume_rc"] == 0 for res in runs["ep"])
    assert all(res["split"]["step"] == 3 for res in runs["ep"])
    run = os.path.join(runs["dir"], "split")
    _assert_same_training(run, os.path.join(runs["dir"], "a2a"), exact=True)
    w, w_full = _weights(run), _weights(os.path.join(runs["dir"], "a2a"))
    for k in w:
        assert torch.equal(w[k], w_full[k]), k


def test_ep2_checkpoint_resumes_in_one_process(runs):
    assert runs["ep1_rc"] == 0
    run = os.path.join(runs["dir"], "split_ep1")
    _assert_same_training(run, runs["ref"]["run_dir"])
    assert json.load(open(os.path.join(run, "config.json")))["world_size"] == 1


def test_ep2_master_weights_match_one_process_and_resume_exactly(runs):
    run, ref = os.path.join(runs["dir"], "master"), runs["ref"]["run_dir"]
    _assert_same_training(run, ref)
    w, w_ref = _weights(run), _weights(ref)
    assert w.keys() == w_ref.keys()
    for k in w:
        torch.testing.assert_close(w[k], w_ref[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    assert all(res["master_resumed"]["step"] == STEPS for res in runs["ep"])
    split = os.path.join(runs["dir"], "master_split")
    _assert_same_training(split, run, exact=True)  # the masters' AdamW state went through the checkpoint
    w_split = _weights(split)
    for k in w:
        assert torch.equal(w_split[k], w[k]), k


def test_generate_reads_an_ep_checkpoint(runs, capsys):
    assert cli.main(["generate", "--run", os.path.join(runs["dir"], "a2a"), "--prompt", "def ",
                     "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.parametrize("env_world, kw, match", [
    # torchrun with 4 processes and --ep 3
    (4, dict(ep=3), r"--ep 3 must divide the world size 4"),
    # 3 experts cannot split over 2 ranks
    (2, dict(ep=2, model_overrides=dict(SMALL_MODEL, num_experts=3)), r"--ep 2 must divide num_experts=3"),
    # a micro-batch of 2 sequences over 4 processes
    (4, dict(ep=2, batch_size=4, grad_accum=2),
     r"micro-batch of 2 sequences \(--batch-size 4 / --grad-accum 2\) must split evenly over the 4 processes; "
     r"pass a --batch-size that is a multiple of 8"),
    (2, dict(ep=2, dispatcher="local"), r"--dispatcher local keeps every expert in one process; with --ep 2"),
])
def test_bad_sizes_name_the_numbers(tmp_path, corpus, monkeypatch, env_world, kw, match):
    monkeypatch.setenv("WORLD_SIZE", str(env_world))  # raised before any process group would be created
    with pytest.raises(ValueError, match=match):
        train(make_cfg(str(tmp_path), corpus, **kw), log=_quiet)
