"""Checkpoint conversion (moetron/integrations/convert.py, ``moetron convert``).

- Round trips HF -> moetron -> HF and HF -> DCP -> HF for Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V3 (tiny random
  models written by transformers' own ``save_pretrained``): every tensor comes back with the same name, dtype and
  bytes, in one safetensors file or sharded with an index.
- The converted weights mean the same thing: moetron's model (or, for DeepSeek-V3 whose attention moetron's model
  lacks, moetron's MoE layer) computes the Hugging Face model's logits (or MoE block output) within the DESIGN.md
  rule, the Hugging Face float64 run being the reference and its fp32 run the baseline.
- A ``moetron train`` checkpoint becomes a Qwen3-MoE folder transformers loads, with the same logits.
- Expert-parallel: the DCP folder loads into an EP=2 model on 2 gloo ranks, which saves it back; that converts to
  the original Hugging Face tensors bit for bit.
- Bad input raises errors naming the argument, what was expected and what came.
"""

from __future__ import annotations

import copy
import inspect
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moetron.integrations import convert as cv  # noqa: E402
from moetron.models.transformer import ModelConfig, MoETransformer  # noqa: E402
from tests._tolerance import assert_close_to_ref  # noqa: E402
from tests.integrations._hf_models import ARCHS, VOCAB, tiny_model  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "torch")


def _tensors(folder) -> dict:
    return cv._read_safetensors(str(folder), "test")


def assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), f"{k}: bytes differ"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """One saved tiny model per architecture (DeepSeek-V3 in bf16 with its fp32 expert bias)."""
    out = {}
    for arch in ARCHS:
        dtype = torch.bfloat16 if arch == "deepseek_v3" else torch.float32
        model = tiny_model(arch, dtype=dtype)
        if arch == "deepseek_v3":
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.data = layer.mlp.gate.e_score_correction_bias.float()
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        out[arch] = path
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_identical(arch, hf_dirs, tmp_path):
    src = hf_dirs[arch]
    original = _tensors(src)
    assert any(".experts.0." in k for k in original)  # the per-expert format of the Hub
    summary = cv.convert(str(src), str(tmp_path / "mt"), src_format="hf", dst_format="moetron")
    mt = _tensors(tmp_path / "mt")
    assert not any(".experts.0." in k for k in mt) and any(k.endswith("experts.gate_up_proj") for k in mt)
    cv.convert(str(tmp_path / "mt"), str(tmp_path / "back"), src_format="moetron", dst_format="hf")
    assert_bit_identical(original, _tensors(tmp_path / "back"))
    with open(src / "config.json") as f, open(tmp_path / "back" / "config.json") as g:
        assert json.load(f) == json.load(g)
    assert os.path.isfile(tmp_path / "back" / "generation_config.json")  # side files travel along
    if arch == "deepseek_v3":  # MLA attention is carried under its HF names, nothing else
        assert summary["carried"] and all(".self_attn." in k for k in summary["carried"])
        assert mt["model.layers.1.mlp.router.expert_bias"].dtype == torch.float32
        assert mt["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    else:
        assert summary["carried"] == []


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_round_trip_through_dcp_and_shards(arch, hf_dirs, tmp_path):
    src = hf_dirs[arch]
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    original = _tensors(src)
    cv.convert(str(tmp_path / "sharded"), str(tmp_path / "dcp"), src_format="hf", dst_format="dcp")
    cv.convert(str(tmp_path / "dcp"), str(tmp_path / "mt"), src_format="dcp", dst_format="moetron",
               max_shard_size="30KB")
    assert os.path.isfile(tmp_path / "mt" / "model.safetensors.index.json")
    cv.convert(str(tmp_path / "mt"), str(tmp_path / "back"), src_format="moetron", dst_format="hf",
               max_shard_size="25KB")
    assert_bit_identical(original, _tensors(tmp_path / "back"))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
def test_converted_model_computes_the_same_logits(arch, hf_dirs):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[arch], experts_implementation="eager").eval()
    sd, hf_cfg = cv.load_hf(str(hf_dirs[arch]))
    cfg, mt_sd = cv.hf_to_moetron(sd, hf_cfg)
    model = MoETransformer(cfg).eval()
    model.load_state_dict(mt_sd, strict=True)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = _logits(copy.deepcopy(hf_model).double(), ids)
    assert_close_to_ref(f"{arch} logits", _logits(model, ids), ref, _logits(hf_model, ids))


def test_deepseek_v3_moe_layers_compute_the_same_output(hf_dirs):
    """moetron's model has no MLA attention, so compare each MoE block (router with groups, expert bias and scaling,
    routed and shared experts) with moetron's MoELayer holding the converted weights."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["deepseek_v3"], dtype=torch.float32,
                                                                 experts_implementation="eager")
    sd, hf_cfg = cv.load_hf(str(hf_dirs["deepseek_v3"]))
    cfg, mt_sd = cv.hf_to_moetron(sd, hf_cfg)
    model = MoETransformer(cfg).eval()
    carried = cv.carried_keys(mt_sd, cfg)
    missing, unexpected = model.load_state_dict({k: v for k, v in mt_sd.items() if k not in carried}, strict=False)
    assert not unexpected and all(".self_attn." in k for k in missing)
    x = torch.randn(11, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    for i, layer in model.moe_layers():
        block = hf_model.model.layers[i].mlp.eval()
        with torch.no_grad():
            ref = copy.deepcopy(block).double()(x.double()[None])[0]
            base = block(x[None])[0]
            out = layer(x)
        assert_close_to_ref(f"MoE layer {i}", out, ref, base)


def test_moetron_train_checkpoint_to_qwen3(tmp_path):
    """A checkpoint of moetron's own model (the `moetron train` folder layout) becomes a Qwen3-MoE folder that
    transformers loads and runs to the same logits."""
    from safetensors.torch import save_model

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=1, max_seq_len=32,
                      num_experts=5, top_k=2, moe_ffn_hidden_size=12, first_k_dense=1, dense_ffn_hidden_size=20,
                      init_std=0.2)
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    ck = tmp_path / "runs" / "t" / "checkpoints" / "step_00000001"
    os.makedirs(ck)
    save_model(model, str(ck / "model.safetensors"))
    with open(tmp_path / "runs" / "t" / "config.json", "w") as f:
        json.dump({"model": cfg.to_dict(), "train": {}}, f)
    with pytest.raises(ValueError, match="model_type must be given"):
        cv.convert(str(ck), str(tmp_path / "hf0"), src_format="moetron", dst_format="hf")
    cv.convert(str(ck), str(tmp_path / "hf"), src_format="moetron", dst_format="hf", model_type="qwen3_moe")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                 experts_implementation="eager").eval()
    assert type(hf_model).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    ref = _logits(copy.deepcopy(hf_model).double(), ids)
    assert_close_to_ref("logits", _logits(model, ids), ref, _logits(hf_model, ids))


# ---------------------------------------------------------------------------------------------------------
# Expert parallelism: DCP keyed by global expert id, loaded and saved at EP=2
# ---------------------------------------------------------------------------------------------------------


def _ep_world(rank, world, dcp_in, dcp_out, ids):
    import dataclasses

    from moetron.parallel import ParallelGroups, load_checkpoint, save_checkpoint

    with open(os.path.join(dcp_in, cv.MOETRON_CONFIG)) as f:
        cfg = ModelConfig.from_dict(json.load(f)["model"])
    groups = ParallelGroups.build(ep=world)
    cfg = dataclasses.replace(cfg, dispatcher="alltoall")
    torch.manual_seed(100 + rank)  # different random weights on every rank until the checkpoint loads
    model = MoETransformer(cfg, parallel=groups).eval()
    load_checkpoint(model, dcp_in)
    with torch.no_grad():
        logits = model(ids[rank:rank + 1])
    save_checkpoint(model, dcp_out)
    return {"logits": logits, "local_experts": model.model.layers[0].mlp.experts.gate_up_proj.shape[0]}


def test_expert_parallel_load_and_save(hf_dirs, tmp_path):
    if "parallel" not in inspect.signature(MoETransformer).parameters:
        pytest.skip("MoETransformer has no parallel= (expert-parallel model) in this tree")
    from tests.test_parallel import run_world

    src = hf_dirs["qwen3_moe"]
    original = _tensors(src)
    cv.convert(str(src), str(tmp_path / "dcp"), src_format="hf", dst_format="dcp")
    # E = 5 does not split over 2 ranks: rewrite the checkpoint with E = 4 experts (drop the last one)
    sd, cfg, hf_cfg = cv.load_dcp(str(tmp_path / "dcp"))
    import dataclasses

    cfg4 = dataclasses.replace(cfg, num_experts=4)
    for k in list(sd):
        if k.endswith((".experts.gate_up_proj", ".experts.down_proj", ".router.weight")):
            sd[k] = sd[k][:4].clone()
    hf4 = {**hf_cfg, "num_local_experts": 4}
    cv.save_dcp(sd, cfg4, str(tmp_path / "dcp4"), hf_config=hf4)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    outs = run_world(2, _ep_world, str(tmp_path / "dcp4"), str(tmp_path / "dcp_ep2"), ids)
    assert [o["local_experts"] for o in outs] == [2, 2]
    single = MoETransformer(cfg4).eval()
    single.load_state_dict(sd)
    for rank, o in enumerate(outs):
        torch.testing.assert_close(o["logits"], _logits(single, ids[rank:rank + 1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="or config must name one"):  # parallel.save_checkpoint writes no config
        cv.convert(str(tmp_path / "dcp_ep2"), str(tmp_path / "back"), src_format="dcp", dst_format="hf")
    cv.convert(str(tmp_path / "dcp_ep2"), str(tmp_path / "back"), src_format="dcp", dst_format="hf",
               config_path=str(tmp_path / "dcp4" / cv.MOETRON_CONFIG), overwrite=True)
    back = _tensors(tmp_path / "back")
    expected = {k: v for k, v in original.items() if ".experts.4." not in k}
    for k in [k for k in expected if k.endswith("mlp.gate.weight")]:
        expected[k] = expected[k][:4]
    assert_bit_identical(expected, back)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def test_errors_name_the_argument(hf_dirs, tmp_path):
    sd, hf_cfg = cv.load_hf(str(hf_dirs["qwen3_moe"]))
    with pytest.raises(ValueError, match="hf_config\\['model_type'\\] must be one of .* got 'llama'"):
        cv.hf_to_moetron(sd, {**hf_cfg, "model_type": "llama"})
    bad = dict(sd)
    del bad["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="missing 'model.layers.1.mlp.experts.3.up_proj.weight' \\(expert 3 of 5"):
        cv.hf_to_moetron(bad, hf_cfg)
    bad = dict(sd)
    bad["model.layers.0.mlp.experts.2.down_proj.weight"] = torch.zeros(16, 11)
    with pytest.raises(ValueError, match="down_proj.weight'\\] must have shape \\(16, 12\\).*got \\(16, 11\\)"):
        cv.hf_to_moetron(bad, hf_cfg)
    bad = dict(sd)
    bad["model.layers.0.mlp.experts.5.up_proj.weight"] = torch.zeros(12, 16)
    with pytest.raises(ValueError, match="unexpected MoE tensors in layer 0 .*E=5"):
        cv.hf_to_moetron(bad, hf_cfg)
    with pytest.raises(ValueError, match="MoE tensors in layer 0, which hf_config makes dense"):
        cv.hf_to_moetron(sd, {**hf_cfg, "mlp_only_layers": [0]})
    with pytest.raises(TypeError, match="hf_config must be a dict"):
        cv.hf_to_moetron(sd, "qwen3")
    cfg, mt = cv.hf_to_moetron(sd, hf_cfg)
    bad = dict(mt)
    bad["model.layers.0.mlp.experts.gate_up_proj"] = bad["model.layers.0.mlp.experts.gate_up_proj"][:, :20]
    with pytest.raises(ValueError, match="gate_up_proj'\\] must have shape \\(5, 24, 16\\)"):
        cv.moetron_to_hf(bad, cfg, hf_cfg)
    with pytest.raises(ValueError, match="src_format must be one of"):
        cv.convert("a", "b", src_format="gguf")
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="dst must be a new or empty folder"):
        cv.convert(str(hf_dirs["qwen3_moe"]), str(tmp_path / "full"))
    with pytest.raises(ValueError, match="src must be a Hugging Face model folder with config.json"):
        cv.convert(str(tmp_path / "full"), str(tmp_path / "out"))


def test_cli(hf_dirs, tmp_path, capsys):
    from moetron.cli import main

    assert main(["convert", str(hf_dirs["mixtral"]), str(tmp_path / "mt")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", "--from", "moetron", "--to", "hf", str(tmp_path / "mt"), str(tmp_path / "hf")]) == 0
    assert_bit_identical(_tensors(hf_dirs["mixtral"]), _tensors(tmp_path / "hf"))
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "moetron convert: error: src must be a Hugging Face model folder" in capsys.readouterr().err
