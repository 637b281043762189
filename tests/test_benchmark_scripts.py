"""The benchmark scripts' CPU paths, so a change to their structure cannot break them unnoticed between GPU runs:
layer.py's tiny run (every provider timed in turns, the outputs cross-checked), hf.py's quick run (every provider's
loss equal to grouped_mm's) and gmm.py's self-check."""

import pytest
import torch

layer_bench = pytest.importorskip("benchmarks.layer")
gmm_bench = pytest.importorskip("benchmarks.gmm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path is the benchmark itself")
@pytest.mark.parametrize("mode_flag", [None, "--inference", "--accumulate-grads"],
                         ids=["train", "inference", "accumulate"])
def test_layer_tiny_run_times_every_provider_in_turns(monkeypatch, mode_flag):
    written = {}
    monkeypatch.setattr(layer_bench, "write_results", lambda name, rows: written.update(name=name, rows=rows))
    providers = ("moetron", "hf_grouped_mm", "hf_eager", "moetron_calling_thread")
    argv = ["--device", "cpu", "--tiny", "--providers", *providers, "--rounds", "2"]
    layer_bench.main(argv + ([mode_flag] if mode_flag else []))
    inference = mode_flag == "--inference"
    assert written["name"] == {None: "layer", "--inference": "layer_infer", "--accumulate-grads": "layer_accum"}[
        mode_flag]
    modes = ["infer"] if inference else ["fwd", "fwd_bwd"]
    rows = {(r["provider"], r["mode"]): r for r in written["rows"]}
    assert set(rows) == {(p, m) for p in providers for m in modes}
    for row in rows.values():
        assert "error" not in row, row
        assert len(row["ms_rounds"]) == 2 and row["ms"] > 0
    for provider in ("moetron", "hf_eager", "moetron_calling_thread"):  # same weights and inputs: the same layer
        assert rows[provider, modes[0]]["rel_diff_vs_hf"] < 1e-5


def test_gmm_self_check_passes():
    assert gmm_bench.self_check() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path is the benchmark itself")
def test_hf_quick_run_gives_every_provider_the_same_loss(tmp_path):
    pytest.importorskip("transformers")
    hf_bench = pytest.importorskip("benchmarks.hf")
    rows = {(r["provider"], r.get("variant")): r for r in hf_bench.main(["--quick", "--out-dir", str(tmp_path)])}
    assert set(rows) == {("grouped_mm", None), ("eager", None), ("moetron", "fuse"), ("moetron", "experts"),
                         ("moetron", "experts+loss")}
    for key, row in rows.items():
        assert "error" not in row, row
        if key != ("grouped_mm", None):
            assert row["loss_rel_diff_vs_grouped_mm"] < 1e-5, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path is the benchmark itself")
def test_hf_decode_tiny_run_compiles_both_experts_fullgraph(monkeypatch):
    """hf_decode.py's CPU path: both experts implementations compile with fullgraph=True (backend "eager" here) and
    give the eager grouped_mm block's output."""
    pytest.importorskip("transformers")
    decode_bench = pytest.importorskip("benchmarks.hf_decode")
    written = {}
    monkeypatch.setattr(decode_bench, "write_results", lambda name, rows: written.update(name=name, rows=rows))
    decode_bench.main(["--device", "cpu", "--tiny", "--rounds", "1"])
    rows = {(r["case"], r["provider"], r["variant"]) for r in written["rows"]}
    assert rows == {(f"tiny_T{T}", p, v) for T in (1, 5) for p in ("hf_grouped_mm", "moetron")
                    for v in ("eager", "compiled")}
    for row in written["rows"]:
        assert row["rel_diff"] < 1e-5, row


def test_power_sampler_averages_the_samples_inside_a_window():
    """PowerSampler with a stand-in for nvidia-smi: header and "[N/A]" lines are skipped, a window averages the
    samples inside it, an empty window gives {}, and a missing command samples nothing."""
    import sys
    import time

    from benchmarks._common import PowerSampler

    script = ("import time\nprint('clocks.sm [MHz], power.draw [W]')\nprint('[N/A], [N/A]')\n"
              "for i in range(4):\n    print(f'{1000 + 100 * i}, {500 + i}', flush=True)\n    time.sleep(0.02)\n"
              "time.sleep(60)\n")
    t0 = time.monotonic()
    sampler = PowerSampler(command=[sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while len(sampler.samples) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    t1 = time.monotonic()
    sampler.close()  # stops the stand-in mid-sleep
    assert [(c, p) for _, c, p in sampler.samples] == [(1000, 500), (1100, 501), (1200, 502), (1300, 503)]
    assert sampler.mean(t0, t1) == {"sm_clock_mhz": 1150.0, "power_w": 501.5}
    assert sampler.mean(t1 + 1, t1 + 2) == {}
    missing = PowerSampler(command=["/nonexistent/nvidia-smi"])
    assert missing.mean(0, time.monotonic()) == {}
    missing.close()
