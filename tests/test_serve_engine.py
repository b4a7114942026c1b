"""The continuous-batching engine without HTTP (bloomlm.serving: Engine, LLM, memory plan), and
the step-protocol additions it uses (Decoder.extend / copy_row / grow_rows).

The reference is `model.generate` on each prompt alone: greedy requests must return its tokens,
and seeded sampled ones its draws with the same generator, whatever else is in the batch."""

from __future__ import annotations

import json

import pytest
import torch

import bloomlm
from bloomlm.serving import LLM, Engine, QueueFull, SamplingParams
from bloomlm.serving.engine import EngineObserver
from bloomlm.serving.memory import available_memory, parse_bytes, plan_memory

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Once upon a time",
    "The weather today is quite something and I",
    "A",
    "Hello there my friend, how are you doing on this fine day in the",
    "In 1999 the",
    "def main():",
]


@pytest.fixture(scope="module")
def tiny():
    model = bloomlm.BloomForCausalLM.from_pretrained("bloomlm-tiny", torch_dtype="float32")
    tokenizer = bloomlm.AutoTokenizer.from_pretrained("bloomlm-tiny")
    return model.eval(), tokenizer


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def alone(model, ids: list[int], **kwargs) -> list[list[int]]:
    """model.generate on one prompt: the new tokens of each returned row, cut after eos."""
    out = model.generate(torch.tensor([ids]), **kwargs)[:, len(ids) :].tolist()
    return [row[: row.index(2) + 1] if 2 in row else row for row in out]


def run(engine: Engine, schedule: dict[int, list[tuple]], limit: int = 2000) -> dict:
    """Step `engine`, adding schedule[step]'s requests before that step; the final outputs."""
    finished, step = {}, 0
    while step < limit and (engine.has_work() or any(s >= step for s in schedule)):
        for request in schedule.get(step, []):
            engine.add_request(*request)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        step += 1
    assert step < limit
    return finished


# --------------------------------------------------------------------------------------------------
# The step protocol's additions
# --------------------------------------------------------------------------------------------------


def test_extend_copy_row_and_grow_rows_keep_each_row_what_it_was(tiny):
    model, tokenizer = tiny
    prompt = torch.tensor(ids_of(tokenizer, PROMPTS[3]))
    whole = model.make_decoder(1, 64).fill(0, prompt).logits[0, -1]
    staged = model.make_decoder(1, 64)
    staged.fill(0, prompt[:5])
    staged.extend(0, prompt[5:9])
    chunked = staged.extend(0, prompt[9:]).logits[0, -1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    decoder = model.make_decoder(2, 64)
    decoder.fill(0, torch.tensor(ids_of(tokenizer, PROMPTS[0])))
    decoder.copy_row(0, 1, decoder=staged)  # a prompt prefilled elsewhere moves in
    decoder.grow_rows(5)
    assert decoder.rows == 5 and decoder.cache.keys.shape[1] == 5
    decoder.copy_row(1, 4)  # ... and moves down the rows
    decoder.reset(1)
    assert decoder.cache.lengths[4] == len(prompt) and decoder.cache.lengths[1] == 0
    next_ids = torch.tensor([11, 0, 0, 0, 12])
    logits = decoder.step_rows(next_ids[3:], rows=slice(3, 5))
    reference = model.make_decoder(1, 64)
    reference.fill(0, torch.cat([prompt, torch.tensor([12])]))
    expected = reference.step_rows(torch.tensor([12]))  # not the same: one more token
    assert not torch.allclose(logits[1], expected[0])
    alone_row = model.make_decoder(1, 64)
    alone_row.fill(0, prompt)
    torch.testing.assert_close(
        logits[1], alone_row.step_rows(torch.tensor([12]))[0], rtol=0, atol=1e-5
    )
    compiled_like = model.make_decoder(1, 8)
    compiled_like.compiled = object()  # grow_rows refuses a compiled decoder
    with pytest.raises(ValueError, match="compiled"):
        compiled_like.grow_rows(4)


# --------------------------------------------------------------------------------------------------
# Tokens: the same as generate alone
# --------------------------------------------------------------------------------------------------


def test_greedy_requests_joining_mid_stream_return_what_generate_returns_alone(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_model_len=128, max_sequences=3)  # rows get reused
    lengths = [30, 7, 25, 12, 40, 3]
    schedule: dict[int, list[tuple]] = {}
    for i, (prompt, new) in enumerate(zip(PROMPTS, lengths)):
        params = SamplingParams(max_tokens=new, temperature=0)
        schedule.setdefault(i * 4, []).append((f"r{i}", ids_of(tokenizer, prompt), params))
    finished = run(engine, schedule)
    assert engine.decoder.rows <= 3 and not engine.slots
    for i, (prompt, new) in enumerate(zip(PROMPTS, lengths)):
        out = finished[f"r{i}"].outputs[0]
        expected = alone(model, ids_of(tokenizer, prompt), max_new_tokens=new, do_sample=False)[0]
        assert out.token_ids == expected, i
        assert out.finish_reason == ("stop" if expected[-1] == 2 else "length")
        assert out.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_seeded_sampling_draws_what_generate_draws_with_the_same_generator(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_model_len=128)
    params = [
        SamplingParams(
            n=2, max_tokens=15, temperature=0.8, top_k=40, top_p=0.9, seed=7, ignore_eos=True
        ),
        SamplingParams(max_tokens=20, temperature=1.3, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0),
    ]
    schedule = {
        0: [("a", ids_of(tokenizer, PROMPTS[0]), params[0])],
        3: [("b", ids_of(tokenizer, PROMPTS[3]), params[1])],
        5: [("c", ids_of(tokenizer, PROMPTS[1]), params[2])],
    }
    finished = run(engine, schedule)
    expected_a = alone(
        model,
        ids_of(tokenizer, PROMPTS[0]),
        max_new_tokens=15,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        suppress_tokens=[2],
        num_return_sequences=2,
        generator=[torch.Generator().manual_seed(7)],
    )
    assert [o.token_ids for o in finished["a"].outputs] == expected_a
    expected_b = alone(
        model,
        ids_of(tokenizer, PROMPTS[3]),
        max_new_tokens=20,
        do_sample=True,
        temperature=1.3,
        top_k=0,
        suppress_tokens=[2],
        generator=[torch.Generator().manual_seed(3)],
    )
    assert [o.token_ids for o in finished["b"].outputs] == expected_b
    other_seed = Engine(model, tokenizer, max_model_len=128)
    params_b = SamplingParams(max_tokens=20, temperature=1.3, seed=4, ignore_eos=True)
    again = run(other_seed, {0: [("b", ids_of(tokenizer, PROMPTS[3]), params_b)]})
    assert again["b"].outputs[0].token_ids != expected_b[0]  # the seed really decides


def test_chunked_prefill_and_repetition_settings_match_generate(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_model_len=128, prefill_chunk=4)
    ids = ids_of(tokenizer, PROMPTS[3])
    params = SamplingParams(
        max_tokens=20, temperature=0, repetition_penalty=1.3, no_repeat_ngram_size=2, min_tokens=5
    )
    finished = run(engine, {0: [("r", ids, params)]})
    expected = alone(
        model,
        ids,
        max_new_tokens=20,
        do_sample=False,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        min_new_tokens=5,
    )
    assert finished["r"].outputs[0].token_ids == expected[0]


def test_openai_penalties_push_away_from_tokens_already_generated(tiny):
    model, tokenizer = tiny
    llm = LLM(model, tokenizer, max_model_len=128)
    plain, penalised = llm.generate(
        ["A", "A"],
        [
            SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
            SamplingParams(
                max_tokens=20,
                temperature=0,
                ignore_eos=True,
                frequency_penalty=2.0,
                presence_penalty=1.0,
            ),
        ],
    )
    plain_ids, penalised_ids = plain.outputs[0].token_ids, penalised.outputs[0].token_ids
    assert len(set(plain_ids)) <= 2  # the tiny model repeats "A" forever
    assert len(set(penalised_ids)) > 10


# --------------------------------------------------------------------------------------------------
# Text, stops, logprobs
# --------------------------------------------------------------------------------------------------


def test_stop_strings_end_the_text_before_them_and_streams_never_show_them(tiny):
    model, tokenizer = tiny
    ids = ids_of(tokenizer, PROMPTS[0])
    full = alone(model, ids, max_new_tokens=30, do_sample=False)[0]
    text = tokenizer.decode(full, skip_special_tokens=True)
    stop = text[10:14]
    engine = Engine(model, tokenizer, max_model_len=128)
    engine.add_request("r", ids, SamplingParams(max_tokens=30, temperature=0, stop=[stop, "zzzz"]))
    deltas, outputs = [], []
    while engine.has_work():
        for output in engine.step():
            outputs.append(output)
            deltas.append(output.outputs[0].delta_text)
            assert stop not in "".join(deltas)
    final = outputs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == text[: text.index(stop)] == "".join(deltas)
    assert sum(len(o.outputs[0].delta_token_ids) for o in outputs) == len(final.token_ids)


def test_logprobs_are_the_model_log_softmax(tiny):
    model, tokenizer = tiny
    ids = ids_of(tokenizer, PROMPTS[1])
    llm = LLM(model, tokenizer, max_model_len=128)
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2)
    out = llm.generate([ids], params)[0]
    sequence = ids + out.outputs[0].token_ids
    with torch.no_grad():
        log_probs = model(torch.tensor([sequence])).logits[0].log_softmax(-1)
    generated = out.outputs[0].logprobs
    for k, entry in enumerate(generated):
        position = len(ids) - 1 + k
        assert entry.token_id == sequence[position + 1]
        assert entry.logprob == pytest.approx(log_probs[position, entry.token_id].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == log_probs[position].topk(3).indices.tolist()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for position, entry in enumerate(out.prompt_logprobs[1:]):
        expected = log_probs[position, ids[position + 1]].item()
        assert entry.logprob == pytest.approx(expected, abs=1e-4) and len(entry.top) == 2


# --------------------------------------------------------------------------------------------------
# Rows, queue, faults
# --------------------------------------------------------------------------------------------------


def test_an_aborted_request_frees_its_rows_at_the_next_step(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_model_len=128)
    engine.add_request(
        "long", ids_of(tokenizer, PROMPTS[0]), SamplingParams(n=3, max_tokens=50, ignore_eos=True)
    )
    engine.add_request(
        "other",
        ids_of(tokenizer, PROMPTS[2]),
        SamplingParams(max_tokens=50, temperature=0, ignore_eos=True),
    )
    for _ in range(4):
        engine.step()
    assert len(engine.slots) == 4
    engine.abort("long")
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs["long"].finished and {o.finish_reason for o in outputs["long"].outputs} == {
        "abort"
    }
    assert len(engine.slots) == 1 and engine.slots[0][0].id == "other"
    finished = run(engine, {})
    assert len(finished["other"].outputs[0].token_ids) == 50
    expected = alone(
        model,
        ids_of(tokenizer, PROMPTS[2]),
        max_new_tokens=50,
        do_sample=False,
        suppress_tokens=[2],
    )
    assert finished["other"].outputs[0].token_ids == expected[0]  # unharmed by the move


def test_the_waiting_queue_is_bounded(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_model_len=64, max_waiting=2)
    engine.add_requests([(f"r{i}", [5, 6], SamplingParams(max_tokens=2)) for i in range(2)])
    with pytest.raises(QueueFull, match="at most 2"):
        engine.add_request("r3", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="max_model_len=64"):
        engine.add_request("long", [5] * 64, SamplingParams())
    with pytest.raises(ValueError, match="n=9999"):
        Engine(model, tokenizer, max_model_len=64, max_sequences=4).add_request(
            "wide", [5], SamplingParams(n=9999)
        )
    assert len(run(engine, {})) == 2


def test_an_engine_fault_fails_only_the_requests_it_touched(tiny, monkeypatch):
    model, tokenizer = tiny
    events = []

    class Observer(EngineObserver):
        def request_finished(self, status: str, generated_tokens: int) -> None:
            events.append(status)

    engine = Engine(model, tokenizer, max_model_len=128, observer=Observer())
    fill = engine.staging.fill

    def failing_fill(row, ids, **kwargs):
        if int(ids[0]) == 999:
            raise RuntimeError("injected prefill fault")
        return fill(row, ids, **kwargs)

    monkeypatch.setattr(engine.staging, "fill", failing_fill)
    params = SamplingParams(max_tokens=6, temperature=0)
    finished = run(
        engine, {0: [("ok", ids_of(tokenizer, PROMPTS[0]), params), ("bad", [999, 5, 6], params)]}
    )
    assert finished["bad"].error == "RuntimeError: injected prefill fault"
    assert finished["bad"].outputs[0].finish_reason == "error"
    assert finished["ok"].error is None and len(finished["ok"].outputs[0].token_ids) == 6
    step_rows = engine.decoder.step_rows
    calls = {"n": 0}

    def failing_once(ids, rows=None):
        calls["n"] += 1
        if calls["n"] == 1:  # x alone in the batch; y is prefilled after it, in the same step
            raise RuntimeError("injected decode fault")
        return step_rows(ids, rows)

    monkeypatch.setattr(engine.decoder, "step_rows", failing_once)
    finished = run(
        engine,
        {
            0: [("x", ids_of(tokenizer, PROMPTS[1]), params)],
            1: [("y", ids_of(tokenizer, PROMPTS[2]), params)],
        },
    )
    assert finished["x"].error == "RuntimeError: injected decode fault"
    assert finished["y"].error is None  # not in the failed step: untouched
    assert (
        finished["y"].outputs[0].token_ids
        == alone(model, ids_of(tokenizer, PROMPTS[2]), max_new_tokens=6, do_sample=False)[0]
    )
    assert events == ["error", "finished", "error", "finished"] and not engine.slots


# --------------------------------------------------------------------------------------------------
# The memory plan and the offline front end
# --------------------------------------------------------------------------------------------------


def test_the_memory_plan_bounds_concurrent_sequences_by_the_budget(tiny):
    model, _ = tiny
    config = model.config  # 4 layers x 192 hidden x fp32: 6 KiB of keys and values per token
    plan = plan_memory(
        config, torch.float32, torch.device("cpu"), 256, kv_cache_memory=parse_bytes("15MiB")
    )
    assert plan.bytes_per_token == 2 * 4 * 192 * 4 and plan.bytes_per_sequence == 1536 * 1024
    assert plan.max_sequences == 9  # 10 rows of 1.5 MiB, one of them for prefills
    assert "up to 9 concurrent sequences" in plan.describe()
    half = plan_memory(
        config,
        torch.float16,
        torch.device("cpu"),
        256,
        kv_cache_memory=parse_bytes("15MiB"),
        max_batch=4,
    )
    assert half.max_sequences == 4 and half.limited_by == "--max-batch"
    roomy = plan_memory(config, torch.float32, torch.device("cpu"), 2048)  # available memory
    assert roomy.max_sequences > 64
    with pytest.raises(ValueError, match="lower --max-model-len or raise --kv-cache-memory"):
        plan_memory(config, torch.float32, torch.device("cpu"), 2048, kv_cache_memory=10**6)
    assert parse_bytes("2GiB") == 2**31 and parse_bytes("1.5k") == 1536
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_the_memory_plan_on_a_gpu_reads_its_free_memory(tiny, monkeypatch):
    """On CUDA the budget is half the device's free memory (torch.cuda.mem_get_info; faked here,
    so the CPU-only suite runs the code a GPU server runs)."""
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return 3 * 2**30, 80 * 2**30  # (free, total)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cuda = torch.device("cuda", 0)
    assert available_memory(cuda) == 3 * 2**30
    plan = plan_memory(tiny[0].config, torch.bfloat16, cuda, 2048)
    assert asked == [cuda, cuda] and plan.budget == 3 * 2**29
    assert plan.max_sequences == 3 * 2**29 // (2 * 4 * 192 * 2 * 2048) - 1
    assert "50% of 3.0 GiB available" in plan.describe()


def test_llm_generate_keeps_the_prompts_order_and_takes_token_ids(tiny):
    model, tokenizer = tiny
    llm = LLM(model, tokenizer, max_model_len=128, max_sequences=2)
    params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in (9, 2, 5)]
    outputs = llm.generate([PROMPTS[0], ids_of(tokenizer, PROMPTS[1]), PROMPTS[2]], params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [9, 2, 5]
    assert outputs[0].prompt == PROMPTS[0] and outputs[1].prompt is None
    order = [i for i, _ in llm.iter_generate(PROMPTS[:3], params)]
    assert sorted(order) == [0, 1, 2] and order[0] == 1  # the shortest finishes first
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(PROMPTS[:3], params[:2])
    with pytest.raises(ValueError, match="temperature must be >= 0.0"):
        SamplingParams(temperature=-1)
    assert not llm.engine.has_work()


def test_generate_file_runs_on_the_engine_and_prints_what_generate_prints(
    tiny, tmp_path, monkeypatch, capsys
):
    from bloomlm.cli import main
    from bloomlm.generation import GenerationConfig
    from bloomlm.serving import llm as llm_module

    model, tokenizer = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    used = []
    original = llm_module.LLM.iter_generate

    def spy(self, prompts, params):
        used.append(params)
        yield from original(self, prompts, params)

    monkeypatch.setattr(llm_module.LLM, "iter_generate", spy)
    argv = [
        "generate",
        "--file",
        str(prompts),
        "--jsonl",
        "--max-new-tokens",
        "9",
        "--temperature",
        "0",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(used) == 1 and used[0][0].max_tokens == 9 and used[0][0].greedy
    for prompt, line in zip(PROMPTS[:4], lines):
        expected = alone(model, ids_of(tokenizer, prompt), max_new_tokens=9, do_sample=False)[0]
        assert line == {
            "prompt": prompt,
            "generated": tokenizer.decode(expected, skip_special_tokens=True),
        }
    assert main([*argv, "--num-beams", "2"]) == 0  # beam search: model.generate, not the engine
    assert len(used) == 1
    beams = llm_module.params_from_generate(
        {"num_beams": 2, "max_new_tokens": 3}, GenerationConfig(), None, ()
    )
    assert beams is None
    typical = llm_module.params_from_generate(
        {"max_new_tokens": 3}, GenerationConfig(typical_p=0.5), None, ()
    )
    assert typical is None
