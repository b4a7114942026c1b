"""The `bloomlm` command line: argparse front ends that call the library and print; no model math
and no file-format knowledge here (those live in `bloomlm.tasks`, `bloomlm.convert`,
`bloomlm.finetune`).

    bloomlm generate "Once upon a time"         continue text (embedded bloomlm-tiny), streamed
    bloomlm generate -i                         a prompt loop
    bloomlm classify "I love this"              label + probability (bloomlm-tiny-sentiment)
    bloomlm tag --model DIR "text"              word -> label table
    bloomlm answer --model DIR --question Q --context C
    bloomlm convert SRC DST [--to safetensors|bin|flax] [--dtype] [--quantize] [--max-shard-size]
    bloomlm info [PATH] [--batch B --length L]  shapes, parameters, bytes, memory estimate
    bloomlm finetune {seq-cls,token-cls,qa,causal-lm} --train F --eval F --out DIR
    bloomlm serve [--model PATH] [--port 8000]  an OpenAI-compatible server (bloomlm.serving)

Errors are one line on stderr and a non-zero exit: 2 for a bad command line (found when it is
parsed, before any model loads; the message names the flag and points to the command's own
--help), 1 for everything else; `--debug`, before or after the command, shows the traceback.
Progress bars go to stderr only when it is a terminal, and are cleared before each result is
printed. Each command imports only what it needs: `--help`, argument errors and `info` never
import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from bloomlm import __version__
from bloomlm.checkpoint_names import QUANTIZE_MODES
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

_STARTED = time.perf_counter()  # about when the process started: --verbose reports from here

DEFAULT_LM = "bloomlm-tiny"
DEFAULT_CLASSIFIER = "bloomlm-tiny-sentiment"
DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
FINETUNE_TASKS = ("seq-cls", "token-cls", "qa", "causal-lm")
AGGREGATIONS = ("none", "first", "average", "max")  # bloomlm.tasks.AGGREGATIONS (no torch here)
DEVICES = "cpu, cuda, cuda:N, mps or auto"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps|auto")

# The CLI's own decoding defaults. Each applies only when neither a flag (or a JSONL request) nor
# the folder's generation_config.json sets it, and the sampling ones only when sampling.
GENERATE_DEFAULTS = {
    "max_new_tokens": 40,
    "do_sample": True,
    "temperature": 0.8,
    "top_k": 50,
    "top_p": 0.95,
    "repetition_penalty": 1.2,
}
# GenerationConfig's own values of the sampling-only settings: greedy decoding with nothing ignored.
_NOT_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
# generate flags that are generate() keywords; a JSONL request may set each of them, too.
_DECODING_FLAGS = (
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "num_beams",
    "num_return_sequences",
    "no_repeat_ngram_size",
)
_REQUEST_KEYS = ("prompt", *_DECODING_FLAGS, "seed", "stop", "ignore_eos")
# Below this many parameters one CPU thread is fastest: each op is too small to split, and on a
# busy machine a second thread only waits.
SMALL_MODEL_PARAMETERS = 20_000_000
# The part of each model class a folder may lack, and the finetune task that trains it.
_HEADS = {
    "BloomForCausalLM": ("lm_head", "causal-lm"),
    "BloomForSequenceClassification": ("score", "seq-cls"),
    "BloomForTokenClassification": ("classifier", "token-cls"),
    "BloomForQuestionAnswering": ("qa_outputs", "qa"),
}


class CommandError(Exception):
    """A user-facing problem: printed as one line, exit status 1."""


class UsageError(CommandError):
    """A command-line problem found while running: one line pointing to --help, exit status 2."""


# -- parser machinery ------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help line ends with its default (None and on/off flags have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is argparse.SUPPRESS:
            return text
        if isinstance(default, bool) or (not action.option_strings and action.nargs != "?"):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (pointing to this command's --help),
    exit status 2, and every help page shows the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


Check = Callable[[Any], "str | None"]


def _at_least(low: int) -> Check:
    return lambda value: None if value >= low else f"must be at least {low}, got {value}"


def _between(
    low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Check:
    """A range check; the message writes the range as an interval: "must be in (0, 1], got 1.5"."""

    def check(value: float) -> str | None:
        above = value > low if low_open else value >= low
        below = high is None or (value < high if high_open else value <= high)
        if above and below:
            return None
        if high is None:
            return f"must be {'>' if low_open else '>='} {low}, got {value}"
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        return f"must be in {interval}, got {value}"

    return check


def _device_check(value: str) -> str | None:
    return None if _DEVICE.fullmatch(value) else f"must be {DEVICES}, got {value!r}"


def _size_check(value: str) -> str | None:
    from bloomlm.files import parse_size

    try:
        parse_size(value)
    except ValueError:
        return f"must be a size such as 5GB, 200MB or 10KiB, got {value!r}"
    return None


def _count_option(group: Any, flag: str, minimum: int, **kwargs: Any) -> argparse.Action:
    """An integer option of at least `minimum` (a count, a size, a port)."""
    return _checked(group.add_argument(flag, type=int, **kwargs), _at_least(minimum))


def _checked(action: argparse.Action, check: Check) -> argparse.Action:
    action.check = check  # run by _check_arguments once the command line is parsed
    return action


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range checks of single options, then the command's checks across options: parser.error on
    the first problem, so a bad value never waits for a model to load."""
    for action in parser._actions:
        check = getattr(action, "check", None)
        value = getattr(args, action.dest, None)
        if check is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            message = check(item)
            if message:
                parser.error(f"{action.option_strings[0]} {message}")
    validate = getattr(args, "validate", None)
    message = validate(args) if validate is not None else None
    if message:
        parser.error(message)


def _given_options(argv: list[str]) -> set[str]:
    """The option names (dests) written on the command line `argv`, defaults left out."""
    parser = build_parser()
    pending = [parser]
    while pending:  # every (sub)parser: options default to "absent"
        current = pending.pop()
        for action in current._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    args, _ = parser.parse_known_args(argv)
    return set(vars(args))


# -- input, output and progress --------------------------------------------------------------------


class _Line(NamedTuple):
    text: str
    where: str  # "line 3 of FILE" for messages; "" for a command-line argument


def _read_lines(args: argparse.Namespace, positional: list[str]) -> list[_Line]:
    """Texts from the command line, else `--file` (one per line; '-' is stdin), else piped stdin."""
    if positional:
        return [_Line(text, "") for text in positional]
    source = getattr(args, "file", None)
    text, name = _read_input(source, "--file")
    if getattr(args, "one_prompt", False):
        return [_Line(text.rstrip("\n"), name)] if text.strip() else []
    return [
        _Line(line, f"line {number} of {name}")
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]


def _read_input(source: str | None, flag: str) -> tuple[str, str]:
    """(text, name for messages) of `source`: a file, '-' for stdin, or None for piped stdin."""
    if source == "-" or (source is None and not sys.stdin.isatty()):
        return sys.stdin.read(), "stdin"
    if source is None:
        raise UsageError(
            "no input: give the text as an argument, pass --file FILE, or pipe lines on stdin"
        )
    path = Path(source)
    if not path.is_file():
        raise CommandError(f"{flag} {path}: no such file")
    return path.read_text(encoding="utf-8"), str(path)


def _nonempty(lines: list[_Line], args: argparse.Namespace) -> list[_Line]:
    if not lines:
        where = "stdin" if getattr(args, "file", None) in (None, "-") else args.file
        raise CommandError(f"no input: {where} holds no non-empty lines")
    return lines


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Progress:
    """A tqdm bar on stderr when it is a terminal (else nothing), and the way to print results
    while it shows: the bar is cleared first and redrawn after, so a result never glues onto it."""

    def __init__(self, total: int, description: str, unit: str = "it") -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
            self.bar = tqdm(
                total=total, desc=description, unit=unit, leave=False, file=sys.stderr, **scale
            )

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        print(text, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _json_line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- loading ---------------------------------------------------------------------------------------


def _load(
    model_class_name: str,
    args: argparse.Namespace,
    run_tokens: int | None = None,
    **tokenizer_kwargs: Any,
) -> tuple:
    """(model, tokenizer) for `args.model` with --dtype, --device and --threads applied;
    `run_tokens` (the most tokens generate makes) picks the kernel of a saved int8 folder.

    Refuses a folder whose weights lack part of the model: its answers would come from random
    weights (a head never trained for this task, most often).
    """
    from bloomlm.config import BloomConfig

    config = BloomConfig.from_pretrained(args.model)
    _set_threads(args, config, model_class_name)
    import bloomlm

    kwargs: dict[str, Any] = {}
    quantize = _quantize_arg(args) or _saved_int8_kernel(args, config, run_tokens)
    if quantize is not None:
        kwargs["quantize"] = quantize
    if args.dtype not in (None, "int8"):
        kwargs["torch_dtype"] = args.dtype
    elif args.device and not args.device.startswith("cpu"):
        kwargs["torch_dtype"] = "auto"  # on an accelerator, the checkpoint's own (half) precision
    else:
        kwargs["torch_dtype"] = "float32"  # CPUs are fastest and most exact in float32
    if args.device:
        kwargs["device_map"] = args.device
    if getattr(args, "tensor_parallel_rank", False):
        kwargs["tp_plan"] = "auto"  # one process of `generate --tensor-parallel N`
    bar = _Progress(2, f"loading {args.model}")
    tokenizer = bloomlm.AutoTokenizer.from_pretrained(args.model, **tokenizer_kwargs)
    bar.update()
    model = _from_pretrained(getattr(bloomlm, model_class_name), args.model, kwargs)
    bar.update()
    bar.close()
    return model, tokenizer


def _set_threads(args: argparse.Namespace, config: Any, model_class_name: str) -> None:
    """torch's CPU threads: --threads, else one for a small model (see SMALL_MODEL_PARAMETERS)."""
    import torch

    threads = getattr(args, "threads", None)
    if threads is None and parameter_count(config, model_class_name) < SMALL_MODEL_PARAMETERS:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def _from_pretrained(model_class: Any, name: str, kwargs: dict[str, Any]) -> Any:
    from bloomlm.errors import CheckpointNotFoundError

    try:
        with warnings.catch_warnings(record=True) as caught, _held_log_records() as records:
            warnings.simplefilter("always")
            model, info = model_class.from_pretrained(name, output_loading_info=True, **kwargs)
    except CheckpointNotFoundError:
        _refuse_flax_only(name)
        raise
    missing = info["missing_keys"]
    if missing:  # the refusal says it all; the library's warning about it would repeat it
        raise CommandError(_untrained_message(name, model_class.__name__, missing))
    for warning in caught:  # the folder is usable: pass on what the library warned about
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    for record in records:
        logging.getLogger(record.name).handle(record)
    return model


@contextlib.contextmanager
def _held_log_records() -> Iterator[list[logging.LogRecord]]:
    """Hold back what bloomlm logs while loading (transformers' "newly initialised" warning), so
    a refusal prints alone; the caller passes the records on when the folder is usable."""
    records: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    library_logger = logging.getLogger("bloomlm")
    handler, propagate = Hold(), library_logger.propagate
    library_logger.addHandler(handler)
    library_logger.propagate = False
    try:
        yield records
    finally:
        library_logger.removeHandler(handler)
        library_logger.propagate = propagate


def _untrained_message(name: str, class_name: str, missing: list[str]) -> str:
    head, task = _HEADS.get(class_name, ("", ""))
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    train = (
        f"train one with `bloomlm finetune {task} --model {name} --train FILE --out DIR`, "
        "then pass --model DIR"
    )
    if head and all(key.split(".")[0] == head for key in missing):
        return f"{name} has no trained {head} head ({shown} not in its weights): {train}"
    return f"{name} lacks weights this command needs ({shown}), so it would answer at random"


def _refuse_flax_only(name: str) -> None:
    """A clearer error for a folder holding only Flax weights: the commands run PyTorch."""
    from bloomlm.convert import weight_formats
    from bloomlm.hub import resolve_model_dir

    try:
        formats = weight_formats(resolve_model_dir(name, ["config.json"]))
    except Exception:  # the original error says more than a second failure would
        return
    if formats == {"flax"}:
        raise CommandError(
            f"{name} holds only Flax weights (flax_model.msgpack) and the commands run PyTorch: "
            f"convert them once with `bloomlm convert {name} {name}-pytorch`, then pass "
            f"--model {name}-pytorch"
        )


def _saved_int8_kernel(args: argparse.Namespace, config: Any, tokens: int | None) -> str | None:
    """The int8 kernel for a folder saved with int8 weights when no --quantize says: W8A8 for
    runs that make at least W8A8_MIN_TOKENS tokens, weight-only below (None: the library's
    choice, W8A8, for runs of unknown length). Noted in `args.kernel_note` for --verbose."""
    saved = (getattr(config, "quantization", None) or {}).get("format")
    if saved != "int8" or tokens is None or args.device not in (None, "cpu"):
        return None
    if tokens >= W8A8_MIN_TOKENS:
        args.kernel_note = f"int8 weights run W8A8 (up to {tokens} new tokens: packing pays)"
        return "int8"
    args.kernel_note = (
        f"int8 weights run weight-only (up to {tokens} new tokens, under the {W8A8_MIN_TOKENS} "
        "where packing for W8A8 pays; --quantize int8 forces W8A8)"
    )
    return "int8-weight-only"


def _quantize_arg(args: argparse.Namespace) -> str | None:
    """`--quantize`, or the deprecated `--dtype int8` (its alias, with a warning on stderr)."""
    if getattr(args, "dtype", None) != "int8":
        return args.quantize
    if args.quantize not in (None, "int8"):
        raise CommandError(f"--dtype int8 and --quantize {args.quantize} disagree; use --quantize")
    print(
        f"bloomlm {args.command}: warning: --dtype int8 is deprecated, use --quantize int8",
        file=sys.stderr,
    )
    return "int8"


def _require_model(args: argparse.Namespace, what: str, task: str) -> None:
    if args.model is None:
        raise CommandError(
            f"no {what} model ships with bloomlm: pass --model PATH (a BLOOM {what} folder, or one "
            f"trained with `bloomlm finetune {task}`)"
        )


# -- generate --------------------------------------------------------------------------------------

# `--compile auto` compiles the decode step only for runs of at least this many decode steps
# (batches x --max-new-tokens): below it, compiling costs more time than it saves (README,
# "Compiled decoding").
COMPILE_MIN_STEPS = 4096
DEFAULT_MODEL_LEN = 2048  # the usable length when neither --max-model-len nor the config says
# A folder saved with int8 weights (`convert --quantize int8`) holds what both int8 kernels run.
# W8A8 decodes faster but packs its weights for fbgemm at load (measured on the 560m shape, 2
# cores: load 3.8-4.3 s vs 0.15 s weight-only), so generate runs it only when the run makes at least
# this many tokens (prompts x --max-new-tokens): the whole command broke even at about 200 tokens
# both at 1 x 200 and at 8 x 40 (benchmarks/CLI_INT8.md, which measures it both ways).
W8A8_MIN_TOKENS = 256


# Plain classes rather than dataclasses here: importing `dataclasses` (and `inspect`) would cost
# `bloomlm --help` a fifth of its time.


class _Request:
    """One prompt and how to continue it: the decoding flags given, overridden by its JSONL line."""

    def __init__(
        self, prompt: str, given: dict[str, Any], seed: int | None, stop: tuple, ignore_eos: bool
    ) -> None:
        self.prompt = prompt
        self.given = given  # generate() keywords set by a flag or the request
        self.seed, self.stop, self.ignore_eos = seed, stop, ignore_eos

    def group(self) -> str:
        """Requests with the same group run in one batch."""
        return json.dumps([self.given, self.seed, self.stop, self.ignore_eos], sort_keys=True)


class _Stats:
    """What --verbose reports."""

    def __init__(self, loaded_in: float) -> None:
        self.tokens, self.seconds, self.loaded_in = 0, 0.0, loaded_in
        self.first_token_at: float | None = None

    def report(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        line = f"{self.tokens} new tokens in {self.seconds:.2f} s ({rate:.1f} tokens/s)"
        if self.first_token_at is not None:
            line += f"; first token {self.first_token_at - _STARTED:.2f} s after start"
        return f"{line}; model loaded in {self.loaded_in:.2f} s"


def _decoding_settings(given: dict[str, Any], folder: dict[str, Any]) -> dict[str, Any]:
    """generate() keywords: `given` (flags, a JSONL request), over the folder's generation config
    (`folder`: what its generation_config.json sets), over GENERATE_DEFAULTS.

    `temperature` 0 means plain greedy. Greedy decoding (that, or a folder that does not sample)
    gets none of the CLI's sampling defaults, no default repetition penalty, and the sampling-only
    settings reset, so the library has nothing to ignore or warn about.
    """
    settings = {k: v for k, v in GENERATE_DEFAULTS.items() if k not in folder}
    if "max_length" in folder:
        settings.pop("max_new_tokens", None)
    given = dict(given)
    if "temperature" in given:
        temperature = given.pop("temperature")
        settings["do_sample"] = temperature > 0
        if temperature > 0:
            settings["temperature"] = temperature
    if not settings.get("do_sample", folder.get("do_sample", False)):
        settings.pop("repetition_penalty", None)  # present only as the CLI's default
        settings |= _NOT_SAMPLING
    return settings | given


def _folder_settings(name: str) -> dict[str, Any]:
    """The generation settings the model folder's generation_config.json sets (token ids and
    bookkeeping left out), each exactly as written: they win over the CLI's defaults."""
    from bloomlm.files import read_json_object
    from bloomlm.generation import GENERATION_CONFIG_NAME
    from bloomlm.hub import resolve_model_dir

    path = resolve_model_dir(name, ["config.json"]) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return {}
    skip = {"bos_token_id", "eos_token_id", "pad_token_id", "_from_model_config"}
    skip |= {"transformers_version", "_commit_hash"}
    return {k: v for k, v in read_json_object(path).items() if k not in skip}


class _Generator:
    """What every generate path needs: the model, its tokenizer, its folder's generation
    settings, and the counts --verbose reports."""

    def __init__(self, model: Any, tokenizer: Any, folder: dict[str, Any], stats: _Stats) -> None:
        self.model, self.tokenizer, self.folder, self.stats = model, tokenizer, folder, stats
        self.engine: dict[str, Any] = {}  # generate()'s engine keywords (_engine_options)

    def keywords(self, request: _Request) -> dict[str, Any]:
        """generate() keywords for `request`."""
        settings = _decoding_settings(request.given, self.folder)
        if request.ignore_eos:  # never end at the end-of-text token: it is never chosen
            settings["suppress_tokens"] = self.eos_ids()
        return settings

    def eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def run(self, request: _Request, inputs: Any, **extra: Any) -> Any:
        """model.generate on `inputs` for `request` (stop strings included); the sequences."""
        length = inputs["input_ids"].shape[1]
        criteria = []
        if request.stop:
            criteria.append(_StopStrings(self.tokenizer, request.stop, length, self.eos_ids()))
        started = time.perf_counter()
        rows = inputs["input_ids"].shape[0]
        sequences = self.model.generate(
            **inputs,
            stopping_criteria=criteria,
            generator=_seeded_generators(request.seed, self.model.device, rows),
            **self.keywords(request),
            **self.engine,
            **extra,
        )
        self.stats.seconds += time.perf_counter() - started
        new = sequences[:, length:]
        pad = self.model.generation_config.pad_token_id
        self.stats.tokens += int((new != pad).sum()) if pad is not None else new.numel()
        return sequences


def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _cut(text: str, stops: tuple[str, ...]) -> str:
    index = _stop_index(text, stops)
    return text if index is None else text[:index]


class _StopStrings:
    """A stopping criterion: every row's new text holds a stop string or has ended (end of text)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], prompt_length: int, eos: list[int]):
        self.tokenizer, self.stops = tokenizer, stops
        self.prompt_length, self.eos = prompt_length, set(eos)

    def __call__(self, input_ids: Any, scores: Any) -> bool:
        for row in input_ids[:, self.prompt_length :].tolist():
            ended = any(token in self.eos for token in row)
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            if not ended and _stop_index(text, self.stops) is None:
                return False
        return True


class _StreamPrinter:
    """generate()'s streamer for one prompt: writes the continuation as it is made, holding back
    an unfinished character and any text that may still turn into a stop string (never shown)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], stats: _Stats) -> None:
        self.tokenizer, self.stops, self.stats = tokenizer, stops, stats
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        if self.stats.first_token_at is None:
            self.stats.first_token_at = time.perf_counter()
        self.ids += value.reshape(-1).tolist()
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def text(self) -> str:
        return _cut(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = _stop_index(text, self.stops)
        if end is None and not final:
            # Held back: a character still missing bytes, a space the next token may clean up,
            # and what could be the start of a stop string.
            end = len(text.rstrip("\ufffd").rstrip(" ")) - self.hold
        end = len(text) if end is None else end
        if end > self.shown:
            sys.stdout.write(text[self.shown : end])
            sys.stdout.flush()
            self.shown = end


def _engine_options(args: argparse.Namespace, model: Any, prompts: int) -> dict[str, Any]:
    """`generate()`'s engine keywords: the usable length (a longer request fails at once) and
    whether to compile the decode step (`--compile auto`: when the run is long enough to pay)."""
    usable = args.max_model_len or getattr(model.config, "seq_length", None) or DEFAULT_MODEL_LEN
    steps = _decode_steps(args, prompts)
    compile = {"on": True, "off": False}.get(args.compile, steps >= COMPILE_MIN_STEPS)
    return {"max_model_len": usable, "compile": compile}


def _decode_steps(args: argparse.Namespace, prompts: int) -> int:
    """The most decode steps the run takes: batches x --max-new-tokens."""
    return -(-prompts // args.batch_size) * _max_new_tokens(args)


def _max_new_tokens(args: argparse.Namespace) -> int:
    """--max-new-tokens, else the CLI's default: the run length the start-up estimates use."""
    return args.max_new_tokens or GENERATE_DEFAULTS["max_new_tokens"]


def _seeded_generators(seed: int | None, device: Any, count: int) -> Any:
    """With a seed, one generator per prompt, each seeded alike: a prompt's sampled text is then
    the same whatever the batch it runs in (None without a seed: torch's global generator)."""
    if seed is None:
        return None
    import torch

    return [torch.Generator(device=device).manual_seed(seed) for _ in range(count)]


def _generate(args: argparse.Namespace) -> int:
    if args.tensor_parallel:
        return _generate_tensor_parallel(args)
    lines = [] if args.interactive else _nonempty(_read_lines(args, args.prompt), args)
    requests = [_request(args, line) for line in lines]
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    started = time.perf_counter()
    run_tokens = None if args.interactive else max(1, len(requests)) * _max_new_tokens(args)
    model, tokenizer = _load("BloomForCausalLM", args, run_tokens=run_tokens)
    stats = _Stats(loaded_in=time.perf_counter() - started)
    generator = _Generator(model, tokenizer, _folder_settings(args.model), stats)
    generator.engine = _engine_options(args, model, max(1, len(requests)))
    if args.interactive:
        _interactive(args, generator)
    elif _streams(args, requests):
        if not args.only_new:
            sys.stdout.write(requests[0].prompt)
        _stream(generator, requests[0])
        print(flush=True)
    else:
        _generate_batches(args, generator, requests)
    if args.verbose:
        print(f"bloomlm generate: {stats.report()}", file=sys.stderr)
        if getattr(args, "kernel_note", None):
            print(f"bloomlm generate: {args.kernel_note}", file=sys.stderr)
    return 0


def _generate_tensor_parallel(args: argparse.Namespace) -> int:
    """`--tensor-parallel N`: this command in N processes started through torch.distributed.run's
    API, the model split over them (bloomlm.torch.tensor_parallel); every process picks the same
    tokens and the first prints them. Piped prompts are read here and handed on in a file."""
    import os
    import tempfile

    from bloomlm.torch.tensor_parallel import launch

    if args.interactive:
        raise UsageError("--tensor-parallel reads its prompts before it starts: drop -i")
    ways = _tensor_parallel_argv_checks(args)
    # The processes run eager steps: the compiled decode step is not built for split weights.
    argv = _without_option(args.argv, "--tensor-parallel") + ["--tensor-parallel-rank"]
    argv = _without_option(argv, "--compile") + ["--compile", "off"]
    if args.threads is None:  # the cores shared by the processes
        argv += ["--threads", str(max(1, (os.cpu_count() or 1) // ways))]
    with tempfile.TemporaryDirectory() as folder:
        if not args.prompt and args.file in (None, "-"):  # the processes cannot read this stdin
            text, _ = _read_input(args.file, "--file")
            (Path(folder) / "prompts.txt").write_text(text, encoding="utf-8")
            argv += ["--file", str(Path(folder) / "prompts.txt")]
        return max(launch(_generate_on_rank, ways, argv))


def _without_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE`."""
    kept, skip = [], False
    for item in argv:
        if skip or item.startswith(option + "="):
            skip = False
            continue
        skip = item == option
        if not skip:
            kept.append(item)
    return kept


def _generate_on_rank(argv: list[str]) -> int:
    """One process of `generate --tensor-parallel N`: all but the first print nothing."""
    import os

    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")
    return main(argv)


def _request(args: argparse.Namespace, line: _Line) -> _Request:
    """The request for one input line: the flags, overridden by the line's JSON when --jsonl."""
    given = {name: getattr(args, name) for name in _DECODING_FLAGS}
    request = _Request(
        line.text,
        {k: v for k, v in given.items() if v is not None},
        args.seed,
        tuple(args.stop or ()),
        args.ignore_eos,
    )
    if args.jsonl and line.where and line.text.lstrip().startswith("{"):
        _apply_json_request(request, line, args.command_parser)
    return request


def _apply_json_request(request: _Request, line: _Line, parser: argparse.ArgumentParser) -> None:
    try:
        values = json.loads(line.text)
    except json.JSONDecodeError as err:
        raise CommandError(f"{line.where} is not JSON ({err.msg})") from None
    prompt = values.get("prompt") if isinstance(values, dict) else None
    if not isinstance(prompt, str) or not prompt:
        raise CommandError(f'{line.where}: a request needs a non-empty "prompt" string')
    unknown = sorted(set(values) - set(_REQUEST_KEYS))
    if unknown:
        raise CommandError(f"{line.where}: unknown keys {unknown}; allowed: {list(_REQUEST_KEYS)}")
    actions = {action.dest: action for action in parser._actions}
    request.prompt = prompt
    for key, value in values.items():
        if key != "prompt":
            _set_request_value(request, key, value, actions[key], line.where)


def _set_request_value(
    request: _Request, key: str, value: Any, action: argparse.Action, where: str
) -> None:
    if key == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise CommandError(f'{where}: "stop" must be a string or a list of non-empty strings')
        request.stop = tuple(stops)
        return
    wanted = bool if key == "ignore_eos" else action.type
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not wanted:
        raise CommandError(f'{where}: "{key}" must be {wanted.__name__}, got {value!r}')
    message = getattr(action, "check", lambda _: None)(value)
    if message:
        raise CommandError(f'{where}: "{key}" {message}')
    if key in ("seed", "ignore_eos"):
        setattr(request, key, value)
    else:
        request.given[key] = value


def _streams(args: argparse.Namespace, requests: list[_Request]) -> bool:
    """One prompt, one continuation, no beams and text output: print it word by word."""
    if len(requests) != 1 or args.jsonl:
        return False
    given = requests[0].given
    return given.get("num_beams", 1) == 1 and given.get("num_return_sequences", 1) == 1


def _stream(generator: _Generator, request: _Request) -> str:
    """Generate one continuation, printing it as it grows; the continuation."""
    tokenizer = generator.tokenizer
    inputs = tokenizer([request.prompt], return_tensors="pt").to(generator.model.device)
    streamer = _StreamPrinter(tokenizer, request.stop, generator.stats)
    generator.run(request, inputs, streamer=streamer)
    return streamer.text()


def _generate_batches(
    args: argparse.Namespace, generator: _Generator, requests: list[_Request]
) -> None:
    """Requests with the same settings in batches of --batch-size; results printed in input order
    as soon as every earlier one is."""
    if _generate_continuously(args, generator, requests):
        return
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.group(), []).append(index)
    batches = [chunk for indices in groups.values() for chunk in _chunks(indices, args.batch_size)]
    results: dict[int, list[str]] = {}
    printed = 0
    bar = _Progress(len(batches), "generating")
    for batch in batches:
        results |= dict(zip(batch, _generate_batch(generator, [requests[i] for i in batch])))
        while printed in results:
            _print_result(args, bar, requests, printed, results.pop(printed))
            printed += 1
        bar.update()
    bar.close()


def _generate_continuously(
    args: argparse.Namespace, generator: _Generator, requests: list[_Request]
) -> bool:
    """Run the requests on the continuous-batching engine (bloomlm.serving.LLM), at most
    --batch-size sequences at once, each prompt starting as soon as a row is free; results
    printed in input order. False (nothing run) when one needs model.generate (beam search,
    a model split by --tensor-parallel)."""
    from bloomlm.serving.llm import LLM, params_from_generate

    if getattr(generator.model, "tensor_parallel_mesh", None) is not None:
        return False  # --tensor-parallel: the engine runs one process; model.generate splits
    defaults = generator.model.generation_config
    params = [params_from_generate(generator.keywords(r), defaults, r.seed, r.stop)
              for r in requests]  # fmt: skip
    if any(p is None for p in params):
        return False
    llm = LLM(generator.model, generator.tokenizer, max_sequences=args.batch_size,
              max_model_len=generator.engine.get("max_model_len"))  # fmt: skip
    results: dict[int, list[str]] = {}
    printed, started = 0, time.perf_counter()
    bar = _Progress(len(requests), "generating")
    for index, output in llm.iter_generate([r.prompt for r in requests], params):
        results[index] = [completion.text for completion in output.outputs]
        generator.stats.tokens += sum(len(c.token_ids) for c in output.outputs)
        while printed in results:
            _print_result(args, bar, requests, printed, results.pop(printed))
            printed += 1
        bar.update()
    bar.close()
    generator.stats.seconds += time.perf_counter() - started
    return True


def _generate_batch(generator: _Generator, requests: list[_Request]) -> list[list[str]]:
    """The continuations of each request (num_return_sequences of them), cut at stop strings.
    The requests share their settings (one group)."""
    import torch

    first = requests[0]
    if first.seed is not None:
        torch.manual_seed(first.seed)
    prompts = [request.prompt for request in requests]
    tokenizer = generator.tokenizer
    inputs = tokenizer(prompts, padding=True, return_tensors="pt").to(generator.model.device)
    sequences = generator.run(first, inputs)
    new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    texts = [_cut(text, first.stop) for text in texts]
    per_prompt = len(texts) // len(requests)
    return [texts[i : i + per_prompt] for i in range(0, len(texts), per_prompt)]


def _print_result(
    args: argparse.Namespace, bar: _Progress, requests: list[_Request], index: int, texts: list[str]
) -> None:
    prompt = requests[index].prompt
    if args.jsonl:  # one line per prompt, whatever the text holds
        generated: str | list[str] = texts[0] if len(texts) == 1 else texts
        bar.print(_json_line({"prompt": prompt, "generated": generated}))
        return
    several = len(requests) > 1 or len(texts) > 1
    for number, text in enumerate(texts, 1):
        if several:  # texts may hold blank lines: a header line before each result
            which = f", sequence {number}" if len(texts) > 1 else ""
            bar.print(f"==> prompt {index + 1}{which} <==")
        bar.print(text if args.only_new else prompt + text)


def _interactive(args: argparse.Namespace, generator: _Generator) -> None:
    """`generate -i`: read a prompt, stream its continuation, repeat until end of input (Ctrl-D).
    Ctrl-C stops the continuation being written and asks for the next prompt (at the prompt, it
    ends the loop). With the folder's chat template the lines are a conversation (_render_turn)
    whose oldest exchanges are dropped when it outgrows the usable length."""
    history: list[dict[str, str]] = []
    chat = bool(generator.tokenizer.chat_template)
    ask = "> " if sys.stdin.isatty() else ""
    if chat and ask:
        print(f"bloomlm generate: a chat with {args.model}'s chat template (Ctrl-D ends it)",
              file=sys.stderr)  # fmt: skip
    while True:
        try:
            sys.stderr.write(ask)
            sys.stderr.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return
        if not line:
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        prompt = _render_turn(generator.tokenizer, history, text)
        if history and _too_long(args, generator, prompt):
            while history and _too_long(args, generator, prompt):
                del history[:2]  # the oldest exchange: a user turn and its reply
                prompt = _render_turn(generator.tokenizer, history, text)
            print("bloomlm generate: note: the oldest turns were dropped to fit the usable "
                  "length (--max-model-len)", file=sys.stderr)  # fmt: skip
        try:
            reply = _stream(generator, _request(args, _Line(prompt, "")))
        except KeyboardInterrupt:
            reply = ""
        print(flush=True)
        if chat:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def _too_long(args: argparse.Namespace, generator: _Generator, prompt: str) -> bool:
    """Whether `prompt` and --max-new-tokens overflow the usable length (_engine_options)."""
    usable = generator.engine.get("max_model_len")
    new_tokens = _max_new_tokens(args)
    if usable is None:
        return False
    return len(generator.tokenizer(prompt)["input_ids"]) + new_tokens > usable


def _render_turn(tokenizer: Any, history: list[dict[str, str]], text: str) -> str:
    """The text `generate -i` continues for the user's line `text` after the turns in `history`.

    A folder whose tokenizer_config.json has a `chat_template` gets a conversation: the earlier
    turns and this one, rendered as transformers renders them (`apply_chat_template` with the
    generation prompt, one renderer in bloomlm.chat). Without one, BLOOM was trained on no chat
    format, so each line is continued alone, as plain text.
    """
    if not tokenizer.chat_template:
        return text
    conversation = [*history, {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def _check_generate(args: argparse.Namespace) -> str | None:
    if args.interactive and (args.prompt or args.file or args.jsonl):
        return "-i reads prompts from the terminal: drop the prompt arguments, --file and --jsonl"
    message = _check_inputs(args, args.prompt, "prompt")
    if message:
        return message
    beams, sequences = args.num_beams or 1, args.num_return_sequences or 1
    if beams > 1 and sequences > beams:
        return f"--num-return-sequences ({sequences}) must be at most --num-beams ({beams})"
    if sequences > 1 and beams == 1 and args.temperature == 0:
        return "--num-return-sequences > 1 needs sampling (--temperature > 0) or --num-beams"
    if None not in (args.min_new_tokens, args.max_new_tokens):
        if args.min_new_tokens > args.max_new_tokens:
            return (
                f"--min-new-tokens ({args.min_new_tokens}) must be at most "
                f"--max-new-tokens ({args.max_new_tokens})"
            )
    return None


def _check_inputs(args: argparse.Namespace, texts: list[str], noun: str) -> str | None:
    if texts and getattr(args, "file", None):
        return f"give {noun}s as arguments or with --file, not both"
    if texts and getattr(args, "one_prompt", False):
        return "--one-prompt reads --file or stdin: drop the prompt arguments"
    if any(not text for text in texts):
        return f"the {noun} is empty"
    return None


# -- classify, tag, answer -------------------------------------------------------------------------


def _classify(args: argparse.Namespace) -> int:
    from bloomlm.tasks import classify

    texts = [line.text for line in _nonempty(_read_lines(args, args.text), args)]
    model, tokenizer = _load("BloomForSequenceClassification", args)
    batches = list(_chunks(texts, args.batch_size))
    bar = _Progress(len(batches), "classifying")
    for batch in batches:
        results = classify(
            model,
            tokenizer,
            batch,
            batch_size=args.batch_size,
            max_length=args.max_length,
            top_k=args.top_k,
            threshold=args.threshold,
        )
        for text, result in zip(batch, results):
            bar.print(_classify_line(args, text, result))
        bar.update()
    bar.close()
    return 0


def _classify_line(args: argparse.Namespace, text: str, result: dict[str, Any]) -> str:
    if args.jsonl:
        return _json_line({"text": text, **result})
    if (
        args.top_k == 1
        and len(result["labels"]) == 1
        and result["labels"][0]["label"] == result["label"]
    ):
        return f"{result['label']}\t{result['score']:.4f}\t{text}"
    pairs = [f"{item['label']}\t{item['score']:.4f}" for item in result["labels"]]
    return "\t".join([*pairs, text]) if pairs else f"-\t\t{text}"


def _tag(args: argparse.Namespace) -> int:
    _require_model(args, "token-classification", "token-cls")
    from bloomlm.tasks import tag

    lines = _nonempty(_read_lines(args, args.text), args)
    words = args.aggregation != "none"  # pre-split words, tokenized as training does
    model, tokenizer = _load("BloomForTokenClassification", args, add_prefix_space=words)
    key = "words" if words else "tokens"
    for line in lines:
        rows = tag(model, tokenizer, line.text, args.aggregation, args.max_length)
        covered = rows[-1]["end"] if rows else 0
        if line.text[covered:].strip():
            print(
                f"bloomlm tag: note: only the first {covered} characters were tagged "
                "(the text is longer than --max-length tokens)",
                file=sys.stderr,
            )
        if args.jsonl:
            print(_json_line({"text": line.text, key: rows}), flush=True)
            continue
        _print_tag_table(rows, key[:-1])
    return 0


def _print_tag_table(rows: list[dict[str, Any]], unit: str) -> None:
    shown = [repr(row[unit]) if unit == "token" else row[unit] for row in rows]
    width = max([len(unit), *(len(s) for s in shown)])
    print(f"{unit:<{width}}  label\tscore\tstart\tend")
    for text, row in zip(shown, rows):
        print(f"{text:<{width}}  {row['label']}\t{row['score']:.4f}\t{row['start']}\t{row['end']}")
    sys.stdout.flush()


def _answer(args: argparse.Namespace) -> int:
    _require_model(args, "question-answering", "qa")
    from bloomlm.tasks import answer_question

    questions = _answer_inputs(args)
    model, tokenizer = _load("BloomForQuestionAnswering", args)
    for question, context in questions:
        result = answer_question(
            model, tokenizer, question, context, args.max_length, args.doc_stride
        )
        if args.jsonl:
            print(_json_line({"question": question, **result}), flush=True)
        elif args.json:
            print(_json_line(result), flush=True)
        else:
            print(
                f"answer\t{result['answer']}\nscore\t{result['score']:.4f}\n"
                f"start\t{result['start']}\nend\t{result['end']}",
                flush=True,
            )
    return 0


def _answer_inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(question, context) pairs: --question with --context/--context-file, or JSONL requests."""
    if args.jsonl:
        lines = _nonempty(_read_lines(args, []), args)
        return [_qa_request(line) for line in lines]
    context = args.context
    if args.context_file:
        context, _ = _read_input(args.context_file, "--context-file")
    return [(args.question, context)]


def _qa_request(line: _Line) -> tuple[str, str]:
    try:
        values = json.loads(line.text)
    except json.JSONDecodeError as err:
        raise CommandError(f"{line.where} is not JSON ({err.msg})") from None
    if not isinstance(values, dict) or not all(
        isinstance(values.get(key), str) for key in ("question", "context")
    ):
        raise CommandError(f'{line.where}: each line needs "question" and "context" strings')
    return values["question"], values["context"]


def _check_answer(args: argparse.Namespace) -> str | None:
    if args.context is not None and args.context_file:
        return "give the context with --context or --context-file, not both"
    if args.jsonl:
        if args.question is not None or args.context is not None or args.context_file:
            return "--jsonl reads questions and contexts from --file or stdin: drop --question"
    else:
        if args.file:
            return "--file is for --jsonl requests; give --question and --context"
        if args.question is None or (args.context is None and not args.context_file):
            return "answer needs --question and --context (or --context-file, or --jsonl requests)"
        if not args.question.strip():
            return "the question is empty"
        if args.context is not None and not args.context.strip():
            return "the context is empty"
    if args.max_length is not None and args.doc_stride >= args.max_length:
        return (
            f"--doc-stride ({args.doc_stride}) must be less than --max-length ({args.max_length})"
        )
    return None


# -- convert, info ---------------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    from bloomlm.convert import convert_checkpoint

    bar = _Progress(0, f"writing {args.to} weights", unit="B")
    try:
        architecture = convert_checkpoint(
            args.src,
            args.dst,
            to=args.to,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            on_progress=bar.set,
            quantize=args.quantize,
        )
    finally:
        bar.close()
    what = f"{args.quantize} quantized" if args.quantize else args.to
    print(f"wrote {what} weights ({architecture}) to {Path(args.dst)}")
    return 0


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _info(args: argparse.Namespace) -> int:
    """Config summary, parameters of the class the folder holds, memory: from config.json."""
    from bloomlm.config import BloomConfig
    from bloomlm.convert import architecture_of
    from bloomlm.hub import resolve_model_dir

    folder = resolve_model_dir(args.path, ["config.json"])
    if not (folder / "config.json").is_file():
        raise CommandError(f"{args.path} has no config.json, so it is not a model folder")
    config = BloomConfig.from_pretrained(folder)
    architecture = architecture_of(config)
    if args.tensor_parallel is not None:
        from bloomlm.sharding_plan import check_tensor_parallel

        check_tensor_parallel(config.n_head, args.tensor_parallel)
    n_params = parameter_count(config, architecture)
    dtypes = list(BYTES_PER_DTYPE) if args.dtype == "auto" else [args.dtype]
    summary = model_summary(config, n_params)
    memory = {d: memory_estimate(config, n_params, d, args.batch, args.length) for d in dtypes}
    plans = _tensor_parallel_plans(config, args, architecture, dtypes)
    if args.json:
        estimate = {"batch": args.batch, "length": args.length, **memory}
        if plans:
            summary["tensor_parallel"] = plans
        print(_json_line(summary | {"memory_estimate": estimate}))
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
    if plans:
        _print_tensor_parallel_plan(plans, args)
    return 0


def _tensor_parallel_plans(
    config: Any, args: argparse.Namespace, architecture: str, dtypes: list[str]
) -> dict[str, dict]:
    """{dtype: bloomlm.sharding_plan.plan_summary} for --tensor-parallel N (float dtypes)."""
    if args.tensor_parallel is None:
        return {}
    from bloomlm.sharding_plan import plan_summary

    sizes = {d: BYTES_PER_DTYPE[d] for d in dtypes if d != "int8"}
    ways, batch, length = args.tensor_parallel, args.batch, args.length
    return {d: plan_summary(config, ways, n, batch, length, architecture) for d, n in sizes.items()}


def _print_tensor_parallel_plan(plans: dict[str, dict], args: argparse.Namespace) -> None:
    plan = next(iter(plans.values()))
    print(
        f"\ntensor parallel over {args.tensor_parallel} devices ({plan['local_heads']} heads each):"
    )
    for row in plan["rows"]:
        split = "" if row["split_axis"] is None else f" (axis {row['split_axis']})"
        shapes = f"{row['shape']} -> {row['local_shape']}"
        count = " (tied: the embedding)" if row.get("tied") else f" x{row['count']}"
        print(f"  {row['name']:<56} {row['kind'] + split:<16} {shapes}{count}")
    print(f"bytes per device, batch {args.batch} x length {args.length}:")
    print(f"{'':<12}" + "".join(f"{d:>12}" for d in plans))
    for part in ("weights", "kv_cache", "total"):
        values = [_human(plans[d]["bytes_per_device"][part]) for d in plans]
        print(f"{part:<12}" + "".join(f"{v:>12}" for v in values))


# -- finetune --------------------------------------------------------------------------------------

# FinetuneConfig fields whose option has another name.
_FINETUNE_FIELDS = {"train": "train_file", "eval": "eval_file", "out": "out_dir"}


def _finetune(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from bloomlm.finetune import FinetuneConfig, finetune

    names = {f.name for f in fields(FinetuneConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values |= {
        "task": args.task,
        "train_file": args.train or "",
        "eval_file": args.eval,
        "out_dir": args.out,
        "model": args.model or DEFAULT_LM,
        "labels": _label_list(args),
        "device": args.device or "cpu",
    }
    explicit = None
    if args.resume:  # compare with the saved run only what this command line sets
        given = {_FINETUNE_FIELDS.get(d, d) for d in _given_options(args.argv)}
        explicit = (given | {"task"}) & names
    result = finetune(FinetuneConfig(**values), resume=args.resume, explicit=explicit)
    best = ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items())
    print(f"best model: epoch {result.best_epoch} ({best}), saved to {result.out_dir}")
    return 0


def _label_list(args: argparse.Namespace) -> list[str] | None:
    labels = getattr(args, "labels", None)
    return [label.strip() for label in labels.split(",")] if labels else None


def _check_finetune(args: argparse.Namespace) -> str | None:
    if not args.resume and not args.train:
        return "the following arguments are required: --train (unless --resume)"
    if args.train == args.eval == "-":
        return "only one of --train and --eval can read stdin ('-')"
    return None


# -- serve -----------------------------------------------------------------------------------------

SERVE_INSTALL = 'pip install "bloomlm[serve]"'


# Over 40 lines: load, plan the KV memory, start the engine and the server, in that order.
def _serve(args: argparse.Namespace) -> int:
    """Load the model, print the memory plan and the address, serve until SIGTERM / Ctrl-C."""
    try:
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        print(f"bloomlm serve needs the serve extra ({err.name} is missing): {SERVE_INSTALL}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.tensor_parallel:
        return _serve_tensor_parallel(args)
    import copy
    import os

    from bloomlm.serving.engine import Engine
    from bloomlm.serving.memory import parse_bytes
    from bloomlm.serving.metrics import Metrics
    from bloomlm.serving.server import ServerSettings, bind, build_app, run_server
    from bloomlm.serving.worker import EngineThread

    budget = parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None
    if args.tensor_parallel_rank and os.environ.get("RANK", "0") != "0":
        return _serve_follower(args)
    sock = bind(args.host, args.port)  # first: a taken port fails before the model loads
    model, tokenizer = _load("BloomForCausalLM", args)
    metrics = Metrics()
    engine = Engine(model.eval(), copy.deepcopy(tokenizer), max_model_len=args.max_model_len,
                    max_sequences=args.max_batch, kv_cache_memory=budget,
                    max_waiting=args.max_waiting, prefill_chunk=args.prefill_chunk,
                    observer=metrics)  # fmt: skip
    settings = ServerSettings(
        model_name=args.served_model_name or args.model,
        max_model_len=engine.max_model_len,
        max_sequences=engine.max_sequences,
        api_key=args.api_key,
        chat_template=tokenizer.chat_template,
        shutdown_timeout=args.shutdown_timeout,
    )
    worker = EngineThread(engine)
    app = build_app(worker, tokenizer, settings, metrics)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"bloomlm serve: {engine.plan.describe()}", flush=True)
    print(f"bloomlm serve: {settings.model_name} on http://{shown}:{port} (playground: /, "
          "API: /v1, metrics: /metrics); Ctrl-C to stop", flush=True)  # fmt: skip
    try:
        run_server(app, worker, sock, shutdown_timeout=args.shutdown_timeout,
                   log_level=args.log_level, access_log=args.access_log)  # fmt: skip
    finally:
        engine.close()  # --tensor-parallel: the other ranks' follow() returns
    print("bloomlm serve: stopped", flush=True)
    return 0


def _serve_tensor_parallel(args: argparse.Namespace) -> int:
    """`serve --tensor-parallel N`: this command in N processes started through
    torch.distributed.run's API (elastic_launch), the model split over them. Rank 0 binds the
    port, runs the engine and HTTP; the others replay its decoder calls
    (bloomlm.serving.lockstep) and exit when it stops.

    Signals: every stop goes through torch's agent in this process, which forwards SIGTERM or
    SIGINT once to each rank (rank 0 drains; the followers ignore it and exit when rank 0
    releases them), waits --shutdown-timeout plus a margin, then re-raises it here: the normal
    end of a server, exit 0. The ranks run in a process group of their own, so a Ctrl-C in the
    terminal reaches the agent only: rank 0 would take a second SIGINT for "stop waiting"."""
    import math
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException

    from bloomlm.torch.tensor_parallel import launch

    ways = _tensor_parallel_argv_checks(args)
    argv = _without_option(args.argv, "--tensor-parallel") + ["--tensor-parallel-rank"]
    if args.threads is None:  # the cores shared by the processes
        import os

        argv += ["--threads", str(max(1, (os.cpu_count() or 1) // ways))]
    grace = math.ceil(args.shutdown_timeout) + 30
    try:
        launch(_serve_on_rank, ways, argv, shutdown_timeout=grace)
    except SignalException as stop:
        return 0 if stop.sigval in (signal.SIGTERM, signal.SIGINT) else 128 + int(stop.sigval)
    return 0


def _tensor_parallel_argv_checks(args: argparse.Namespace) -> int:
    """The checks before --tensor-parallel N starts its processes (UsageError: exit 2); N."""
    from bloomlm.config import BloomConfig
    from bloomlm.sharding_plan import check_tensor_parallel

    if args.device and not args.device.startswith("cpu"):
        raise UsageError(
            "--tensor-parallel places each process itself (gloo on CPU): drop --device"
        )
    if args.quantize or args.dtype == "int8":  # refused here, before N processes start
        raise UsageError("--tensor-parallel splits float weights: drop --quantize / --dtype int8")
    ways = args.tensor_parallel
    check_tensor_parallel(BloomConfig.from_pretrained(args.model).n_head, ways)
    return ways


def _serve_on_rank(argv: list[str]) -> int:
    """One process of `serve --tensor-parallel N`, in a process group of its own (see
    _serve_tensor_parallel). It ends with os._exit: a server stops on a signal, after which
    torch's agent waits for the processes to exit instead of collecting return values."""
    import os

    os.setpgrp()
    code = 1
    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve_follower(args: argparse.Namespace) -> int:
    """A rank other than 0 of `serve --tensor-parallel N`: load this rank's shard, replay rank
    0's decoder calls until its server stops. Signals are rank 0's to handle: stopping here
    would leave rank 0 waiting inside a collective."""
    import signal

    from bloomlm.serving.lockstep import follow

    model, _ = _load("BloomForCausalLM", args)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    follow(model.eval())
    return 0


def _size_text_check(value: str) -> str | None:
    from bloomlm.serving.memory import parse_bytes

    try:
        parse_bytes(value)
    except ValueError as err:
        return str(err)
    return None


def _add_serve(commands: Any) -> None:
    parser = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with continuous batching (needs bloomlm[serve])",
        description="Serve a model over OpenAI's API (/v1/completions, /v1/chat/completions, "
        "/v1/models), with /health, Prometheus /metrics and a playground page at /. Requests "
        "share one continuously batched decode; how many run at once is bounded by the KV "
        f"cache memory budget, printed at start. Needs the serve extra: {SERVE_INSTALL}",
    )
    _model_options(parser, DEFAULT_LM, f"default: the embedded {DEFAULT_LM}")
    _server_options(parser.add_argument_group("server"))
    _serving_engine_options(parser.add_argument_group("engine"))
    split = ("split the model over N local processes (torch.distributed: gloo on CPU); the "
             "first serves, the others follow its decoder calls")  # fmt: skip
    _count_option(parser, "--tensor-parallel", 1, metavar="N", help=split)
    parser.add_argument("--tensor-parallel-rank", action="store_true", help=argparse.SUPPRESS)
    _debug_option(parser)
    parser.set_defaults(run=_serve, command_parser=parser)


def _server_options(net: Any) -> None:
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    _count_option(net, "--port", 0, default=8000, help="port; 0 picks a free one")
    net.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    net.add_argument("--served-model-name", help="the model's name in the API (default: --model)")
    _checked(
        net.add_argument(
            "--shutdown-timeout",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="on SIGTERM / Ctrl-C, how long running requests may finish before they are "
            "aborted",
        ),
        _between(0),
    )
    net.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info"
    )
    net.add_argument("--access-log", action="store_true", help="log every HTTP request")


# Over 40 lines: argparse declarations of the engine's limits.
def _serving_engine_options(engine: Any) -> None:
    _count_option(
        engine,
        "--max-model-len",
        2,
        metavar="N",
        help="most tokens per sequence, prompt included (default: the config's seq_length, "
        f"else {DEFAULT_MODEL_LEN})",
    )
    _count_option(
        engine,
        "--max-batch",
        1,
        metavar="N",
        help="most sequences running at once (default: as many as the KV cache budget holds)",
    )
    _checked(
        engine.add_argument(
            "--kv-cache-memory",
            metavar="SIZE",
            help="KV cache budget, like 2GiB or 512M (default: half the memory available after "
            "loading)",
        ),
        _size_text_check,
    )
    _count_option(
        engine,
        "--max-waiting",
        0,
        default=256,
        metavar="N",
        help="most requests waiting to start; more get 429 with Retry-After",
    )
    _count_option(
        engine,
        "--prefill-chunk",
        1,
        default=512,
        metavar="TOKENS",
        help="prompt tokens prefilled between two decode steps (long prompts take several)",
    )


# -- the parser: one builder per subcommand, shared option groups first ----------------------------


def _debug_option(parser: argparse.ArgumentParser) -> None:
    """--debug after the command too (SUPPRESS: when absent it leaves the top level's value)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks instead of one-line errors",
    )


def _model_options(parser: argparse.ArgumentParser, default: str | None, default_note: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default,
        metavar="PATH_OR_NAME",
        help=f"model folder or name ({default_note})",
    )
    _checked(
        group.add_argument("--device", help=f"{DEVICES} (when not given: cpu)"),
        _device_check,
    )
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights dtype; auto = the checkpoint's (when not given: float32 on CPU, auto on "
        "other devices); int8 = deprecated alias of --quantize int8",
    )
    _count_option(
        group,
        "--threads",
        1,
        help="CPU threads for torch (when not given: 1 for models under "
        f"{SMALL_MODEL_PARAMETERS // 1_000_000}M parameters, else one per core)",
    )
    _quantize_option(group)


def _quantize_option(group: Any) -> None:
    """`--quantize`, the same on every command that loads or writes a model."""
    group.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="int8 = int8 weights and activations (fbgemm on x86 CPUs; weight-only elsewhere), "
        "int8-weight-only, fp16 = float16 weights with float32 compute (default: none; a folder "
        "saved quantized loads in its own format, and `generate` runs a saved int8 folder "
        f"weight-only for runs of under {W8A8_MIN_TOKENS} new tokens (prompts x "
        "--max-new-tokens), where packing for int8 would cost more than it saves)",
    )


def _text_inputs(parser: argparse.ArgumentParser, name: str, noun: str, help: str) -> None:
    """The positional texts and `--file`, the input every text command takes."""
    parser.add_argument(name, nargs="*", help=f"{help} (else --file, else lines from stdin)")
    parser.add_argument(
        "--file", metavar="FILE", help=f"read {noun} from FILE, one per line ('-': stdin)"
    )


def _max_length_option(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    _count_option(parser, "--max-length", 1, default=default, metavar="TOKENS", help=what)


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine")
    _count_option(
        engine,
        "--max-model-len",
        1,
        metavar="N",
        help="most tokens per sequence, prompt included; a longer request is an error at "
        f"once (default: the config's seq_length, else {DEFAULT_MODEL_LEN})",
    )
    engine.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile the decode step (torch.compile); auto: only for runs of at least "
        f"{COMPILE_MIN_STEPS} decode steps (batches x max-new-tokens), where it pays "
        "(default: auto)",
    )


# Over 40 lines: argparse declarations of generate's own options.
def _add_generate(commands: Any) -> None:
    parser = commands.add_parser(
        "generate",
        help="continue text prompts (streams a single prompt word by word)",
        description="Continue prompts. One prompt streams to the terminal as it is generated; "
        "several (from --file or stdin, one per line) run in batches, each result after a "
        "'==> prompt N <==' line (--jsonl: one JSON object per line). Decoding settings: a flag "
        "when given, else the model folder's generation_config.json, else the defaults shown "
        "(sampling ones only when sampling).",
    )
    _text_inputs(parser, "prompt", "prompts", "prompt text")
    parser.add_argument(
        "--one-prompt",
        action="store_true",
        help="read the whole of --file or stdin as one (multi-line) prompt",
    )
    parser.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="a prompt loop: type a prompt, read its continuation, until Ctrl-D; with the "
        "folder's chat template (tokenizer_config.json) a conversation rendered with it",
    )
    _model_options(parser, DEFAULT_LM, f"default: the embedded {DEFAULT_LM}")
    _decoding_options(parser)
    _engine_arguments(parser)
    output = parser.add_argument_group("output")
    _count_option(output, "--batch-size", 1, default=8, help="prompts per batch")
    output.add_argument(
        "--only-new", action="store_true", help="print only the generated text, not the prompt"
    )
    output.add_argument(
        "--jsonl",
        action="store_true",
        help='one JSON object per prompt: {"prompt", "generated"}; input lines that start with '
        '"{" are requests: {"prompt": ..., "temperature": ..., "seed": ..., "stop": ...} (any '
        "decoding option, underscores for dashes)",
    )
    output.add_argument(
        "--verbose", action="store_true", help="a final line on stderr: tokens, seconds, tokens/s"
    )
    split = "split the model over N local processes (torch.distributed: gloo on CPU)"
    _count_option(parser, "--tensor-parallel", 1, metavar="N", help=split)
    parser.add_argument("--tensor-parallel-rank", action="store_true", help=argparse.SUPPRESS)
    _debug_option(parser)
    parser.set_defaults(run=_generate, validate=_check_generate, command_parser=parser)


# Over 40 lines: one argparse declaration per decoding option, nothing else.
def _decoding_options(parser: argparse.ArgumentParser) -> None:
    """Flags default to None ("not given"): the folder's generation config or GENERATE_DEFAULTS
    then decide, and the help shows those defaults."""
    group = parser.add_argument_group("decoding")
    default = GENERATE_DEFAULTS

    def option(flag: str, kind: type, check: Check, help: str) -> None:
        _checked(group.add_argument(flag, type=kind, help=help), check)

    option("--max-new-tokens", int, _at_least(1), f"default: {default['max_new_tokens']}")
    option("--min-new-tokens", int, _at_least(0), "never end before this many new tokens")
    option(
        "--temperature",
        float,
        _between(0),
        f"0 means greedy; default: {default['temperature']} (sampling)",
    )
    option("--top-k", int, _at_least(0), f"0 turns it off; default: {default['top_k']}")
    option("--top-p", float, _between(0, 1, low_open=True), f"default: {default['top_p']}")
    option(
        "--repetition-penalty",
        float,
        _between(0, low_open=True),
        f"1 turns it off; default: {default['repetition_penalty']} when sampling, else 1",
    )
    option("--num-beams", int, _at_least(1), "beam search with this many beams; default: 1")
    option("--num-return-sequences", int, _at_least(1), "continuations per prompt; default: 1")
    option("--no-repeat-ngram-size", int, _at_least(0), "never repeat an n-gram of this size")
    group.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        type=_unescape,
        help="end a continuation where TEXT appears (not printed); repeatable; \\n is a newline",
    )
    group.add_argument(
        "--ignore-eos",
        action="store_true",
        help="never end at the end-of-text token: always --max-new-tokens",
    )
    _count_option(
        group,
        "--seed",
        0,
        help="fix the random seed: sampling repeats exactly (each prompt draws from its own "
        "generator: the same text whatever --batch-size)",
    )


def _unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` in a --stop value, so a newline can be typed on any shell."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def _add_classify(commands: Any) -> None:
    parser = commands.add_parser(
        "classify",
        help="label texts with a sequence-classification model (default: sentiment)",
        description="Print label, probability and text, tab-separated, for each text (--top-k: "
        "that many label/probability pairs; a multi-label model: every label at or above "
        "--threshold).",
    )
    _text_inputs(parser, "text", "texts", "texts")
    _count_option(parser, "--batch-size", 1, default=32, help="texts per batch")
    _max_length_option(parser, 512, "truncate each text to this many tokens")
    _count_option(parser, "--top-k", 1, default=1, help="print the K likeliest labels")
    _checked(
        parser.add_argument(
            "--threshold",
            type=float,
            default=0.5,
            help="multi-label models: print every label with at least this probability",
        ),
        _between(0, 1),
    )
    jsonl = 'one JSON object per text: {"text", "label", "score", "scores", "labels"}'
    note = f"default: the embedded {DEFAULT_CLASSIFIER}, positive/negative"
    _text_command_end(parser, _classify, jsonl, DEFAULT_CLASSIFIER, note)


def _add_tag(commands: Any) -> None:
    parser = commands.add_parser(
        "tag",
        help="label every word with a token-classification model (needs --model)",
        description="Print a word / label / probability / character offsets table per text.",
    )
    _text_inputs(parser, "text", "texts", "texts")
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="first",
        help="a word's label: that of its first token (as training labels words), the average "
        "or the most confident of its tokens; none: one row per token",
    )
    _max_length_option(parser, 512, "tag at most this many tokens of each text")
    jsonl = (
        'one JSON object per text: {"text", "words": [{"word", "label", "score", "start", '
        '"end"}]} ("tokens" with --aggregation none)'
    )
    note = "required: no tagging model ships with bloomlm"
    _text_command_end(parser, _tag, jsonl, None, note)


def _text_command_end(
    parser: argparse.ArgumentParser, run: Any, jsonl: str, model: str | None, model_note: str
) -> None:
    """What `classify` and `tag` end with: --jsonl, the model options, --debug, and the check
    that the texts come from exactly one place."""
    parser.add_argument("--jsonl", action="store_true", help=jsonl)
    _model_options(parser, model, model_note)
    _debug_option(parser)
    parser.set_defaults(
        run=run,
        validate=lambda args: _check_inputs(args, args.text, "text"),
        command_parser=parser,
    )


def _add_answer(commands: Any) -> None:
    parser = commands.add_parser(
        "answer",
        help="extract the answer to a question from a context (needs --model)",
        description="Print the answer span, its probability and its character offsets in the "
        "context. A long context is read in overlapping windows of --max-length tokens.",
    )
    parser.add_argument("--question", help="the question to answer")
    parser.add_argument("--context", help="the text to find the answer in")
    parser.add_argument(
        "--context-file", metavar="FILE", help="read the context from FILE ('-': stdin)"
    )
    _max_length_option(parser, 384, "tokens per window (question + a part of the context)")
    _count_option(
        parser,
        "--doc-stride",
        0,
        default=128,
        metavar="TOKENS",
        help="tokens each window shares with the previous one",
    )
    parser.add_argument(
        "--json", action="store_true", help='print {"answer", "score", "start", "end"}'
    )
    parser.add_argument(
        "--jsonl",
        action="store_true",
        help='read {"question", "context"} per line (--file or stdin) and print one JSON object '
        "per line",
    )
    parser.add_argument("--file", metavar="FILE", help="--jsonl requests from FILE ('-': stdin)")
    _model_options(parser, None, "required: no question-answering model ships with bloomlm")
    _debug_option(parser)
    parser.set_defaults(run=_answer, validate=_check_answer, command_parser=parser)


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
        help="cast floating weights (auto keeps the checkpoint's)",
    )
    _quantize_option(parser)
    _checked(
        parser.add_argument(
            "--max-shard-size", default="5GB", help="split weights into files of at most this size"
        ),
        _size_check,
    )
    _debug_option(parser)
    parser.set_defaults(run=_convert, command_parser=parser)


def _add_info(commands: Any) -> None:
    parser = commands.add_parser(
        "info",
        help="summarise a model: shapes, parameter count, bytes per dtype, memory estimate",
        description="Reads config.json only, and imports no framework, so it is instant for a "
        "model of any size. Parameters are those of the class the folder's config names "
        "(architectures), head included.",
    )
    parser.add_argument("path", nargs="?", default=DEFAULT_LM, help="model folder or name")
    _count_option(parser, "--batch", 1, default=1, help="batch size for the estimate")
    _count_option(
        parser, "--length", 1, default=2048, help="tokens per sequence, prompt + generated"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="estimate for this dtype only (auto: all)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    plan = "also the N-way tensor-parallel plan and the bytes on each device"
    _count_option(parser, "--tensor-parallel", 1, metavar="N", help=plan)
    _debug_option(parser)
    parser.set_defaults(run=_info, command_parser=parser)


# Per task: (description, [(flag, default, help)]) for the data columns it reads.
_TASK_COLUMNS: dict[str, tuple[str, list[tuple[str, str | None, str]]]] = {
    "seq-cls": (
        "Sequence classification (BloomForSequenceClassification): a text (and an optional second "
        "text) and its label per row; the best epoch has the highest accuracy.",
        [
            ("--text-column", "text", "the text"),
            ("--text-pair-column", None, "an optional second text"),
            ("--label-column", "label", "the label"),
            ("--labels", None, "comma-separated label names in id order (default: sorted)"),
        ],
    ),
    "token-cls": (
        "Token classification (BloomForTokenClassification): words (a JSON list or a "
        "space-separated string) and one tag per word; a word's first token learns its tag; the "
        "best epoch has the highest F1.",
        [
            ("--tokens-column", "tokens", "the words"),
            ("--tags-column", "tags", "one tag per word"),
            ("--labels", None, "comma-separated tag names in id order (default: sorted)"),
        ],
    ),
    "qa": (
        "Extractive question answering (BloomForQuestionAnswering): question, context and answer "
        "(a SQuAD answers object, or the answer text); the best epoch has the highest F1.",
        [
            ("--question-column", "question", "the question"),
            ("--context-column", "context", "the context"),
            ("--answers-column", "answers", "a SQuAD answers object, or the answer text"),
            ("--answer-start-column", "answer_start", "start character of the answer text"),
        ],
    ),
    "causal-lm": (
        "Causal language modelling (BloomForCausalLM): one text per row; the best epoch has the "
        "lowest perplexity.",
        [("--text-column", "text", "the text")],
    ),
}


def _finetune_training(parser: argparse.ArgumentParser) -> None:
    training = parser.add_argument_group("training")

    def option(flag: str, kind: type, default: Any, check: Check, help: str) -> None:
        _checked(training.add_argument(flag, type=kind, default=default, help=help), check)

    option("--epochs", int, 3, _at_least(1), "passes over the training data")
    option("--max-steps", int, None, _at_least(1), "stop after this many optimizer steps")
    option("--save-steps", int, None, _at_least(1), "also save the resumable state every N steps")
    option("--batch-size", int, 16, _at_least(1), "examples per micro-batch")
    option("--gradient-accumulation-steps", int, 1, _at_least(1), "micro-batches per step")
    option("--learning-rate", float, 5e-4, _between(0, low_open=True), "AdamW's, after warmup")
    option("--weight-decay", float, 0.01, _between(0), "AdamW's (none on biases, LayerNorms)")
    option("--warmup-ratio", float, 0.1, _between(0, 1, high_open=True), "share of steps")
    option("--max-length", int, 128, _at_least(2), "truncate examples to this many tokens")
    training.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    training.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations: less memory"
    )
    training.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="shuffle freely (by default examples of similar length share a batch: less padding)",
    )
    option("--seed", int, 0, _at_least(0), "fixes the batch order and a new head's weights")


# Over 40 lines: argparse declarations of the training options.
def _add_finetune_task(tasks: Any, task: str) -> None:
    description, columns = _TASK_COLUMNS[task]
    parser = tasks.add_parser(
        task,
        help=description.split(":")[0],
        description=f"{description} Fine-tune with AdamW, linear warmup and decay; evaluate after "
        "each epoch; keep the best epoch's model in --out (a normal model folder) and the latest "
        "state in --out/training_state for --resume.",
    )
    parser.add_argument(
        "--train", metavar="FILE", help="training data: .csv, .tsv, .jsonl ('-': stdin)"
    )
    parser.add_argument(
        "--eval",
        metavar="FILE",
        help="evaluation data, same format (metrics each epoch; picks the best epoch)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --out/training_state (--train may then be left out)",
    )
    parser.add_argument(
        "--model", metavar="PATH_OR_NAME", help=f"starting model (when not given: {DEFAULT_LM})"
    )
    _checked(
        parser.add_argument("--device", help=f"{DEVICES} (when not given: cpu)"), _device_check
    )
    _count_option(parser, "--threads", 1, help="CPU threads for torch")
    group = parser.add_argument_group("columns")
    for flag, default, help in columns:
        group.add_argument(flag, default=default, help=help)
    _finetune_training(parser)
    _debug_option(parser)
    parser.set_defaults(
        run=_finetune,
        validate=_check_finetune,
        command_parser=parser,
        task=task,
        interrupted="run the same command with --resume to continue from the last save",
    )


def _add_finetune(commands: Any) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a head on a CSV/JSONL file; saves the best epoch as a model folder",
        description="Fine-tune one of the four heads; `bloomlm finetune TASK --help` lists the "
        "task's data columns and the training options.",
    )
    _debug_option(parser)
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True, parser_class=_Parser)
    for task in FINETUNE_TASKS:
        _add_finetune_task(tasks, task)


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
        _add_serve,
    ):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    command_parser = args.command_parser
    if extra:
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _check_arguments(command_parser, args)
    args.argv = argv
    # Here, once, before any command can import torch: every command that runs a model gets
    # OpenMP's PASSIVE wait policy (why: bloomlm.torch's docstring). Importing bloomlm.torch sets
    # it and imports no torch, so `info` and the argument errors stay torch-free.
    import bloomlm.torch  # noqa: F401

    try:
        return args.run(args)
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted", "")
        print(f"{command_parser.prog}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bloomlm generate ... | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except Exception as err:  # one clear line for users; --debug for the traceback
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        prog = command_parser.prog
        if isinstance(err, UsageError):
            print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
            return 2
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
