"""PyTorch tensor parallelism (bloomlm.torch.tensor_parallel) in real torchrun jobs on gloo.

One `torchrun --nproc-per-node N` job per world size (2 and 4) runs every check on every rank
(tests/tp_torch_worker.py) and hands back what it measured; the tests here assert on it. Checked:
each class's outputs (and hidden states, gathered attentions, a head mask) equal the
single-process model at the fp32 rule (1e-5), the same on every rank; a cache round trip; greedy
and beam ids equal to one process, seeded sampling the same on every rank; head counts 16, 6 and
28 (6 at N = 4 is refused); a sharded checkpoint; each rank's parameter bytes are the plan's
(1/N of the split weights plus the replicated LayerNorms and biases); bad input.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import bloomlm
from bloomlm import BloomConfig
from bloomlm.cli import main
from bloomlm.sharding_plan import plan_summary
from conftest import BOS_ID, EOS_ID, PAD_ID, make_inputs, randomize_

FP32_TOL = 1e-5  # SPEC: PyTorch fp32
WORKER = pathlib.Path(__file__).parent / "tp_torch_worker.py"
SPECIAL = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
BASE = dict(vocab_size=256, n_layer=2, **SPECIAL)
HEADS = {  # n_head: hidden size (head_dim 8, 8 and 4)
    "16": 128,
    "6": 48,
    "28": 112,
    "1": 8,
}
ARCHS = (
    "BloomModel",
    "BloomForCausalLM",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
)
TIMEOUT = 300  # seconds for one torchrun job (about 30 s for 4 ranks on 2 idle cores)


def config_for(n_head: str) -> dict:
    return dict(BASE, n_head=int(n_head), hidden_size=HEADS[n_head])


def save_random(folder: pathlib.Path, arch: str, n_head: str = "16", **save) -> str:
    model = getattr(bloomlm, arch)(BloomConfig(**config_for(n_head)))
    randomize_(model)
    model.save_pretrained(folder, **save)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp-torch")
    archs = {arch: save_random(root / arch, arch) for arch in ARCHS}
    heads = {n: save_random(root / f"heads{n}", "BloomForCausalLM", n) for n in HEADS}
    input_ids, attention_mask = make_inputs(BASE["vocab_size"], "left", batch=3, seq=7)
    return {
        "archs": archs,
        "heads": heads,
        "sharded": save_random(root / "sharded", "BloomForCausalLM", max_shard_size="60KB"),
        "bin": save_random(root / "bin", "BloomForCausalLM", safe_serialization=False),
        "input_ids": input_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "root": str(root),
    }


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def ranks(request, checkpoints) -> list[dict]:
    """Every rank's results of one torchrun job of `request.param` processes."""
    world = request.param
    root = pathlib.Path(checkpoints["root"])
    spec, out = root / f"spec{world}.json", root / f"out{world}.json"
    spec.write_text(json.dumps({**checkpoints, "world_size": world}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(world), str(WORKER), str(spec), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results) == world
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_equal_one_process(ranks, arch):
    for rank in ranks:
        run = rank["outputs"][arch]
        assert max(run["diffs"].values()) <= FP32_TOL, run["diffs"]
        assert run["same_on_every_rank"]
        batch, seq = 3, 7
        assert run["attention_shape"] == [batch, 16, seq, seq]  # gathered over the ranks' heads


@pytest.mark.parametrize("arch", ARCHS)
def test_each_rank_holds_its_share(ranks, arch):
    world = ranks[0]["world_size"]
    config = BloomConfig(**config_for("16"))
    plan = plan_summary(config, world, bytes_per_value=4, architecture=arch)
    whole = plan_summary(config, 1, bytes_per_value=4, architecture=arch)
    for rank in ranks:
        assert rank["outputs"][arch]["parameter_bytes"] == 4 * plan["parameters_per_device"]
    replicated = 4 * plan["replicated_parameters"]
    assert 4 * plan["parameters_per_device"] == (
        (4 * whole["parameters_per_device"] - replicated) // world + replicated
    )


@pytest.mark.parametrize("n_head", ["16", "6", "28"])
def test_decoding_equals_one_process(ranks, n_head):
    world = ranks[0]["world_size"]
    for rank in ranks:
        if int(n_head) % world:  # 6 heads over 4 ranks: refused, saying what divides what
            assert "tensor-parallel size 4 does not divide n_head 6" in rank["heads"][n_head]
            assert n_head not in rank["decoding"]
            continue
        run = rank["decoding"][n_head]
        assert run["local_heads"] == int(n_head) // world
        assert run["logits_diff"] <= FP32_TOL
        assert run["cached_step_diff"] <= FP32_TOL
        head_dim = HEADS[n_head] // int(n_head)
        assert run["cache_key_shape"] == [3 * int(n_head) // world, head_dim, 7]  # local heads
        assert run["cache_value_shape"] == [3 * int(n_head) // world, 7, head_dim]
        assert run["greedy_equal"] and run["greedy_same_on_every_rank"]
        if n_head == "16":  # the other strategies once
            assert run["sampled_same_on_every_rank"] and run["sampled_equal"]
            assert run["beam_equal"]
        assert len({t for row in run["greedy_new_tokens"] for t in row}) > 4  # not degenerate


def test_sharded_checkpoint_loads_a_share(ranks):
    world = ranks[0]["world_size"]
    config = BloomConfig(**config_for("16"))
    expected = 4 * plan_summary(config, world, bytes_per_value=4)["parameters_per_device"]
    for rank in ranks:
        loading = rank["loading"]
        assert loading["parameter_bytes"] == expected
        assert loading["qkv_local_shape"] == [3 * 128 // world, 128]
        assert loading["gathered_state_dict_equal"]  # full_state_dict, e.g. to save on rank 0


def test_a_missing_head_is_initialised_alike_on_every_rank(ranks):
    for rank in ranks:
        assert rank["missing_head"] == {
            "missing_keys": ["score.weight"],
            "same_on_every_rank": True,
        }


def test_bad_input_says_what_is_wrong(ranks):
    world = ranks[0]["world_size"]
    for rank in ranks:
        errors = rank["errors"]
        assert "bloomlm convert SRC DST --to safetensors" in errors["bin"]
        assert "tp_plan must be 'auto'" in errors["bad_plan"]
        assert f"tensor-parallel size {world} is larger than n_head 1" in errors["too_many_ranks"]
        assert "no 'model' dimension" in errors["no_model_axis"]
        assert "('data', 'tp')" in errors["no_model_axis"]
        assert errors["model_axis_of_2d_mesh_ranks"] == world // 2


# -- in this process: no job needed ----------------------------------------------------------------


def test_auto_plan_outside_a_job_says_how_to_start_one(checkpoints, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="torchrun --nproc-per-node N"):
        bloomlm.BloomForCausalLM.from_pretrained(checkpoints["heads"]["16"], tp_plan="auto")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tp_plan="auto", quantize="int8"), "quantize= cannot be combined with tp_plan="),
        (dict(device_mesh=("model",)), "device_mesh must be a torch DeviceMesh"),
        (dict(tp_plan={"h": "colwise"}), "tp_plan must be 'auto'"),
    ],
)
def test_bad_tensor_parallel_arguments(checkpoints, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bloomlm.BloomForCausalLM.from_pretrained(checkpoints["heads"]["16"], **kwargs)


# -- the command line ------------------------------------------------------------------------------


def test_generate_command_splits_the_model(capsys):
    """`bloomlm generate --tensor-parallel 2` starts two processes (torch.distributed.run's API) and
    prints what one process prints: greedy, two prompts, the embedded 6-head model."""
    prompts = ["A list is", "The weather today"]
    options = ["--temperature", "0", "--max-new-tokens", "8", "--jsonl"]
    assert main(["generate", *prompts, *options]) == 0
    one_process = capsys.readouterr().out
    command = [sys.executable, "-m", "bloomlm", "generate", *prompts, *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "--tensor-parallel", "2"], capture_output=True, text=True, timeout=TIMEOUT,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == one_process
    assert len(one_process.splitlines()) == 2


def test_generate_command_refuses_a_split_of_heads(capsys):
    assert main(["generate", "A list is", "--tensor-parallel", "4"]) == 1
    assert "tensor-parallel size 4 does not divide n_head 6" in capsys.readouterr().err


def readme_example(index: int) -> str:
    """The `index`-th python block of the README's "Larger than one device" section."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Larger than one device", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n")[index + 1].split("```", 1)[0]


def test_readme_torchrun_example_works_as_written(tmp_path):
    script = tmp_path / "tp_generate.py"
    script.write_text(readme_example(0))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    texts = ast.literal_eval(done.stdout.strip())  # rank 0 prints the decoded texts
    assert len(texts) == 2 and texts[0].startswith("A list is") and len(texts[0]) > 30
