"""The Flax model on jax.sharding meshes (bloomlm.flax.sharding).

The multi-device checks run once per module in a subprocess with 8 simulated CPU devices
(tests/tp_flax_worker.py; this process keeps its one device): meshes 1x8, 2x4 and 8x1 give the
single-device outputs, cached steps and `generate` ids (greedy and seeded sampling) at the Flax fp32
rule (1e-4), every parameter's shard is the shape the framework-free plan says, the cache is split
by heads and rows, and each device holds 1/N of the split weights plus the replicated ones. The
176B shapes are checked here with `jax.eval_shape` on abstract 8- and 16-way meshes.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import AbstractMesh

import bloomlm
from bloomlm import BloomConfig
from bloomlm.flax import model as modules
from bloomlm.flax import sharding, weights
from bloomlm.sharding_plan import plan_summary, tensor_parallel_plan
from conftest import BOS_ID, EOS_ID, PAD_ID, make_inputs, randomize_
from test_tp_torch import readme_example

FLAX_TOL = 1e-4  # SPEC: Flax fp32
WORKER = pathlib.Path(__file__).parent / "tp_flax_worker.py"
BLOOM_176B = pathlib.Path(__file__).parent / "fixtures" / "bloom-176b"
SPECIAL = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
TP_CONFIG = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=8, **SPECIAL)
ARCHS = (
    "BloomModel",
    "BloomForCausalLM",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
)
MESHES = ("1x8", "2x4", "8x1", "2x4 scan")


def save_random(folder: pathlib.Path, arch: str, **config) -> str:
    model = getattr(bloomlm, arch)(BloomConfig(**config))
    randomize_(model)
    # The causal LM is saved in shards: each device's slices are read across shard files.
    shard_size = "40KB" if arch == "BloomForCausalLM" else "5GB"
    model.save_pretrained(folder, max_shard_size=shard_size)
    return str(folder)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp-flax")
    folders = {"Flax" + arch: save_random(root / arch, arch, **TP_CONFIG) for arch in ARCHS}
    assert len(list((root / "BloomForCausalLM").glob("model-*.safetensors"))) > 1
    six = dict(TP_CONFIG, hidden_size=48, n_head=6)
    four = dict(TP_CONFIG, hidden_size=32, n_head=4)
    input_ids, attention_mask = make_inputs(TP_CONFIG["vocab_size"], "left", batch=8, seq=6)
    spec = {
        "folders": folders,
        "six_heads": save_random(root / "six", "BloomForCausalLM", **six),
        "four_heads": save_random(root / "four", "BloomForCausalLM", **four),
        "input_ids": input_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "causal_lm_runs": [[[1, 8], False], [[2, 4], False], [[8, 1], False], [[2, 4], True]],
        "readme_example": readme_example(1),
    }
    (root / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, str(WORKER), str(root / "spec.json"), str(root / "out.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "out.json").read_text())


def model_ways(mesh: str) -> int:
    return int(mesh.split()[0].split("x")[1])


def expected_local_shapes(arch: str, ways: int, scan: bool) -> dict[str, tuple]:
    """{Flax path: shape of one device's shard} from the framework-free plan (torch layout)."""
    config = BloomConfig(**TP_CONFIG)
    plan = {s.name: s for s in tensor_parallel_plan(config, ways, arch)}
    shapes = {}
    for name, path, transpose in weights.name_table(config, with_prefix=arch != "BloomModel"):
        if name not in plan or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # a tied LM head is the embedding matrix: no Flax parameter of its own
        local = plan[name].local_shape
        local = tuple(reversed(local)) if transpose else local
        joined = "/".join(path)
        if scan and "h/0/" in joined:
            shapes[joined.replace("h/0/", "h/")] = (config.n_layer, *local)
        elif not (scan and "/h/" in f"/{joined}"):
            shapes[joined] = local
    return shapes


def test_runs_on_eight_simulated_devices(results):
    assert results["devices"] == 8
    assert jax.device_count() == 1  # this process keeps its single device


@pytest.mark.parametrize("mesh", MESHES)
def test_causal_lm_equals_the_single_device_model(results, mesh):
    run = results["causal_lm"][mesh]
    assert run["logits_diff"] <= FLAX_TOL
    assert run["cached_step_diff"] <= FLAX_TOL
    assert run["greedy_equal"] and run["sampled_equal"]
    new_tokens = np.array(run["greedy_new_tokens"])
    assert len(np.unique(new_tokens)) > 4  # a model that says something, so equality means much
    if mesh == "2x4":
        assert run["beam_equal"]  # once: beam search on rows and heads both split


@pytest.mark.parametrize("mesh", MESHES)
def test_every_parameter_is_split_as_the_plan_says(results, mesh):
    run = results["causal_lm"][mesh]
    ways, scan = model_ways(mesh), mesh.endswith("scan")
    expected = expected_local_shapes("BloomForCausalLM", ways, scan)
    assert set(run["params"]) == set(expected)
    abstract = AbstractMesh(tuple(int(n) for n in mesh.split()[0].split("x")), ("data", "model"))
    for path, (spec, local_shape, shape, n_devices) in run["params"].items():
        assert tuple(local_shape) == expected[path], path
        rule = sharding.spec_for(path, tuple(shape), abstract)
        assert spec == [None if a is None else str(a) for a in rule], path
        assert n_devices == 8


@pytest.mark.parametrize("mesh", MESHES)
def test_the_cache_is_split_by_heads_and_rows(results, mesh):
    data, ways = (int(n) for n in mesh.split()[0].split("x"))
    for path, (_, local_shape, shape, _) in results["causal_lm"][mesh]["cache"].items():
        if path.endswith("cache_index"):
            continue
        batch_axis, head_axis = (1, 3) if mesh.endswith("scan") else (0, 2)
        assert local_shape[head_axis] == shape[head_axis] // ways, path
        assert local_shape[batch_axis] == shape[batch_axis] // data, path  # 8 rows divide


@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_holds_its_share(results, mesh):
    ways = model_ways(mesh)
    config = BloomConfig(**TP_CONFIG)
    expected = plan_summary(config, ways, bytes_per_value=4)["parameters_per_device"] * 4
    per_device = results["causal_lm"][mesh]["bytes_per_device"]
    assert per_device == [expected] * 8
    total = 4 * sum(int(np.prod(s)) for s in flatten_shapes(config))
    if ways > 1:  # 1/N of the weights plus the replicated LayerNorms and biases
        assert total / ways < expected < total / ways * 1.1


def flatten_shapes(config: BloomConfig) -> list[tuple]:
    model = bloomlm.FlaxBloomForCausalLM(config, _do_init=False)
    return [leaf.shape for leaf in flatten_dict(model.params_shape_tree).values()]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "BloomForCausalLM"])
def test_heads_equal_the_single_device_model(results, arch):
    run = results["heads"]["Flax" + arch]
    assert run["diff"] <= FLAX_TOL
    expected = expected_local_shapes(arch, 4, scan=False)
    assert {p: tuple(v[1]) for p, v in run["params"].items()} == expected
    per_device = plan_summary(BloomConfig(**TP_CONFIG), 4, 4, architecture=arch)
    assert run["bytes_per_device"] == [per_device["parameters_per_device"] * 4] * 8


def test_bad_meshes_say_what_divides_what(results):
    errors = results["errors"]
    assert "no 'model' axis" in errors["no_model_axis"]
    assert "('data', 'tp')" in errors["no_model_axis"]
    assert "tensor-parallel size 4 does not divide n_head 6" in errors["heads_not_divisible"]
    assert "tensor-parallel size 8 is larger than n_head 4" in errors["more_ranks_than_heads"]


def test_check_mesh_refuses_other_objects():
    with pytest.raises(ValueError, match="must be a jax.sharding.Mesh"):
        sharding.check_mesh(("data", "model"), BloomConfig(**TP_CONFIG))


# -- the 176B shapes, abstractly -------------------------------------------------------------------


@pytest.mark.parametrize("ways, scan", [(8, True), (8, False), (16, True)])
def test_176b_every_parameter_gets_a_valid_sharding(ways, scan):
    """`jax.eval_shape` of the parameters' init under the rules' shardings on an abstract 1 x N
    mesh: every shard shape is valid (NamedSharding.shard_shape raises otherwise) and is the
    plan's local shape."""
    config = BloomConfig.from_pretrained(BLOOM_176B)
    module = modules.FlaxBloomForCausalLMModule(config, jnp.bfloat16, jnp.bfloat16, scan)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)

    def init(i):
        return module.init(jax.random.PRNGKey(0), i, i)["params"]

    mesh = AbstractMesh((1, ways), ("data", "model"))
    sharding.check_mesh(mesh, config)
    shardings = sharding.shardings_for(jax.eval_shape(init, ids), mesh)
    params = jax.eval_shape(jax.jit(init, out_shardings=shardings), ids)
    plan = {s.name: s for s in tensor_parallel_plan(config, ways)}
    table = {"/".join(p): (n, t) for n, p, t in weights.name_table(config, with_prefix=True)}
    checked = 0
    for path, leaf in flatten_dict(params, sep="/").items():
        local = leaf.sharding.shard_shape(leaf.shape)
        torch_name, transpose = table[path.replace("/h/", "/h/0/") if scan else path]
        want = plan[torch_name].local_shape
        want = tuple(reversed(want)) if transpose else want
        assert local == ((config.n_layer, *want) if scan and "/h/" in path else want), path
        checked += 1
    assert checked == 5 + 12 * (1 if scan else 70)  # 3 embedding and 2 ln_f leaves, 12 per block


def test_176b_cache_sharding_is_valid():
    config = BloomConfig.from_pretrained(BLOOM_176B)
    cache = jax.eval_shape(
        lambda: modules.make_cache(config, 4, 2048, jnp.bfloat16, True, is_head=True)
    )
    mesh = AbstractMesh((2, 8), ("data", "model"))
    for path, leaf in flatten_dict(cache, sep="/").items():
        spec = sharding.spec_for(path, leaf.shape, mesh, sharding.CACHE_RULES)
        local = jax.sharding.NamedSharding(mesh, spec).shard_shape(leaf.shape)
        if path.endswith("cache_index"):
            assert local == leaf.shape
        else:  # [L, B, S, H, D]: rows over data, heads over model
            assert local == (70, 2, 2048, 14, 128)


def test_partition_rules_cover_only_known_paths():
    """Each rule that splits something matches a parameter of the 8-head model (no dead rules)."""
    config = BloomConfig(**TP_CONFIG, tie_word_embeddings=False)
    model = bloomlm.FlaxBloomForCausalLM(config, _do_init=False)
    paths = list(flatten_dict(model.params_shape_tree, sep="/"))
    for pattern, spec in sharding.PARTITION_RULES[:-1]:
        assert any(re.fullmatch(pattern, p) for p in paths), pattern
        assert "model" in tuple(spec)


def test_readme_mesh_example_works_as_written(results):
    """Run as written in the worker's process with 8 simulated devices."""
    lines = results["readme_example"].strip().splitlines()
    assert lines[0].startswith("A list is") and lines[-1] == "P(None, 'model')"


def test_a_device_reads_only_its_slice(tmp_path, monkeypatch):
    """`CheckpointSlice.read(index)` is `param[index]` in Flax's layout (a kernel is read as its
    torch slice, transposed), straight from the (sharded) files and never more than the slice."""
    folder = save_random(tmp_path, "BloomForCausalLM", **TP_CONFIG)
    whole = flatten_dict(bloomlm.FlaxBloomForCausalLM.from_pretrained(folder).params)
    config = BloomConfig(**TP_CONFIG)
    slices = sharding.read_weight_slices(folder, config, set(whole), None, "unused")
    assert set(slices) == set(whole)  # the tied LM head has no leaf of its own
    reader = next(iter(slices.values())).reader
    read_sizes = []

    def counting_read(name, index=None):
        tensor = type(reader).read(reader, name, index)
        read_sizes.append(tensor.numel())
        return tensor

    monkeypatch.setattr(reader, "read", counting_read)
    for path, leaf in slices.items():
        # the second half of the first axis and the first half of the last, as a device's share
        index = tuple(slice(n // 2, n) if axis == 0 else slice(0, max(1, n // 2))
                      for axis, n in enumerate(leaf.shape))  # fmt: skip
        part = leaf.read(index)
        np.testing.assert_array_equal(part, np.asarray(whole[path])[index], err_msg=str(path))
        assert read_sizes[-1] == part.size < np.asarray(whole[path]).size, path
    assert len(read_sizes) == len(slices)
