"""The `bloomlm` command line: argparse front ends that call the library and print; no model math
and no file-format knowledge here (those live in `bloomlm.tasks`, `bloomlm.convert`,
`bloomlm.finetune`).

    bloomlm generate "Once upon a time"         continue text (embedded bloomlm-tiny), streamed
    bloomlm classify "I love this"              label + probability (bloomlm-tiny-sentiment)
    bloomlm tag --model DIR "text"              token -> label table
    bloomlm answer --model DIR --question Q --context C
    bloomlm convert SRC DST [--to safetensors|bin|flax] [--dtype] [--max-shard-size]
    bloomlm info [PATH] [--batch B --length L]  shapes, parameters, bytes, memory estimate
    bloomlm finetune {seq-cls,token-cls,qa,causal-lm} --train F --eval F --out DIR

Errors are one line on stderr and a non-zero exit (2 for bad arguments, 1 otherwise); `--debug`
shows the traceback. Progress bars go to stderr, only when it is a terminal. torch, the tokenizer
and the task modules are imported inside the command functions, so `bloomlm --help` starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from bloomlm import __version__
from bloomlm.config import BloomConfig
from bloomlm.convert import BYTES_NAME as BYTES_NAME  # re-exported from its old home
from bloomlm.convert import (
    BYTES_PER_DTYPE,
    CONVERT_DTYPES,
    FORMATS,
    memory_estimate,
    model_summary,
    parameter_count,
)
from bloomlm.convert import HEAD_CLASSES as HEAD_CLASSES  # re-exported from its old home

DEFAULT_LM = "bloomlm-tiny"
DEFAULT_CLASSIFIER = "bloomlm-tiny-sentiment"
DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
FINETUNE_TASKS = ("seq-cls", "token-cls", "qa", "causal-lm")


class CommandError(Exception):
    """A user-facing problem: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (pointing to --help), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- shared helpers --------------------------------------------------------------------------------


def _progress(iterable: Iterable, total: int | None, description: str) -> Iterable:
    """A tqdm bar on a terminal, the bare iterable when stderr is piped or a file."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False)


def _bar(total: int, description: str) -> Any:
    """A tqdm bar to update by hand (a no-op object when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, leave=False, disable=not sys.stderr.isatty())


def _read_lines(args: argparse.Namespace, positional: list[str]) -> list[str]:
    """Texts from the command line, else `--file` (one per line), else stdin when it is piped."""
    if positional:
        return positional
    if getattr(args, "file", None):
        path = Path(args.file)
        if not path.is_file():
            raise CommandError(f"--file {path}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
    elif not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
    else:
        raise CommandError(
            "no input: give the text as an argument, pass --file FILE, or pipe lines on stdin"
        )
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise CommandError("no input: the file or stdin holds no non-empty lines")
    return lines


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _load(model_class_name: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) for `args.model` with `--dtype` and `--device` applied."""
    import bloomlm

    model_class = getattr(bloomlm, model_class_name)
    kwargs: dict[str, Any] = {}
    if args.dtype == "int8":
        kwargs["quantize"] = "int8"
    elif args.dtype is not None:
        kwargs["torch_dtype"] = args.dtype
    elif args.device and not args.device.startswith("cpu"):
        kwargs["torch_dtype"] = "auto"  # on an accelerator, the checkpoint's own (half) precision
    else:
        kwargs["torch_dtype"] = "float32"  # CPUs are fastest and most exact in float32
    if args.device:
        kwargs["device_map"] = args.device
    if getattr(args, "rank_of_tensor_parallel_job", False):
        kwargs["tp_plan"] = "auto"  # one rank of `--tensor-parallel N` (_generate_tensor_parallel)
    bar = _bar(2, f"loading {args.model}")
    tokenizer = bloomlm.AutoTokenizer.from_pretrained(args.model)
    bar.update(1)
    model = model_class.from_pretrained(args.model, **kwargs)
    bar.update(1)
    bar.close()
    return model, tokenizer


def _require_model(args: argparse.Namespace, what: str, task: str) -> None:
    if args.model is None:
        raise CommandError(
            f"no {what} model ships with bloomlm: pass --model PATH (a BLOOM {what} folder, or one "
            f"trained with `bloomlm finetune {task}`)"
        )


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            option = name.replace("_", "-")
            raise CommandError(f"--{option} must be at least 1, got {getattr(args, name)}")


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


# -- generate --------------------------------------------------------------------------------------


def _generate_options(args: argparse.Namespace, pad_token_id: int | None) -> dict[str, Any]:
    """`generate()` keywords from the decoding options (sampling ones only when temperature > 0)."""
    options = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.temperature > 0,
        "num_beams": args.num_beams,
        "repetition_penalty": args.repetition_penalty,
        "pad_token_id": pad_token_id,
    }
    if args.temperature > 0:
        options |= {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    return options


def _generate(args: argparse.Namespace) -> int:
    import torch

    from bloomlm import TextStreamer

    if getattr(args, "tensor_parallel", None):
        return _generate_tensor_parallel(args)
    prompts = _read_lines(args, args.prompt)
    _check_positive(args, "max_new_tokens", "num_beams", "batch_size")
    if args.temperature < 0:
        raise CommandError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = _load("BloomForCausalLM", args)
    options = _generate_options(args, tokenizer.pad_token_id)
    if len(prompts) == 1 and args.num_beams == 1 and not args.jsonl:
        # One prompt: stream, printing each word as soon as it is final.
        inputs = tokenizer(prompts, return_tensors="pt").to(model.device)
        streamer = TextStreamer(tokenizer, skip_prompt=args.only_new, skip_special_tokens=True)
        model.generate(**inputs, streamer=streamer, **options)
        return 0
    _generate_batches(args, model, tokenizer, prompts, options)
    return 0


def _generate_tensor_parallel(args: argparse.Namespace) -> int:
    """`--tensor-parallel N`: the same command in N processes (torch.distributed.run's API), the
    model split over them; every rank picks the same tokens and rank 0 prints them."""
    from bloomlm.sharding_plan import check_tensor_parallel
    from bloomlm.torch.tensor_parallel import launch

    if args.device and not args.device.startswith("cpu"):
        raise CommandError("--tensor-parallel runs on CPU processes (gloo); drop --device")
    check_tensor_parallel(BloomConfig.from_pretrained(args.model).n_head, args.tensor_parallel)
    args.prompt = _read_lines(args, args.prompt)  # read once: the ranks get the same prompts
    args.rank_of_tensor_parallel_job, ways, args.tensor_parallel = True, args.tensor_parallel, None
    launch(_generate_on_rank, ways, args)
    return 0


def _generate_on_rank(args: argparse.Namespace) -> int:
    import os

    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # the ranks print the same text: rank 0 shows it
    return _generate(args)


def _generate_batches(
    args: argparse.Namespace, model: Any, tokenizer: Any, prompts: list[str], options: dict
) -> None:
    batches = list(_chunks(prompts, args.batch_size))
    first = True
    for batch in _progress(batches, len(batches), "generating"):
        inputs = tokenizer(batch, padding=True, return_tensors="pt").to(model.device)
        sequences = model.generate(**inputs, **options)
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        continuations = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for prompt, continuation in zip(batch, continuations):
            if args.jsonl:  # one line per prompt, whatever the text holds
                _print_json({"prompt": prompt, "generated": continuation})
                continue
            if not first:
                print()  # texts may hold newlines: a blank line between results
            print(continuation if args.only_new else prompt + continuation, flush=True)
            first = False


# -- classify, tag, answer -------------------------------------------------------------------------


def _classify(args: argparse.Namespace) -> int:
    from bloomlm.tasks import classify

    texts = _read_lines(args, args.text)
    _check_positive(args, "batch_size")
    model, tokenizer = _load("BloomForSequenceClassification", args)
    batches = list(_chunks(texts, args.batch_size))
    for batch in _progress(batches, len(batches), "classifying"):
        for text, result in zip(
            batch, classify(model, tokenizer, batch, batch_size=args.batch_size)
        ):
            if args.jsonl:
                _print_json({"text": text, **result})
            else:
                print(f"{result['label']}\t{result['score']:.4f}\t{text}", flush=True)
    return 0


def _tag(args: argparse.Namespace) -> int:
    _require_model(args, "token-classification", "token-cls")
    from bloomlm.tasks import tag

    model, tokenizer = _load("BloomForTokenClassification", args)
    for text in _read_lines(args, args.text):
        rows = tag(model, tokenizer, text)
        if args.jsonl:
            _print_json({"text": text, "tokens": rows})
            continue
        width = max([len("token"), *(len(repr(r["token"])) for r in rows)])
        print(f"{'token':<{width}}  label\tscore")
        for row in rows:
            print(f"{row['token']!r:<{width}}  {row['label']}\t{row['score']:.4f}")
    return 0


def _answer(args: argparse.Namespace) -> int:
    _require_model(args, "question-answering", "qa")
    from bloomlm.tasks import answer_question

    context = args.context
    if args.context_file:
        path = Path(args.context_file)
        if not path.is_file():
            raise CommandError(f"--context-file {path}: no such file")
        context = path.read_text(encoding="utf-8")
    if not context or not args.question:
        raise CommandError("answer needs --question and --context (or --context-file)")
    model, tokenizer = _load("BloomForQuestionAnswering", args)
    result = answer_question(model, tokenizer, args.question, context, max_length=args.max_length)
    if args.json:
        _print_json(result)
    else:
        print(
            f"answer\t{result['answer']}\nscore\t{result['score']:.4f}\n"
            f"start\t{result['start']}\nend\t{result['end']}"
        )
    return 0


# -- convert, info ---------------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    from bloomlm.convert import convert_checkpoint

    bar = _bar(2, f"converting to {args.to}")
    try:
        architecture = convert_checkpoint(
            args.src,
            args.dst,
            to=args.to,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            on_step=lambda: bar.update(1),
        )
    finally:
        bar.close()
    print(f"wrote {args.to} weights ({architecture}) to {Path(args.dst)}")
    return 0


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _info(args: argparse.Namespace) -> int:
    """Config summary, parameter count (no memory for weights), memory estimate."""
    _check_positive(args, "batch", "length")
    config = BloomConfig.from_pretrained(args.path)
    if args.tensor_parallel is not None:
        from bloomlm.sharding_plan import check_tensor_parallel

        check_tensor_parallel(config.n_head, args.tensor_parallel)
    n_params = parameter_count(config)
    dtypes = list(BYTES_PER_DTYPE) if args.dtype == "auto" else [args.dtype]
    summary = model_summary(config, n_params)
    memory = {d: memory_estimate(config, n_params, d, args.batch, args.length) for d in dtypes}
    if args.json:
        estimate = {"batch": args.batch, "length": args.length, **memory}
        if args.tensor_parallel:
            from bloomlm.sharding_plan import plan_summary

            size = {d: BYTES_PER_DTYPE[d] for d in dtypes if d != "int8"}
            plans = {d: plan_summary(config, args.tensor_parallel, n, args.batch, args.length)
                     for d, n in size.items()}  # fmt: skip
            summary["tensor_parallel"] = plans
        _print_json(summary | {"memory_estimate": estimate})
        return 0
    for key, value in summary.items():
        is_count = isinstance(value, int) and key.startswith(("parameters", "bytes"))
        shown = f"{value:,}" if is_count else value
        if key.startswith("bytes"):
            shown = f"{shown} ({_human(value)})"
        print(f"{key:<16} {shown}")
    print(f"\nestimated memory for batch {args.batch} x length {args.length} (generation; rough):")
    parts = list(next(iter(memory.values())))
    print(f"{'':<12}" + "".join(f"{d:>12}" for d in dtypes))
    for part in parts:
        print(f"{part:<12}" + "".join(f"{_human(memory[d][part]):>12}" for d in dtypes))
    if args.tensor_parallel:
        _print_tensor_parallel_plan(config, args, [d for d in dtypes if d != "int8"])
    return 0


def _print_tensor_parallel_plan(
    config: BloomConfig, args: argparse.Namespace, dtypes: list[str]
) -> None:
    from bloomlm.sharding_plan import plan_summary

    ways, batch, length = args.tensor_parallel, args.batch, args.length
    plans = {d: plan_summary(config, ways, BYTES_PER_DTYPE[d], batch, length) for d in dtypes}
    plan = next(iter(plans.values()))
    print(f"\ntensor parallel over {ways} devices ({plan['local_heads']} heads each):")
    for row in plan["rows"]:
        split = "" if row["split_axis"] is None else f" (axis {row['split_axis']})"
        shapes = f"{row['shape']} -> {row['local_shape']}"
        count = " (tied: the embedding)" if row.get("tied") else f" x{row['count']}"
        print(f"  {row['name']:<56} {row['kind'] + split:<16} {shapes}{count}")
    print(f"bytes per device, batch {batch} x length {length}:")
    print(f"{'':<12}" + "".join(f"{d:>12}" for d in dtypes))
    for part in ("weights", "kv_cache", "total"):
        values = [_human(plans[d]["bytes_per_device"][part]) for d in dtypes]
        print(f"{part:<12}" + "".join(f"{v:>12}" for v in values))


# -- finetune --------------------------------------------------------------------------------------


def _finetune(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from bloomlm.finetune import FinetuneConfig, finetune

    # Every FinetuneConfig field with an option of the same name takes it; the rest are renamed.
    names = [f.name for f in fields(FinetuneConfig) if hasattr(args, f.name)]
    values = {name: getattr(args, name) for name in names}
    values |= {
        "train_file": args.train,
        "eval_file": args.eval,
        "out_dir": args.out,
        "model": args.model or DEFAULT_LM,
        "labels": [label.strip() for label in args.labels.split(",")] if args.labels else None,
        "device": args.device or "cpu",
    }
    config = FinetuneConfig(**values)
    result = finetune(config, resume=args.resume)
    best = ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items())
    print(f"best model ({best}) saved to {result.out_dir}")
    return 0


# -- the parser: one builder per subcommand, shared option groups first ----------------------------


def _model_options(parser: argparse.ArgumentParser, default: str | None, default_note: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default,
        metavar="PATH_OR_NAME",
        help=f"model folder or name ({default_note})",
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1, mps, or auto (default: cpu)")
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights dtype; auto = the checkpoint's (default: float32 on CPU, auto on other "
        "devices); int8 = weight-only int8 quantization",
    )


def _text_inputs(parser: argparse.ArgumentParser, name: str, noun: str, help: str) -> None:
    """The positional texts and `--file`, the input every text command takes."""
    parser.add_argument(name, nargs="*", help=f"{help} (else --file, else lines from stdin)")
    parser.add_argument("--file", help=f"read {noun} from this file, one per line")


def _add_generate(commands: Any) -> None:
    parser = commands.add_parser(
        "generate",
        help="continue text prompts (streams a single prompt word by word)",
        description="Continue prompts. One prompt streams to the terminal as it is generated; "
        "several (from --file or stdin, one per line) run in batches and print their results "
        "separated by blank lines (--jsonl: one JSON object per line).",
    )
    _text_inputs(parser, "prompt", "prompts", "prompt text")
    _model_options(parser, DEFAULT_LM, f"default: the embedded {DEFAULT_LM}")
    sampling = parser.add_argument_group("decoding")
    sampling.add_argument("--max-new-tokens", type=int, default=40)
    sampling.add_argument(
        "--temperature", type=float, default=0.8, help="0 means greedy (default: 0.8)"
    )
    sampling.add_argument("--top-k", type=int, default=50)
    sampling.add_argument("--top-p", type=float, default=0.95)
    sampling.add_argument("--repetition-penalty", type=float, default=1.2)
    sampling.add_argument("--num-beams", type=int, default=1)
    sampling.add_argument(
        "--seed", type=int, help="fix the random seed, so sampling repeats exactly"
    )
    parser.add_argument(
        "--tensor-parallel", type=int, metavar="N",
        help="split the model over N local processes (torch.distributed, gloo)",
    )  # fmt: skip
    output = parser.add_argument_group("output")
    output.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    output.add_argument(
        "--only-new", action="store_true", help="print only the generated text, not the prompt"
    )
    output.add_argument(
        "--jsonl", action="store_true", help='one JSON object per prompt: {"prompt", "generated"}'
    )
    parser.set_defaults(run=_generate)


def _add_classify(commands: Any) -> None:
    parser = commands.add_parser(
        "classify",
        help="label texts with a sequence-classification model (default: sentiment)",
        description="Print label, probability and text, tab-separated, for each text.",
    )
    _text_inputs(parser, "text", "texts", "texts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--jsonl",
        action="store_true",
        help='one JSON object per text: {"text", "label", "score", "scores"}',
    )
    note = f"default: the embedded {DEFAULT_CLASSIFIER}, positive/negative"
    _model_options(parser, DEFAULT_CLASSIFIER, note)
    parser.set_defaults(run=_classify)


def _add_tag(commands: Any) -> None:
    parser = commands.add_parser(
        "tag",
        help="label every token with a token-classification model (needs --model)",
        description="Print a token/label/score table per text.",
    )
    _text_inputs(parser, "text", "texts", "texts")
    parser.add_argument("--jsonl", action="store_true", help="one JSON object per text")
    _model_options(parser, None, "required: no tagging model ships with bloomlm")
    parser.set_defaults(run=_tag)


def _add_answer(commands: Any) -> None:
    parser = commands.add_parser(
        "answer",
        help="extract the answer to a question from a context (needs --model)",
        description="Print the answer span, its probability and its character offsets in the "
        "context.",
    )
    parser.add_argument("--question", required=True)
    parser.add_argument("--context", help="the text to find the answer in")
    parser.add_argument("--context-file", help="read the context from this file")
    parser.add_argument(
        "--max-length", type=int, help="truncate question + context to this many tokens"
    )
    parser.add_argument(
        "--json", action="store_true", help='print {"answer", "score", "start", "end"}'
    )
    _model_options(parser, None, "required: no question-answering model ships with bloomlm")
    parser.set_defaults(run=_answer)


def _add_convert(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help="rewrite a model folder: .bin -> safetensors, PyTorch <-> Flax, re-shard, "
        "change dtype",
        description="Write SRC's model (config, weights, tokenizer) to the new folder DST. DST is "
        "built in a temporary folder and renamed into place, so a failure leaves nothing behind.",
    )
    parser.add_argument(
        "src", help="model folder or name to read (PyTorch .bin/.safetensors or Flax msgpack)"
    )
    parser.add_argument("dst", help="new folder to write (must not exist, or be empty)")
    parser.add_argument("--to", choices=FORMATS, default="safetensors", help="output format")
    parser.add_argument(
        "--dtype",
        choices=CONVERT_DTYPES,
        default="auto",
        help="cast floating weights (default: keep)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="split weights into files of at most this size"
    )
    parser.set_defaults(run=_convert)


def _add_info(commands: Any) -> None:
    parser = commands.add_parser(
        "info",
        help="summarise a model: shapes, parameter count, bytes per dtype, memory estimate",
        description="Read only config.json: nothing is loaded, so this is instant for any size.",
    )
    parser.add_argument(
        "path",
        nargs="?",
        default=DEFAULT_LM,
        help=f"model folder, config.json or name (default: {DEFAULT_LM})",
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="batch size for the memory estimate (default: 1)"
    )
    parser.add_argument(
        "--length",
        type=int,
        default=2048,
        help="tokens per sequence, prompt + generated (default: 2048)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="estimate for this dtype only"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--tensor-parallel", type=int, metavar="N",
        help="also print the N-way tensor-parallel plan and the bytes on each device",
    )  # fmt: skip
    parser.set_defaults(run=_info)


def _finetune_columns(parser: argparse.ArgumentParser) -> None:
    columns = parser.add_argument_group("columns")
    columns.add_argument("--text-column", default="text", help="seq-cls, causal-lm (default: text)")
    columns.add_argument("--text-pair-column", help="seq-cls: optional second text")
    columns.add_argument("--label-column", default="label", help="seq-cls (default: label)")
    columns.add_argument(
        "--labels", help="seq-cls/token-cls: comma-separated label names in id order"
    )
    columns.add_argument(
        "--tokens-column", default="tokens", help="token-cls: words, a list or space-separated"
    )
    columns.add_argument("--tags-column", default="tags", help="token-cls: one tag per word")
    columns.add_argument("--question-column", default="question", help="qa")
    columns.add_argument("--context-column", default="context", help="qa")
    columns.add_argument(
        "--answers-column", default="answers", help="qa: SQuAD dict, or the answer text"
    )
    columns.add_argument(
        "--answer-start-column",
        default="answer_start",
        help="qa: start character of the answer text",
    )


def _finetune_training(parser: argparse.ArgumentParser) -> None:
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=3)
    training.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    training.add_argument("--batch-size", type=int, default=16)
    training.add_argument("--gradient-accumulation-steps", type=int, default=1)
    training.add_argument("--learning-rate", type=float, default=5e-4)
    training.add_argument("--weight-decay", type=float, default=0.01)
    training.add_argument("--warmup-ratio", type=float, default=0.1)
    training.add_argument(
        "--max-length", type=int, default=128, help="truncate examples to this many tokens"
    )
    training.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    training.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations: less memory"
    )
    training.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="shuffle freely (default: batch examples of similar length together, less padding)",
    )
    training.add_argument("--seed", type=int, default=0)


def _add_finetune(commands: Any) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a head on a CSV/JSONL file; saves the best epoch as a model folder",
        description="Fine-tune with AdamW, linear warmup and decay; evaluate after each epoch; "
        "keep the best epoch's model in --out (a normal model folder) and the latest state in "
        "--out/training_state for --resume.",
    )
    parser.add_argument("task", choices=FINETUNE_TASKS)
    parser.add_argument(
        "--train", required=True, metavar="FILE", help="training data: .csv, .tsv or .jsonl"
    )
    parser.add_argument(
        "--eval",
        metavar="FILE",
        help="evaluation data, same format (metrics each epoch; picks the best epoch)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    parser.add_argument("--resume", action="store_true", help="continue from --out/training_state")
    parser.add_argument(
        "--model", metavar="PATH_OR_NAME", help=f"starting model (default: {DEFAULT_LM})"
    )
    parser.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    _finetune_columns(parser)
    _finetune_training(parser)
    parser.set_defaults(run=_finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bloomlm",
        description="BLOOM language models in PyTorch and JAX/Flax, a drop-in for transformers' "
        f"BLOOM classes. Without --model, commands use the embedded {DEFAULT_LM} (and "
        f"{DEFAULT_CLASSIFIER} for classify), so they work offline right after install.",
        epilog='Try: bloomlm generate "A list is" --seed 0',
    )
    parser.add_argument("--version", action="version", version=f"bloomlm {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (
        _add_generate,
        _add_classify,
        _add_tag,
        _add_answer,
        _add_convert,
        _add_info,
        _add_finetune,
    ):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"bloomlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bloomlm generate ... | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except Exception as err:  # one clear line for users; --debug for the traceback
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"bloomlm {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
