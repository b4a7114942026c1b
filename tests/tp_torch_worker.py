"""The multi-process half of test_tp_torch.py: one `torchrun --nproc-per-node N` job runs every
check below on each rank (gloo on CPU), and rank 0 writes what was measured as JSON; the test
module asserts on it. Each process builds the single-process model beside the tensor-parallel
one, so "equal" means equal to `from_pretrained(path)` without tp_plan.

    torchrun --standalone --nproc-per-node N tests/tp_torch_worker.py SPEC.json OUT.json
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import bloomlm
import bloomlm.serving
from bloomlm.torch import quantize
from bloomlm.torch.tensor_parallel import full_state_dict, local_parameter_bytes

MAIN_FIELDS = {
    "BloomModel": ("last_hidden_state",),
    "BloomForCausalLM": ("logits",),
    "BloomForSequenceClassification": ("logits",),
    "BloomForTokenClassification": ("logits",),
    "BloomForQuestionAnswering": ("start_logits", "end_logits"),
}


def relative_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max(1, max|ref|): the spec's "same numbers" measure."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / max(1.0, float(ref.abs().max())))


def same_on_every_rank(tensor: torch.Tensor) -> bool:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return all(torch.equal(part, parts[0]) for part in parts)


def peak_rss_mib() -> float:
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def check_outputs(arch: str, folder: str, ids, mask) -> dict:
    """Every main output, hidden states and gathered attentions against one process."""
    model_class = getattr(bloomlm, arch)
    ref = model_class.from_pretrained(folder)
    model = model_class.from_pretrained(folder, tp_plan="auto")
    kwargs = dict(attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        ours, theirs = model(ids, **kwargs), ref(ids, **kwargs)
        ours_att = model(ids, attention_mask=mask, output_attentions=True).attentions
        theirs_att = ref(ids, attention_mask=mask, output_attentions=True).attentions
        head_mask = torch.ones(ref.config.n_head)
        head_mask[1] = 0  # a head of rank 0 when split
        masked = model(ids, attention_mask=mask, head_mask=head_mask, output_attentions=True)
        ref_masked = ref(ids, attention_mask=mask, head_mask=head_mask, output_attentions=True)
    diffs = {f: relative_diff(getattr(ours, f), getattr(theirs, f)) for f in MAIN_FIELDS[arch]}
    diffs["hidden_states"] = max(
        relative_diff(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states)
    )
    diffs["attentions"] = max(relative_diff(a, b) for a, b in zip(ours_att, theirs_att))
    diffs["head_mask"] = max(
        relative_diff(a, b) for a, b in zip(masked.attentions, ref_masked.attentions)
    )
    main = getattr(ours, MAIN_FIELDS[arch][0])
    return {
        "diffs": diffs,
        "same_on_every_rank": same_on_every_rank(main),
        "parameter_bytes": local_parameter_bytes(model),
        "attention_shape": list(ours_att[0].shape),
    }


def check_decoding(folder: str, ids, mask, every_strategy: bool) -> dict:
    """A cache round trip (prompt, then one token on the returned cache) and greedy generate;
    with `every_strategy`, seeded sampling and beam search too."""
    ref = bloomlm.BloomForCausalLM.from_pretrained(folder)
    model = bloomlm.BloomForCausalLM.from_pretrained(folder, tp_plan="auto")
    results = {"local_heads": model.base_model.num_heads}
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask), ref(ids, attention_mask=mask)
        next_ids = theirs.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        ours_step = model(next_ids, past_key_values=ours.past_key_values, attention_mask=step_mask)
        ref_step = ref(next_ids, past_key_values=theirs.past_key_values, attention_mask=step_mask)
    results["logits_diff"] = relative_diff(ours.logits, theirs.logits)
    results["cached_step_diff"] = relative_diff(ours_step.logits, ref_step.logits)
    results["cache_key_shape"] = list(ours.past_key_values[0][0].shape)
    results["cache_value_shape"] = list(ours.past_key_values[0][1].shape)
    # No token twice in a row's continuation: each step's choice then depends on the whole order
    # of the logits, not just their maximum (random tiny models otherwise repeat one token).
    options = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=3, no_repeat_ngram_size=1)
    greedy, ref_greedy = model.generate(ids, **options), ref.generate(ids, **options)
    results["greedy_equal"] = torch.equal(greedy, ref_greedy)
    results["greedy_same_on_every_rank"] = same_on_every_rank(greedy)
    results["greedy_new_tokens"] = greedy[:, ids.shape[1] :].tolist()
    if not every_strategy:
        return results
    torch.manual_seed(5)
    sampled = model.generate(ids, do_sample=True, top_k=0, **options)
    torch.manual_seed(5)
    ref_sampled = ref.generate(ids, do_sample=True, top_k=0, **options)
    results["sampled_same_on_every_rank"] = same_on_every_rank(sampled)
    results["sampled_equal"] = torch.equal(sampled, ref_sampled)
    beams = model.generate(ids, num_beams=2, **options)
    results["beam_equal"] = torch.equal(beams, ref.generate(ids, num_beams=2, **options))
    results["strategies"] = check_strategies(model, ref, ids, mask)
    return results


def check_strategies(model, ref, ids, mask) -> dict:
    """Every other decoding strategy of `generate` on the split model: {name: [ids equal to one
    process, the same ids on every rank]}. Seeded alike where a strategy draws."""
    options = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=3)
    no_repeat = dict(options, no_repeat_ngram_size=1)
    one = dict(attention_mask=mask[-1:], max_new_tokens=6, pad_token_id=3)  # a single prompt
    cases = {
        "beam_sample": (ids, dict(no_repeat, num_beams=2, do_sample=True)),
        "group_beam": (ids, dict(no_repeat, num_beams=4, num_beam_groups=2, diversity_penalty=0.5)),
        "constrained": (ids, dict(no_repeat, num_beams=2, force_words_ids=[[17]])),
        "contrastive": (ids, dict(options, penalty_alpha=0.6, top_k=4)),
        "prompt_lookup": (ids[-1:], dict(one, prompt_lookup_num_tokens=3)),
        "assisted": (ids[-1:], dict(one, assistant_model="one process")),
        "assisted_by_itself": (ids[-1:], dict(one, assistant_model="itself")),
        "guidance": (ids, dict(no_repeat, guidance_scale=1.5)),
        "samples_per_prompt": (ids, dict(no_repeat, do_sample=True, num_return_sequences=2)),
        "generators": (ids, dict(no_repeat, do_sample=True, generator="seeded")),
    }
    assistants = {"one process": ref}
    results = {}
    for name, (prompt, kwargs) in cases.items():
        sequences = []
        for which in (model, ref):
            assistants["itself"] = which
            call = dict(kwargs)
            if "assistant_model" in call:
                call["assistant_model"] = assistants[call["assistant_model"]]
            if "generator" in call:  # one per prompt
                call["generator"] = [torch.Generator().manual_seed(i) for i in range(len(prompt))]
            torch.manual_seed(5)
            sequences.append(which.generate(prompt, **call))
        ours, theirs = sequences
        results[name] = [torch.equal(ours, theirs), same_on_every_rank(ours)]
    return results


def check_missing_head(body_folder: str, ids, mask) -> dict:
    """A base-model checkpoint loaded into a head: the new `score` is drawn from one seed all
    ranks agree on, so every rank computes the same logits."""
    model_class = bloomlm.BloomForSequenceClassification
    torch.manual_seed(dist.get_rank())  # ranks seeded apart: agreement must come from the loader
    model, info = model_class.from_pretrained(body_folder, tp_plan="auto", output_loading_info=True)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    return {"missing_keys": info["missing_keys"], "same_on_every_rank": same_on_every_rank(logits)}


def check_loading(folder: str, saved: str) -> dict:
    """Per-rank parameter bytes and peak memory while loading (a sharded checkpoint); whether
    each rank's tensors own only their share (no view of a whole tensor read by the way); the
    gathered weights saved on rank 0 and read back."""
    before = peak_rss_mib()
    start = time.perf_counter()
    model = bloomlm.BloomForCausalLM.from_pretrained(folder, tp_plan="auto")
    seconds = time.perf_counter() - start
    local_qkv = model.transformer.h[0].self_attention.query_key_value.weight.to_local()
    owned = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    whole = bloomlm.BloomForCausalLM.from_pretrained(folder).state_dict()
    gathered = full_state_dict(model)  # every rank takes part in the gathering
    model.save_pretrained(saved, state_dict=gathered, is_main_process=dist.get_rank() == 0)
    dist.barrier()
    reloaded = bloomlm.BloomForCausalLM.from_pretrained(saved).state_dict()
    return {
        "gathered_state_dict_equal": gathered.keys() == whole.keys()
        and all(torch.equal(gathered[k], whole[k]) for k in whole),
        "saved_on_rank_0_equal": reloaded.keys() == whole.keys()
        and all(torch.equal(reloaded[k], whole[k]) for k in whole),
        "storage_is_the_share": all(t.untyped_storage().nbytes() == t.nbytes for t in owned),
        "parameter_bytes": local_parameter_bytes(model),
        "peak_rss_growth_mib": peak_rss_mib() - before,
        "seconds": seconds,
        "qkv_local_shape": list(local_qkv.shape),
    }


def error_of(call) -> str:
    try:
        call()
    except ValueError as err:
        return str(err)
    return "no error"


def check_errors(spec: dict) -> dict:
    causal_lm = bloomlm.BloomForCausalLM
    world = dist.get_world_size()
    errors = {
        "bin": error_of(lambda: causal_lm.from_pretrained(spec["bin"], tp_plan="auto")),
        "bad_plan": error_of(lambda: causal_lm.from_pretrained(spec["bin"], tp_plan="colwise")),
        "too_many_ranks": error_of(
            lambda: causal_lm.from_pretrained(spec["heads"]["1"], tp_plan="auto")
        ),
    }
    model = causal_lm.from_pretrained(spec["heads"]["16"], tp_plan="auto")
    ids = torch.tensor(spec["input_ids"])
    tokenizer = bloomlm.AutoTokenizer.from_pretrained("bloomlm-tiny")
    errors.update({  # what a split model refuses, instead of failing inside DTensor
        "compile": error_of(lambda: model.generate(ids, max_new_tokens=2, compile=True)),
        "save": error_of(lambda: model.save_pretrained(spec["root"] + f"/unsaved{world}")),
        "resize": error_of(lambda: model.resize_token_embeddings(300)),
        "quantize": error_of(lambda: quantize.quantize_(model, "int8-weight-only")),
    })  # fmt: skip
    errors["serving"] = check_serving(model, tokenizer)
    if world % 2 == 0:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("data", "tp"))
        errors["no_model_axis"] = error_of(
            lambda: causal_lm.from_pretrained(spec["heads"]["16"], device_mesh=mesh)
        )
    return errors


def check_serving(model, tokenizer) -> str | dict:
    """The serving engine of a split model: refused on ranks but 0 (the message says to follow);
    on rank 0 it runs with the others replaying its decoder calls (lockstep), and its greedy
    tokens equal model.generate's. Returns the refusal, or on rank 0 what was compared."""
    from bloomlm.serving import SamplingParams, lockstep

    prompt = [5, 17, 42, 9, 100]  # token ids: this model's vocabulary is 256
    with torch.no_grad():  # collective: every rank runs it
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    if dist.get_rank() != 0:
        refusal = error_of(lambda: bloomlm.serving.LLM(model, tokenizer))
        lockstep.follow(model)
        return refusal
    llm = bloomlm.serving.LLM(model, tokenizer, max_model_len=64, kv_cache_memory=2**20)
    params = SamplingParams(max_tokens=8, temperature=0, n=2, ignore_eos=True)
    outs = llm.generate([prompt, prompt], params)
    llm.engine.close()
    tokens = [c.token_ids for out in outs for c in out.outputs]
    return {"equal": tokens == [alone[0, len(prompt) :].tolist()] * 4, "tokens": tokens}


def check_meshes(folder: str, ids, mask) -> dict:
    """`device_mesh=`: a 1-D mesh without names, and the "model" axis of a 2 x N/2 mesh (each
    "data" replica splits the model over its own ranks): logits against one process."""
    world = dist.get_world_size()
    ref = bloomlm.BloomForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        theirs = ref(ids, attention_mask=mask).logits
    meshes = {"1-D": init_device_mesh("cpu", (world,))}
    if world % 2 == 0:
        meshes["2-D"] = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("data", "model"))
    results = {}
    for name, mesh in meshes.items():
        model = bloomlm.BloomForCausalLM.from_pretrained(folder, device_mesh=mesh)
        with torch.no_grad():
            ours = model(ids, attention_mask=mask).logits
        results[name] = {
            "ranks": model.tensor_parallel_mesh.size(),
            "logits_diff": relative_diff(ours, theirs),
        }
    return results


def run_readme_example(code: str) -> str:
    """The README's torchrun example, as written, in this torchrun job: what it prints."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    return printed.getvalue()


def main(spec_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    with open(spec_path) as file:
        spec = json.load(file)
    ids, mask = torch.tensor(spec["input_ids"]), torch.tensor(spec["attention_mask"])
    world = int(spec["world_size"])
    results: dict = {"world_size": world, "outputs": {}, "decoding": {}, "heads": {}}
    start = time.perf_counter()
    for arch, folder in spec["archs"].items():
        results["outputs"][arch] = check_outputs(arch, folder, ids, mask)
    results["seconds"] = {"outputs": time.perf_counter() - start}
    for n_head, folder in spec["heads"].items():
        if n_head == "1":
            continue
        if int(n_head) % world:
            load = bloomlm.BloomForCausalLM.from_pretrained
            results["heads"][n_head] = error_of(lambda f=folder, load=load: load(f, tp_plan="auto"))
        else:
            results["decoding"][n_head] = check_decoding(folder, ids, mask, n_head == "16")
    results["seconds"]["decoding"] = time.perf_counter() - start
    saved = str(pathlib.Path(spec["root"]) / f"saved{world}")
    results["loading"] = check_loading(spec["sharded"], saved)
    results["missing_head"] = check_missing_head(spec["archs"]["BloomModel"], ids, mask)
    results["meshes"] = check_meshes(spec["heads"]["16"], ids, mask)
    results["errors"] = check_errors(spec)
    if spec.get("readme_example"):
        results["readme_example"] = run_readme_example(spec["readme_example"])
    results["seconds"]["total"] = time.perf_counter() - start
    every_rank = [None] * world
    dist.all_gather_object(every_rank, results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as file:
            json.dump(every_rank, file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
