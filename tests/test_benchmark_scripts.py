"""The benchmark scripts' CPU paths, so a change to their structure cannot break them unnoticed between GPU runs:
layer.py's tiny run (every provider timed in turns, the outputs cross-checked) and gmm.py's self-check."""

import pytest
import torch

layer_bench = pytest.importorskip("benchmarks.layer")
gmm_bench = pytest.importorskip("benchmarks.gmm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path is the benchmark itself")
@pytest.mark.parametrize("inference", [False, True], ids=["train", "inference"])
def test_layer_tiny_run_times_every_provider_in_turns(monkeypatch, inference):
    written = {}
    monkeypatch.setattr(layer_bench, "write_results", lambda name, rows: written.update(name=name, rows=rows))
    argv = ["--device", "cpu", "--tiny", "--providers", "moetron", "hf_grouped_mm", "hf_eager", "--rounds", "2"]
    layer_bench.main(argv + (["--inference"] if inference else []))
    assert written["name"] == ("layer_infer" if inference else "layer")
    modes = ["infer"] if inference else ["fwd", "fwd_bwd"]
    rows = {(r["provider"], r["mode"]): r for r in written["rows"]}
    assert set(rows) == {(p, m) for p in ("moetron", "hf_grouped_mm", "hf_eager") for m in modes}
    for row in rows.values():
        assert "error" not in row, row
        assert len(row["ms_rounds"]) == 2 and row["ms"] > 0
    for provider in ("moetron", "hf_eager"):  # same weights and inputs: the same layer, to fp32 precision
        assert rows[provider, modes[0]]["rel_diff_vs_hf"] < 1e-5


def test_gmm_self_check_passes():
    assert gmm_bench.self_check() == 0
