"""The PyTorch model, fast path, generation and int8 on a CUDA device. Skipped (and reported as
skipped) on machines without one, such as CI's."""

import pytest
import torch

from bloomlm import BloomConfig, BloomForCausalLM

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = BloomForCausalLM(
        BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, pad_token_id=3)
    )
    path = tmp_path_factory.mktemp("cuda")
    model.save_pretrained(path)
    return path


def test_forward_and_generate_on_cuda_match_cpu(folder):
    cpu = BloomForCausalLM.from_pretrained(folder)
    gpu = BloomForCausalLM.from_pretrained(folder, device_map="cuda")
    assert gpu.device.type == "cuda"
    ids = torch.randint(4, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = cpu(ids, attention_mask=mask).logits
        got = gpu(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    assert (got - expected)[mask.bool()].abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    out_cpu = cpu.generate(ids, attention_mask=mask, max_new_tokens=8)
    out_gpu = gpu.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8).cpu()
    assert torch.equal(out_cpu, out_gpu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_int8_run_on_cuda(folder, dtype):
    ids = torch.randint(4, 128, (2, 10), device="cuda")
    for kwargs in ({"torch_dtype": dtype}, {"torch_dtype": dtype, "quantize": "int8"}):
        model = BloomForCausalLM.from_pretrained(folder, device_map="cuda", **kwargs)
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()
