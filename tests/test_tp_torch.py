"""PyTorch tensor parallelism (bloomlm.torch.tensor_parallel) in real torchrun jobs on gloo.

One `torchrun --nproc-per-node N` job per world size (2 and 4) runs every check on every rank
(tests/tp_torch_worker.py) and hands back what it measured; the tests here assert on it. Checked:
each class's outputs (and hidden states, gathered attentions, a head mask) equal the
single-process model at the fp32 rule (1e-5), the same on every rank; a cache round trip; the ids
of every decoding strategy (greedy, seeded sampling, beam, beam sampling, group and constrained
beam search, contrastive search, prompt lookup, assisted decoding, guidance) equal to one process
and the same on every rank; head counts 16, 6 and 28 (6 at N = 4 is refused); a sharded
checkpoint, saved back from rank 0; each rank's parameter bytes are the plan's (1/N of the split
weights plus the replicated LayerNorms and biases); meshes the user made; bad input, and what a
split model refuses (compile=, save_pretrained without the gathered weights, resizing,
quantizing, the serving engine); the README's torchrun example. Only the `bloomlm generate
--tensor-parallel` test starts a job of its own (it tests the launcher).
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


@pytest.fixture(scope="module")
def jobs() -> dict[int, list[dict]]:
    """{world size: every rank's results}: one torchrun job per world size, run on first use."""
    return {}


def job_results(jobs: dict, checkpoints: dict, world: int) -> list[dict]:
    if world not in jobs:
        jobs[world] = run_job(checkpoints, world)
    return jobs[world]


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def ranks(request, checkpoints, jobs) -> list[dict]:
    """Every rank's results of the torchrun job of `request.param` processes."""
    return job_results(jobs, checkpoints, request.param)


def run_job(checkpoints: dict, world: int) -> list[dict]:
    root = pathlib.Path(checkpoints["root"])
    spec, out = root / f"spec{world}.json", root / f"out{world}.json"
    # The README's example is written for 2 processes (bloomlm-tiny has 6 heads).
    example = readme_example(0) if world == 2 else None
    spec.write_text(json.dumps({**checkpoints, "world_size": world, "readme_example": example}))
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


STRATEGIES = (  # generate's other loops (tp_torch_worker.check_strategies), each on 16 heads
    "beam_sample",
    "group_beam",
    "constrained",
    "contrastive",
    "prompt_lookup",
    "assisted",
    "assisted_by_itself",
    "guidance",
    "samples_per_prompt",
    "generators",
)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_decoding_strategy_equals_one_process(ranks, strategy):
    """[ids equal to one process, the same ids on every rank] for each rank."""
    for rank in ranks:
        assert set(rank["decoding"]["16"]["strategies"]) == set(STRATEGIES)
        assert rank["decoding"]["16"]["strategies"][strategy] == [True, True]


def test_sharded_checkpoint_loads_a_share(ranks):
    world = ranks[0]["world_size"]
    config = BloomConfig(**config_for("16"))
    expected = 4 * plan_summary(config, world, bytes_per_value=4)["parameters_per_device"]
    for rank in ranks:
        loading = rank["loading"]
        assert loading["parameter_bytes"] == expected
        assert loading["qkv_local_shape"] == [3 * 128 // world, 128]
        assert loading["gathered_state_dict_equal"]  # full_state_dict, e.g. to save on rank 0
        assert loading["saved_on_rank_0_equal"]  # save_pretrained(state_dict=full_state_dict)
        assert loading["storage_is_the_share"]  # no rank keeps a view of a whole tensor


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


def test_a_split_model_refuses_what_needs_it_whole(ranks):
    """Refused with the way out, instead of failing inside DTensor (or, for the serving engine,
    ranks that draw apart)."""
    for index, rank in enumerate(ranks):
        errors = rank["errors"]
        assert errors["compile"] == "compile= cannot be combined with tp_plan= or device_mesh="
        assert "full_state_dict(model)" in errors["save"]
        assert "is_main_process=rank == 0" in errors["save"]
        assert "resize it in one process" in errors["resize"]
        assert "quantize cannot be combined with tensor parallelism" in errors["quantize"]
        if index == 0:  # it serves, the others replay its decoder calls
            assert errors["serving"]["equal"], errors["serving"]
        else:
            assert "bloomlm.serving.lockstep.follow(model)" in errors["serving"]


def test_a_mesh_the_user_made(ranks):
    """`device_mesh=`: a 1-D mesh without names, and the "model" axis of a 2 x N/2 mesh."""
    world = ranks[0]["world_size"]
    for rank in ranks:
        meshes = rank["meshes"]
        assert set(meshes) == {"1-D", "2-D"}
        assert meshes["1-D"]["ranks"] == world
        assert meshes["2-D"]["ranks"] == world // 2
        assert max(mesh["logits_diff"] for mesh in meshes.values()) <= FP32_TOL


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


def test_generate_command_splits_the_model(capsys, tmp_path):
    """`bloomlm generate --tensor-parallel 2` starts two processes (torch.distributed.run's API) and
    prints what one process prints (where the prompts run on the serving engine): two greedy
    prompts and a sampled one with its seed, the embedded 6-head model."""
    requests = [
        {"prompt": "A list is", "temperature": 0},
        {"prompt": "The weather today", "temperature": 0},
        {"prompt": "Once upon a time", "temperature": 0.9, "seed": 7},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(request) + "\n" for request in requests))
    options = ["--file", str(prompts), "--max-new-tokens", "8", "--jsonl"]
    assert main(["generate", *options]) == 0
    one_process = capsys.readouterr().out
    command = [sys.executable, "-m", "bloomlm", "generate", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "--tensor-parallel", "2"], capture_output=True, text=True, timeout=TIMEOUT,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == one_process
    assert len(one_process.splitlines()) == 3


def test_generate_command_refuses_a_split_of_heads(capsys):
    assert main(["generate", "A list is", "--tensor-parallel", "4"]) == 1
    assert "tensor-parallel size 4 does not divide n_head 6" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--quantize", "int8"], ["--dtype", "int8"]])
def test_generate_command_refuses_quantize_before_it_starts(capsys, option):
    assert main(["generate", "A list is", "--tensor-parallel", "2", *option]) == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel splits float weights: drop --quantize / --dtype int8" in err


def readme_example(index: int) -> str:
    """The `index`-th python block of the README's "Larger than one device" section."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Larger than one device", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n")[index + 1].split("```", 1)[0]


def test_readme_torchrun_example_works_as_written(checkpoints, jobs):
    """Run as written inside the 2-process job (no job of its own)."""
    first, *others = (rank["readme_example"] for rank in job_results(jobs, checkpoints, 2))
    texts = ast.literal_eval(first.strip())  # rank 0 prints the decoded texts
    assert len(texts) == 2 and texts[0].startswith("A list is") and len(texts[0]) > 30
    assert others == [""]  # the other rank prints nothing
