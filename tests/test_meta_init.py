"""Building on the meta device without touching other threads, and the int8 tie without patching.

`from_pretrained` builds the model on `meta` with torch.nn.init's functions skipped for meta tensors
(`pretrained._SkipInitOnMeta`, a torch function mode, which torch keeps per thread). These tests pin
what that must and must not do: another thread's nn.init calls run for real while a load is inside
that construction, and a cold load never imports torch's compiler stack (what the skip is for).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import torch
from torch import nn

from bloomlm import BloomConfig
from bloomlm.torch.model import BloomForCausalLM
from bloomlm.torch.quantize import Int8Embedding, Int8WeightOnlyLinear, quantize_

TINY = dict(vocab_size=64, hidden_size=16, n_layer=2, n_head=4)


def _initialised_elsewhere(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What nn.init's random initialisers write with a private generator: comparable exactly."""
    generator = torch.Generator().manual_seed(seed)
    uniform = nn.init.kaiming_uniform_(torch.zeros(32, 32), a=math.sqrt(5), generator=generator)
    normal = nn.init.normal_(torch.zeros(32, 32), std=0.02, generator=generator)
    return uniform, normal


def test_meta_construction_leaves_other_threads_init_alone(tmp_path):
    """Thread A pauses inside from_pretrained's meta construction; meanwhile thread B's nn.init
    calls must write real values, and B's factory calls must not land on the meta device."""
    BloomForCausalLM(BloomConfig(**TINY)).save_pretrained(tmp_path)
    inside, released = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    class PausingCausalLM(BloomForCausalLM):
        def __init__(self, config: BloomConfig):
            super().__init__(config)
            results["built_on"] = self.lm_head.weight.device.type
            inside.set()  # still inside from_pretrained's `with torch.device("meta"), ...` block
            released.wait(timeout=60)

    def load() -> None:
        try:
            results["loaded"] = PausingCausalLM.from_pretrained(tmp_path)
        finally:
            inside.set()

    def initialise() -> None:
        try:
            assert inside.wait(timeout=60), "the loading thread never reached the construction"
            results["values"] = _initialised_elsewhere(seed=7)
            results["linear"] = nn.Linear(8, 8)
        finally:
            released.set()

    threads = [threading.Thread(target=load), threading.Thread(target=initialise)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results.get("built_on") == "meta", "the load did not build its model on meta"
    assert "loaded" in results and "values" in results, f"a thread failed: {sorted(results)}"

    expected_uniform, expected_normal = _initialised_elsewhere(seed=7)
    uniform, normal = results["values"]
    torch.testing.assert_close(uniform, expected_uniform, rtol=0, atol=0)
    torch.testing.assert_close(normal, expected_normal, rtol=0, atol=0)
    assert uniform.abs().sum() > 0 and normal.abs().sum() > 0
    linear = results["linear"]
    assert linear.weight.device.type == "cpu", "the other thread's construction landed on meta"
    bound = 1 / math.sqrt(8)
    assert 0 < linear.weight.abs().max() <= bound, "nn.Linear's kaiming init did not run"

    loaded = results["loaded"]
    reference = BloomForCausalLM.from_pretrained(tmp_path)
    theirs = reference.state_dict()
    assert list(loaded.state_dict()) == list(theirs)
    for name, ours in loaded.state_dict().items():
        torch.testing.assert_close(ours, theirs[name], rtol=0, atol=0, msg=name)


def test_cold_load_does_not_import_the_compiler_stack():
    """In a fresh process, loading the embedded model never imports torch._dynamo: nn.init on meta
    tensors would, through torch's reference implementations (~2 s of a cold load)."""
    import bloomlm

    package_root = os.path.dirname(os.path.dirname(bloomlm.__file__))
    path = os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    script = (
        "import sys\n"
        "from bloomlm import BloomForCausalLM\n"
        "assert 'torch._dynamo' not in sys.modules, 'imported before the load'\n"
        "BloomForCausalLM.from_pretrained('bloomlm-tiny')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False", "the load imported torch._dynamo"


def test_int8_tie_is_the_models_own_tie_weights():
    """quantize_ patches no method on the instance; the class's tie_weights ties int8 pairs."""
    model = BloomForCausalLM(BloomConfig(**TINY))
    quantize_(model, "int8-weight-only")
    assert "tie_weights" not in vars(model), "quantize_ patched tie_weights on the instance"
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, Int8Embedding) and isinstance(head, Int8WeightOnlyLinear)
    head.weight, head.weight_scale = head.weight.clone(), head.weight_scale.clone()  # untie
    model.tie_weights()
    assert head.weight is embedding.weight and head.weight_scale is embedding.weight_scale
