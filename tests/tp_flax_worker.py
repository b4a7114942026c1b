"""The multi-device half of test_tp_flax.py: run once, in a fresh process with 8 simulated CPU
devices (the rest of the suite keeps its single device), it loads each checkpoint on several
meshes and on one device, runs the README's mesh example, and writes what it measured as JSON.
The test module asserts on it.

    python tests/tp_flax_worker.py SPEC.json OUT.json
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import bloomlm  # noqa: E402
from bloomlm.flax.sharding import bytes_per_device  # noqa: E402

MAIN_FIELD = {
    "FlaxBloomModel": "last_hidden_state",
    "FlaxBloomForCausalLM": "logits",
    "FlaxBloomForSequenceClassification": "logits",
    "FlaxBloomForTokenClassification": "logits",
    "FlaxBloomForQuestionAnswering": "start_logits",
}


def mesh_of(shape: list[int], names=("data", "model")) -> Mesh:
    return Mesh(np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape), names)


def relative_diff(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


def leaf_report(tree) -> dict:
    """{path: [spec, shard shape of device 0, global shape, devices holding the leaf]}."""
    report = {}
    for path, array in flatten_dict(tree, sep="/").items():
        shard = array.addressable_shards[0]
        spec = [None if a is None else str(a) for a in array.sharding.spec]
        report[path] = [spec, list(shard.data.shape), list(array.shape), len(array.devices())]
    return report


def cached_logits(model, ids, mask):
    """Prompt into a cache, then one more token: the logits of that step."""
    batch, length = ids.shape
    cache = model.init_cache(batch, length + 1)
    out = model(ids, mask, past_key_values=cache)
    next_ids = np.argmax(np.asarray(out.logits[:, -1]), axis=-1)[:, None]
    full_mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)
    step = model(next_ids, full_mask, past_key_values=out.past_key_values)
    return step.logits[:, -1], out.past_key_values


def check_causal_lm(
    folder: str, mesh_shape: list[int], scan: bool, ids, mask, ref, beams: bool = False
) -> dict:
    model = bloomlm.FlaxBloomForCausalLM.from_pretrained(
        folder, mesh=mesh_of(mesh_shape), scan_layers=scan
    )
    results = {}
    if beams:  # beam search reorders the split cache's rows every step
        ours = model.generate(ids, mask, max_new_tokens=6, num_beams=2).sequences
        theirs = ref.generate(ids, mask, max_new_tokens=6, num_beams=2).sequences
        results["beam_equal"] = bool((np.asarray(ours) == np.asarray(theirs)).all())
    logits = model(ids, mask).logits
    step_logits, cache = cached_logits(model, ids, mask)
    ref_step_logits, _ = cached_logits(ref, ids, mask)
    greedy = model.generate(ids, mask, max_new_tokens=6).sequences
    sampled = model.generate(ids, mask, max_new_tokens=6, do_sample=True, top_k=0,
                             prng_key=jax.random.PRNGKey(7)).sequences  # fmt: skip
    ref_greedy = ref.generate(ids, mask, max_new_tokens=6).sequences
    ref_sampled = ref.generate(ids, mask, max_new_tokens=6, do_sample=True, top_k=0,
                               prng_key=jax.random.PRNGKey(7)).sequences  # fmt: skip
    return results | {
        "logits_diff": relative_diff(logits, ref(ids, mask).logits),
        "cached_step_diff": relative_diff(step_logits, ref_step_logits),
        "greedy_equal": bool((np.asarray(greedy) == np.asarray(ref_greedy)).all()),
        "greedy_new_tokens": np.asarray(greedy)[:, ids.shape[1] :].tolist(),
        "sampled_equal": bool((np.asarray(sampled) == np.asarray(ref_sampled)).all()),
        "params": leaf_report(model.params),
        "cache": leaf_report(cache),
        "bytes_per_device": sorted(bytes_per_device(model.params).values()),
    }


def check_head(folder: str, class_name: str, mesh_shape: list[int], ids, mask) -> dict:
    model_class = getattr(bloomlm, class_name)
    ref = model_class.from_pretrained(folder)
    model = model_class.from_pretrained(folder, mesh=mesh_of(mesh_shape))
    field = MAIN_FIELD[class_name]
    return {
        "diff": relative_diff(getattr(model(ids, mask), field), getattr(ref(ids, mask), field)),
        "params": leaf_report(model.params),
        "bytes_per_device": sorted(bytes_per_device(model.params).values()),
    }


def error_of(call) -> str:
    try:
        call()
    except ValueError as err:
        return str(err)
    return "no error"


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as file:
        spec = json.load(file)
    ids = np.asarray(spec["input_ids"], np.int32)
    mask = np.asarray(spec["attention_mask"], np.int32)
    folders = spec["folders"]
    ref = bloomlm.FlaxBloomForCausalLM.from_pretrained(folders["FlaxBloomForCausalLM"])
    results: dict = {"devices": len(jax.devices()), "causal_lm": {}, "heads": {}}
    for mesh_shape, scan in spec["causal_lm_runs"]:
        key = f"{mesh_shape[0]}x{mesh_shape[1]}" + (" scan" if scan else "")
        folder = folders["FlaxBloomForCausalLM"]
        beams = key == "2x4"  # once: the 2-D mesh, rows and heads both split
        results["causal_lm"][key] = check_causal_lm(folder, mesh_shape, scan, ids, mask, ref, beams)
    for class_name, folder in folders.items():
        if class_name != "FlaxBloomForCausalLM":
            results["heads"][class_name] = check_head(folder, class_name, [2, 4], ids, mask)
    causal_lm = bloomlm.FlaxBloomForCausalLM
    results["errors"] = {
        "no_model_axis": error_of(lambda: causal_lm.from_pretrained(
            folders["FlaxBloomForCausalLM"], mesh=mesh_of([2, 4], ("data", "tp")))),
        "heads_not_divisible": error_of(lambda: causal_lm.from_pretrained(
            spec["six_heads"], mesh=mesh_of([1, 4]))),
        "more_ranks_than_heads": error_of(lambda: causal_lm.from_pretrained(
            spec["four_heads"], mesh=mesh_of([1, 8]))),
    }  # fmt: skip
    results["readme_example"] = run_readme_example(spec["readme_example"])
    with open(out_path, "w") as file:
        json.dump(results, file)


def run_readme_example(code: str) -> str:
    """The README's mesh example, as written, on this process's 8 devices: what it prints."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    return printed.getvalue()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
