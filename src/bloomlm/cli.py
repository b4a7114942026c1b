"""The `bloomlm` command line: thin argparse front ends over the library; no model math here.

    bloomlm generate "Once upon a time"          stream a continuation from the embedded bloomlm-tiny
    bloomlm classify "I love this"               label + probability (embedded bloomlm-tiny-sentiment)
    bloomlm tag --model DIR "text"               token -> label table
    bloomlm answer --model DIR --question Q --context C
    bloomlm convert SRC DST [--to safetensors|bin|flax] [--dtype] [--max-shard-size]
    bloomlm info [PATH] [--batch B --length L]   shapes, parameters, bytes, memory estimate
    bloomlm finetune {seq-cls,token-cls,qa,causal-lm} --train F --eval F --out DIR

Errors are one line on stderr and a non-zero exit (2 for bad arguments, 1 otherwise); `--debug` shows the
traceback. Progress bars go to stderr, only when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from bloomlm import __version__
from bloomlm.config import BloomConfig

DEFAULT_LM = "bloomlm-tiny"
DEFAULT_CLASSIFIER = "bloomlm-tiny-sentiment"
DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
HEAD_CLASSES = (
    "BloomModel",
    "BloomForCausalLM",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
)


class CommandError(Exception):
    """A user-facing problem: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (with a pointer to --help), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- shared helpers -----------------------------------------------------------------------------------------


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
        raise CommandError("no input: give the text as an argument, pass --file FILE, or pipe lines on stdin")
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
            f"no {what} model ships with bloomlm: pass --model PATH (a BLOOM {what} folder, or one trained with "
            f"`bloomlm finetune {task}`)"
        )


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


# -- generate ------------------------------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> int:
    import torch

    from bloomlm import TextStreamer

    prompts = _read_lines(args, args.prompt)
    _check_positive(args, "max_new_tokens", "num_beams", "batch_size")
    if args.temperature < 0:
        raise CommandError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = _load("BloomForCausalLM", args)
    options = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.temperature > 0,
        "num_beams": args.num_beams,
        "repetition_penalty": args.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if args.temperature > 0:
        options |= {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    stream = len(prompts) == 1 and args.num_beams == 1 and not args.jsonl
    if stream:  # print each word as soon as it is final
        inputs = tokenizer(prompts, return_tensors="pt").to(model.device)
        streamer = TextStreamer(tokenizer, skip_prompt=args.only_new, skip_special_tokens=True)
        model.generate(**inputs, streamer=streamer, **options)
        return 0
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
    return 0


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


# -- classify, tag, answer ----------------------------------------------------------------------------------


def _classify(args: argparse.Namespace) -> int:
    from bloomlm.finetune import classify

    texts = _read_lines(args, args.text)
    _check_positive(args, "batch_size")
    model, tokenizer = _load("BloomForSequenceClassification", args)
    batches = list(_chunks(texts, args.batch_size))
    for batch in _progress(batches, len(batches), "classifying"):
        for text, result in zip(batch, classify(model, tokenizer, batch, batch_size=args.batch_size)):
            if args.jsonl:
                _print_json({"text": text, **result})
            else:
                print(f"{result['label']}\t{result['score']:.4f}\t{text}", flush=True)
    return 0


def _tag(args: argparse.Namespace) -> int:
    _require_model(args, "token-classification", "token-cls")
    from bloomlm.finetune import tag

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
    from bloomlm.finetune import answer_question

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
            f"answer\t{result['answer']}\nscore\t{result['score']:.4f}\nstart\t{result['start']}\nend\t{result['end']}"
        )
    return 0


# -- convert ---------------------------------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    from bloomlm.hub import resolve_model_dir

    source = resolve_model_dir(args.src, ["config.json"])
    destination = Path(args.dst)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise CommandError(f"{destination} already exists; convert writes a new folder and never overwrites one")
    if args.dtype == "int8":
        raise CommandError("--dtype int8 is for loading (quantize='int8'); convert writes float32, float16 or bfloat16")
    config = BloomConfig.from_pretrained(source)
    architecture = next((a for a in config.architectures or [] if a in HEAD_CLASSES), "BloomForCausalLM")
    destination.parent.mkdir(parents=True, exist_ok=True)
    from bloomlm.finetune import staging_dir

    staging = staging_dir(destination.parent, destination.name)
    try:
        bar = _bar(2, f"converting to {args.to}")
        _convert_weights(source, staging, architecture, args)
        bar.update(1)
        _copy_tokenizer(source, staging)
        bar.update(1)
        bar.close()
        if destination.exists():
            destination.rmdir()  # empty, checked above
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.to} weights ({architecture}) to {destination}")
    return 0


def _has_torch_weights(folder: Path) -> bool:
    from bloomlm.checkpoint import WEIGHT_FILE_CANDIDATES

    return any((folder / name).is_file() for name in WEIGHT_FILE_CANDIDATES)


def _convert_weights(source: Path, staging: Path, architecture: str, args: argparse.Namespace) -> None:
    import bloomlm

    has_torch = _has_torch_weights(source)
    if args.to == "flax":
        flax_class = getattr(bloomlm, "Flax" + architecture, None)
        if flax_class is None:
            raise CommandError(f"there is no Flax class for {architecture}")
        param_dtype = None if args.dtype == "auto" else args.dtype
        model = flax_class.from_pretrained(source, from_pt=has_torch, param_dtype=param_dtype)
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        return
    torch_class = getattr(bloomlm, architecture)
    kwargs: dict[str, Any] = {"torch_dtype": "auto" if args.dtype == "auto" else args.dtype}
    if not has_torch:
        kwargs["state_dict"] = _flax_state_dict(source)
        if args.dtype == "auto":
            kwargs["torch_dtype"] = next(iter(kwargs["state_dict"].values())).dtype
    model = torch_class.from_pretrained(source, **kwargs)
    model.save_pretrained(staging, safe_serialization=args.to == "safetensors", max_shard_size=args.max_shard_size)


def _flax_state_dict(source: Path) -> dict[str, Any]:
    """PyTorch tensors (transformers' names) from a folder holding only Flax msgpack weights."""
    import numpy as np
    import torch

    from bloomlm.flax import files, weights

    config = BloomConfig.from_pretrained(source)
    arrays = weights.flax_to_torch(files.read_msgpack(source), config)
    tensors = {}
    for name, array in arrays.items():
        if array.dtype.name == "bfloat16":  # NumPy has no bfloat16; go through float32
            tensors[name] = torch.from_numpy(np.asarray(array, dtype=np.float32)).to(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(np.array(array))  # a writable copy, as torch wants
    return tensors


def _copy_tokenizer(source: Path, staging: Path) -> None:
    from bloomlm.tokenizer import BloomTokenizerFast

    if (source / "tokenizer.json").is_file():
        BloomTokenizerFast.from_pretrained(source).save_pretrained(staging)
    generation = source / "generation_config.json"
    if generation.is_file() and not (staging / generation.name).exists():
        shutil.copy2(generation, staging / generation.name)


# -- info --------------------------------------------------------------------------------------------------------


def memory_estimate(config: BloomConfig, n_params: int, dtype: str, batch: int, length: int) -> dict[str, int]:
    """Rough bytes to run `batch` sequences of `length` tokens (prompt + generated) in `dtype`.

    weights; KV cache (keys and values of every layer); the prompt's attention bias/scores
    [B, H, L, L]; hidden activations of one block ([B, L, 4*hidden] MLP intermediate and a few [B, L, hidden]);
    last-position logits [B, vocab] in float32.
    """
    size = BYTES_PER_DTYPE[dtype]
    compute = 2 if dtype == "int8" else size  # int8 weights compute in half precision
    weights = n_params * size
    if dtype == "int8":  # plus a float32 scale per output row of each matrix (embedding: vocab; a block: 9 hidden)
        weights += (config.vocab_size + 9 * config.n_layer * config.hidden_size) * 4
    estimate = {
        "weights": weights,
        "kv_cache": 2 * config.n_layer * batch * length * config.hidden_size * compute,
        "attention": batch * config.n_head * length * length * compute,
        "activations": batch * length * 8 * config.hidden_size * compute,
        "logits": batch * config.vocab_size * 4,
    }
    estimate["total"] = sum(estimate.values())
    return estimate


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _info(args: argparse.Namespace) -> int:
    """Config summary, parameter count (counted on the meta device: no memory for weights), memory estimate."""
    import torch

    from bloomlm.torch.model import BloomForCausalLM

    _check_positive(args, "batch", "length")
    config = BloomConfig.from_pretrained(args.path)
    with torch.device("meta"):
        n_params = BloomForCausalLM(config).num_parameters()
    dtypes = list(BYTES_PER_DTYPE) if args.dtype == "auto" else [args.dtype]
    summary = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "head_dim": config.hidden_size // config.n_head,
        "pretraining_tp": config.pretraining_tp,
        "torch_dtype": config.torch_dtype,
        "architectures": config.architectures,
        "parameters": n_params,
    }
    summary |= {f"bytes_{BYTES_NAME.get(d, d)}": n_params * BYTES_PER_DTYPE[d] for d in BYTES_PER_DTYPE}
    memory = {d: memory_estimate(config, n_params, d, args.batch, args.length) for d in dtypes}
    if args.json:
        _print_json(summary | {"memory_estimate": {"batch": args.batch, "length": args.length, **memory}})
        return 0
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) and key.startswith(("parameters", "bytes")) else value
        if key.startswith("bytes"):
            shown = f"{shown} ({_human(value)})"
        print(f"{key:<16} {shown}")
    print(f"\nestimated memory for batch {args.batch} x length {args.length} (generation; rough):")
    parts = list(next(iter(memory.values())))
    print(f"{'':<12}" + "".join(f"{d:>12}" for d in dtypes))
    for part in parts:
        print(f"{part:<12}" + "".join(f"{_human(memory[d][part]):>12}" for d in dtypes))
    return 0


BYTES_NAME = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8"}


# -- finetune ------------------------------------------------------------------------------------------------


def _finetune(args: argparse.Namespace) -> int:
    from bloomlm.finetune import FinetuneConfig, finetune

    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    config = FinetuneConfig(
        task=args.task,
        train_file=args.train,
        eval_file=args.eval,
        out_dir=args.out,
        model=args.model or DEFAULT_LM,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        labels=labels,
        tokens_column=args.tokens_column,
        tags_column=args.tags_column,
        question_column=args.question_column,
        context_column=args.context_column,
        answers_column=args.answers_column,
        answer_start_column=args.answer_start_column,
        max_length=args.max_length,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        group_by_length=args.group_by_length,
        seed=args.seed,
        device=args.device or "cpu",
        threads=args.threads,
    )
    result = finetune(config, resume=args.resume)
    best = ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items())
    print(f"best model ({best}) saved to {result.out_dir}")
    return 0


# -- the parser ------------------------------------------------------------------------------------------------


def _model_options(parser: argparse.ArgumentParser, default: str | None, default_note: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=default, metavar="PATH_OR_NAME", help=f"model folder or name ({default_note})"
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1, mps, or auto (default: cpu)")
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights dtype; auto = the checkpoint's (default: float32 on CPU, auto on other devices); "
        "int8 = weight-only int8 quantization",
    )


def _add_generate(commands) -> None:
    parser = commands.add_parser(
        "generate",
        help="continue text prompts (streams a single prompt word by word)",
        description="Continue prompts. One prompt streams to the terminal as it is generated; several (from "
        "--file or stdin, one per line) run in batches and print their results separated by blank lines "
        "(--jsonl: one JSON object per line).",
    )
    parser.add_argument("prompt", nargs="*", help="prompt text (else --file, else lines from stdin)")
    parser.add_argument("--file", help="read prompts from this file, one per line")
    _model_options(parser, DEFAULT_LM, f"default: the embedded {DEFAULT_LM}")
    sampling = parser.add_argument_group("decoding")
    sampling.add_argument("--max-new-tokens", type=int, default=40)
    sampling.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default: 0.8)")
    sampling.add_argument("--top-k", type=int, default=50)
    sampling.add_argument("--top-p", type=float, default=0.95)
    sampling.add_argument("--repetition-penalty", type=float, default=1.2)
    sampling.add_argument("--num-beams", type=int, default=1)
    sampling.add_argument("--seed", type=int, help="fix the random seed, so sampling repeats exactly")
    output = parser.add_argument_group("output")
    output.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    output.add_argument("--only-new", action="store_true", help="print only the generated text, not the prompt")
    output.add_argument("--jsonl", action="store_true", help='one JSON object per prompt: {"prompt", "generated"}')
    parser.set_defaults(run=_generate)


def _add_classify(commands) -> None:
    parser = commands.add_parser(
        "classify",
        help="label texts with a sequence-classification model (default: sentiment)",
        description="Print label, probability and text, tab-separated, for each text.",
    )
    parser.add_argument("text", nargs="*", help="texts (else --file, else lines from stdin)")
    parser.add_argument("--file", help="read texts from this file, one per line")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--jsonl", action="store_true", help='one JSON object per text: {"text", "label", "score", "scores"}'
    )
    _model_options(parser, DEFAULT_CLASSIFIER, f"default: the embedded {DEFAULT_CLASSIFIER}, positive/negative")
    parser.set_defaults(run=_classify)


def _add_tag(commands) -> None:
    parser = commands.add_parser(
        "tag",
        help="label every token with a token-classification model (needs --model)",
        description="Print a token/label/score table per text.",
    )
    parser.add_argument("text", nargs="*", help="texts (else --file, else lines from stdin)")
    parser.add_argument("--file", help="read texts from this file, one per line")
    parser.add_argument("--jsonl", action="store_true", help="one JSON object per text")
    _model_options(parser, None, "required: no tagging model ships with bloomlm")
    parser.set_defaults(run=_tag)


def _add_answer(commands) -> None:
    parser = commands.add_parser(
        "answer",
        help="extract the answer to a question from a context (needs --model)",
        description="Print the answer span, its probability and its character offsets in the context.",
    )
    parser.add_argument("--question", required=True)
    parser.add_argument("--context", help="the text to find the answer in")
    parser.add_argument("--context-file", help="read the context from this file")
    parser.add_argument("--max-length", type=int, help="truncate question + context to this many tokens")
    parser.add_argument("--json", action="store_true", help='print {"answer", "score", "start", "end"}')
    _model_options(parser, None, "required: no question-answering model ships with bloomlm")
    parser.set_defaults(run=_answer)


def _add_convert(commands) -> None:
    parser = commands.add_parser(
        "convert",
        help="rewrite a model folder: .bin -> safetensors, PyTorch <-> Flax, re-shard, change dtype",
        description="Write SRC's model (config, weights, tokenizer) to the new folder DST. DST is built in a "
        "temporary folder and renamed into place, so a failure leaves nothing behind.",
    )
    parser.add_argument("src", help="model folder or name to read (PyTorch .bin/.safetensors or Flax msgpack)")
    parser.add_argument("dst", help="new folder to write (must not exist, or be empty)")
    parser.add_argument("--to", choices=("safetensors", "bin", "flax"), default="safetensors", help="output format")
    parser.add_argument("--dtype", choices=DTYPES[:-1], default="auto", help="cast floating weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size")
    parser.set_defaults(run=_convert)


def _add_info(commands) -> None:
    parser = commands.add_parser(
        "info",
        help="summarise a model: shapes, parameter count, bytes per dtype, memory estimate",
        description="Read only config.json: nothing is loaded, so this is instant for any size.",
    )
    parser.add_argument(
        "path", nargs="?", default=DEFAULT_LM, help=f"model folder, config.json or name (default: {DEFAULT_LM})"
    )
    parser.add_argument("--batch", type=int, default=1, help="batch size for the memory estimate (default: 1)")
    parser.add_argument(
        "--length", type=int, default=2048, help="tokens per sequence, prompt + generated (default: 2048)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="estimate for this dtype only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=_info)


def _add_finetune(commands) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a head on a CSV/JSONL file; saves the best epoch as a model folder",
        description="Fine-tune with AdamW, linear warmup and decay; evaluate after each epoch; keep the best "
        "epoch's model in --out (a normal model folder) and the latest state in --out/training_state for --resume.",
    )
    parser.add_argument("task", choices=("seq-cls", "token-cls", "qa", "causal-lm"))
    parser.add_argument("--train", required=True, metavar="FILE", help="training data: .csv, .tsv or .jsonl")
    parser.add_argument(
        "--eval", metavar="FILE", help="evaluation data, same format (metrics each epoch; picks the best epoch)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    parser.add_argument("--resume", action="store_true", help="continue from --out/training_state")
    parser.add_argument("--model", default=None, metavar="PATH_OR_NAME", help=f"starting model (default: {DEFAULT_LM})")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    columns = parser.add_argument_group("columns")
    columns.add_argument("--text-column", default="text", help="seq-cls, causal-lm (default: text)")
    columns.add_argument("--text-pair-column", help="seq-cls: optional second text")
    columns.add_argument("--label-column", default="label", help="seq-cls (default: label)")
    columns.add_argument("--labels", help="seq-cls/token-cls: comma-separated label names in id order")
    columns.add_argument("--tokens-column", default="tokens", help="token-cls: words, a list or space-separated")
    columns.add_argument("--tags-column", default="tags", help="token-cls: one tag per word")
    columns.add_argument("--question-column", default="question", help="qa")
    columns.add_argument("--context-column", default="context", help="qa")
    columns.add_argument("--answers-column", default="answers", help="qa: SQuAD dict, or the answer text")
    columns.add_argument("--answer-start-column", default="answer_start", help="qa: start character of the answer text")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=3)
    training.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    training.add_argument("--batch-size", type=int, default=16)
    training.add_argument("--gradient-accumulation-steps", type=int, default=1)
    training.add_argument("--learning-rate", type=float, default=5e-4)
    training.add_argument("--weight-decay", type=float, default=0.01)
    training.add_argument("--warmup-ratio", type=float, default=0.1)
    training.add_argument("--max-length", type=int, default=128, help="truncate examples to this many tokens")
    training.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    training.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    training.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="shuffle freely (default: batch examples of similar length together, less padding)",
    )
    training.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=_finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bloomlm",
        description="BLOOM language models in PyTorch and JAX/Flax, a drop-in for transformers' BLOOM classes. "
        f"Without --model, commands use the embedded {DEFAULT_LM} (and {DEFAULT_CLASSIFIER} for classify), "
        "so they work offline right after install.",
        epilog='Try: bloomlm generate "A list is" --seed 0',
    )
    parser.add_argument("--version", action="version", version=f"bloomlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_generate, _add_classify, _add_tag, _add_answer, _add_convert, _add_info, _add_finetune):
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
