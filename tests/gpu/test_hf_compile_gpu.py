"""A transformers model with the "moetron" experts under ``torch.compile(mode="reduce-overhead", fullgraph=True)``
on CUDA: the experts are one custom op inside the Inductor graph, the graph is replayed from a CUDA graph, and each
replay with new tokens (so new routing and new group sizes, read on the device) gives the eager model's logits."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")
moe_integration = pytest.importorskip("transformers.integrations.moe")
if not hasattr(moe_integration, "ExpertsInterface"):
    pytest.skip("transformers has no experts registry", allow_module_level=True)

from moetron.integrations import hf  # noqa: E402,F401  (registers "moetron")
from tests.integrations._hf_models import VOCAB, tiny_model  # noqa: E402


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_cuda_graph_replays_follow_new_routing(arch):
    torch._dynamo.reset()
    model = tiny_model(arch, impl="moetron").cuda().eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for step in range(5):  # warm-up, recording, then replays with fresh tokens each time
            ids = torch.randint(0, VOCAB, (4, 1), generator=gen).cuda()
            expected = model(input_ids=ids).logits
            out = compiled(input_ids=ids).logits.clone()
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=f"{arch} step {step}")
    torch._dynamo.reset()
