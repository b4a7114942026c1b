"""GenerationConfig: the settings of `generate`, read from and written to `generation_config.json`.

Framework-free on purpose (no torch, no jax), so the PyTorch and Flax loops and the CLI share it.
Field names and defaults are transformers 4.37's, so a `generation_config.json` written by either
library reads in the other; keys transformers did not declare are kept as attributes and written
back. `validate()` raises `ValueError` for settings no decoding loop can honour and warns, as
transformers does, about sampling-only or beam-only flags that the chosen mode would ignore.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bloomlm import files
from bloomlm.files import read_json_object

GENERATION_CONFIG_NAME = "generation_config.json"

# Written by transformers next to the settings; bookkeeping, not a setting.
_METADATA_KEYS = ("_from_model_config", "_commit_hash", "transformers_version")

# Arguments of `generate()` that people sometimes put in a generation config by mistake.
_GENERATE_ARGUMENTS = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "streamer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
)


@dataclasses.dataclass(eq=False)
class GenerationConfig:
    """How `generate` decodes; `GenerationConfig()` gives transformers 4.37's defaults.

    Extra keyword arguments become attributes (transformers keeps them too) and are saved.
    """

    # length
    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    early_stopping: bool | str = False
    max_time: float | None = None
    # strategy
    do_sample: bool = False
    num_beams: int = 1
    num_beam_groups: int = 1
    penalty_alpha: float | None = None
    use_cache: bool = True
    # logits manipulation
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    typical_p: float | None = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    diversity_penalty: float = 0.0
    repetition_penalty: float | None = 1.0
    encoder_repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int | None = 0
    bad_words_ids: list[list[int]] | None = None
    force_words_ids: list | None = None
    renormalize_logits: bool = False
    constraints: list | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    remove_invalid_values: bool = False
    exponential_decay_length_penalty: tuple[int, float] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_decoder_ids: list | None = None
    sequence_bias: dict | None = None
    guidance_scale: float | None = None
    low_memory: bool | None = None
    # outputs
    num_return_sequences: int = 1
    output_attentions: bool = False
    output_hidden_states: bool = False
    output_scores: bool = False
    return_dict_in_generate: bool = False
    # special tokens
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # encoder-decoder and assisted decoding (declared so files round-trip; BLOOM does not use them)
    encoder_no_repeat_ngram_size: int = 0
    decoder_start_token_id: int | None = None
    num_assistant_tokens: int = 5
    num_assistant_tokens_schedule: str = "heuristic"
    prompt_lookup_num_tokens: int | None = None
    generation_kwargs: dict = dataclasses.field(default_factory=dict)

    def __init__(self, **kwargs: Any) -> None:
        for field in dataclasses.fields(self):
            if field.name in kwargs:
                value = kwargs.pop(field.name)
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                value = field.default
            setattr(self, field.name, value)
        self._from_model_config = bool(kwargs.pop("_from_model_config", False))
        self.transformers_version = kwargs.pop("transformers_version", None)
        kwargs.pop("_commit_hash", None)
        self._extra_keys: list[str] = []
        for key, value in kwargs.items():
            self._set_extra(key, value)

    def _set_extra(self, key: str, value: Any) -> None:
        setattr(self, key, value)
        if key not in self._extra_keys:
            self._extra_keys.append(key)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> GenerationConfig:
        config = cls(**{**config_dict, **kwargs})
        config.validate(is_init=True)
        return config

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        config_file_name: str = GENERATION_CONFIG_NAME,
        **kwargs: Any,
    ) -> GenerationConfig:
        """Read `generation_config.json` from a checkpoint folder (or the given file);
        kwargs override."""
        path = Path(folder)
        if path.is_dir() or path.suffix != ".json":
            path = path / config_file_name
        if not path.is_file():
            raise FileNotFoundError(f"no generation config: looked for {path}")
        return cls.from_dict(read_json_object(path), **kwargs)

    @classmethod
    def from_model_config(cls, model_config: Any) -> GenerationConfig:
        """The generation settings a model config carries:
        bos/eos/pad ids and any generation field set on it."""
        if hasattr(model_config, "to_dict"):
            values = dict(model_config.to_dict())
        else:
            values = {k: v for k, v in vars(model_config).items() if not k.startswith("_")}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            values.setdefault(name, getattr(model_config, name, None))
        declared = {field.name for field in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in declared}, _from_model_config=True)
        config.validate(is_init=True)
        return config

    # -- mutation and checks -----------------------------------------------------------------------

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the attributes this config has; return the keyword arguments it does not know."""
        unused = {}
        for key, value in kwargs.items():
            if hasattr(self, key) and not key.startswith("_"):
                setattr(self, key, value)
            else:
                unused[key] = value
        return unused

    def validate(self, is_init: bool = False) -> None:
        """Raise ValueError for unusable settings; warn (UserWarning) about ignored ones,
        as transformers does."""
        for check in (
            _check_lengths,
            _check_strategy,
            _check_beam_modes,
            _check_sampling,
            _check_penalties,
            _check_token_ids,
        ):
            check(self)
        for arg in _GENERATE_ARGUMENTS:
            if hasattr(self, arg):
                raise ValueError(
                    f"`{arg}` is an argument of `generate()`, not a GenerationConfig field; "
                    "pass it to generate()"
                )
        _warn_ignored_flags(self, is_init)

    # -- serialisation -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = {
            field.name: copy.deepcopy(getattr(self, field.name))
            for field in dataclasses.fields(self)
        }
        out.update({key: copy.deepcopy(getattr(self, key)) for key in self._extra_keys})
        if self._from_model_config:
            out["_from_model_config"] = True
        if self.transformers_version is not None:
            out["transformers_version"] = self.transformers_version
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the values that differ from `GenerationConfig()` (what transformers writes to
        disk)."""
        defaults = GenerationConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k not in defaults or v != defaults[k]}

    def to_json_string(self, use_diff: bool = True) -> str:
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(
        self, save_directory: str | os.PathLike, config_file_name: str = GENERATION_CONFIG_NAME
    ) -> None:
        """Validate, then write `generation_config.json` as one commit (`files.folder_save`)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.validate()
        if caught:
            raise ValueError(
                "refusing to save an inconsistent generation config: "
                + "; ".join(str(w.message) for w in caught)
            )
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained needs a directory, but {folder} is a file")
        with files.folder_save(folder, files.owns_names(config_file_name)) as staging:
            files.write_text(staging / config_file_name, self.to_json_string())

    # -- python protocol ---------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GenerationConfig):
            return NotImplemented
        return _without_metadata(self.to_dict()) == _without_metadata(other.to_dict())

    def __hash__(self) -> int:
        return hash(json.dumps(_without_metadata(self.to_dict()), sort_keys=True, default=str))

    def __repr__(self) -> str:
        return f"GenerationConfig {self.to_json_string()}"


def load_generation_config(folder: str | os.PathLike, model_config: Any) -> GenerationConfig:
    """`generation_config.json` from the folder when it has one,
    else the model config's generation settings."""
    if (Path(folder) / GENERATION_CONFIG_NAME).is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_model_config(model_config)


def attach_generation_config(model: Any, folder: str | os.PathLike) -> None:
    """from_pretrained's last step in both frameworks: a model that can generate (a
    GenerationConfigMixin) takes the folder's `generation_config.json`. Without that file it keeps
    deriving its settings from its own config on first use (see GenerationConfigMixin); a model that
    cannot generate gets nothing."""
    has_file = (Path(folder) / GENERATION_CONFIG_NAME).is_file()
    if isinstance(model, GenerationConfigMixin) and has_file:
        model.generation_config = GenerationConfig.from_pretrained(folder)


# -- validation helpers (each raises ValueError naming the field, the value and what is allowed) ---


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count_or_none(value: Any) -> bool:
    return value is None or (_is_int(value) and value >= 0)


def _is_fraction_or_none(value: Any) -> bool:
    return value is None or (_is_number(value) and 0 < value <= 1)


def _is_cutoff(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1


def _is_positive_or_none(value: Any) -> bool:
    return value is None or (_is_number(value) and value > 0)


def _require_each(
    config: GenerationConfig, rule: str, ok: Callable[[Any], bool], *names: str
) -> None:
    """`_require` for each setting in `names`: `ok(value)`, or "`name` must be {rule}"."""
    for name in names:
        value = getattr(config, name)
        _require(ok(value), f"`{name}` must be {rule}, got {value!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_lengths(config: GenerationConfig) -> None:
    _require(
        _is_int(config.max_length) and config.max_length >= 1,
        f"`max_length` must be a positive integer, got {config.max_length!r}",
    )
    _require(
        config.max_new_tokens is None
        or (_is_int(config.max_new_tokens) and config.max_new_tokens >= 1),
        f"`max_new_tokens` must be a positive integer or None, got {config.max_new_tokens!r}",
    )
    _require_each(
        config, "a non-negative integer", _is_count_or_none, "min_length", "min_new_tokens"
    )
    _require(
        config.max_time is None or (_is_number(config.max_time) and config.max_time > 0),
        f"`max_time` must be a positive number of seconds or None, got {config.max_time!r}",
    )


def _check_strategy(config: GenerationConfig) -> None:
    _require(
        isinstance(config.early_stopping, bool) or config.early_stopping == "never",
        f"`early_stopping` must be True, False or 'never', got {config.early_stopping!r}",
    )
    for name in ("num_beams", "num_beam_groups", "num_return_sequences"):
        value = getattr(config, name)
        _require(
            _is_int(value) and value >= 1, f"`{name}` must be a positive integer, got {value!r}"
        )
    if config.num_return_sequences != 1:
        if config.num_beams == 1 and not config.do_sample:
            raise ValueError(
                f"`num_return_sequences` ({config.num_return_sequences}) > 1 needs sampling "
                "(do_sample=True) or beam search (num_beams >= num_return_sequences); "
                "greedy decoding returns one sequence"
            )
        if config.num_beams > 1 and config.num_return_sequences > config.num_beams:
            raise ValueError(
                f"`num_return_sequences` ({config.num_return_sequences}) must be "
                f"<= `num_beams` ({config.num_beams})"
            )
    _require(
        _is_number(config.length_penalty),
        f"`length_penalty` must be a number, got {config.length_penalty!r}",
    )


def _check_beam_modes(config: GenerationConfig) -> None:
    """transformers' rules for constrained and group (diverse) beam search."""
    if config.num_beams == 1:
        return
    if config.constraints is not None:
        for name, off in (("do_sample", False), ("num_beam_groups", 1)):
            _require(
                getattr(config, name) == off,
                f"`constraints` (constrained beam search) cannot be combined with `{name}`="
                f"{getattr(config, name)!r}; use {off!r}",
            )
    if config.diversity_penalty != 0.0 or config.num_beam_groups != 1:
        prefix = "group beam search (`num_beam_groups` > 1 or `diversity_penalty` != 0) needs"
        _require(not config.do_sample, f"{prefix} do_sample=False")
        _require(
            _is_int(config.num_beam_groups) and config.num_beams % config.num_beam_groups == 0,
            f"{prefix} `num_beams` ({config.num_beams}) divisible by `num_beam_groups` "
            f"({config.num_beam_groups})",
        )
        _require(
            config.diversity_penalty != 0.0,
            f"{prefix} `diversity_penalty` > 0, else the groups are identical",
        )


def _check_sampling(config: GenerationConfig) -> None:
    if not config.do_sample:
        return
    _require(
        _is_number(config.temperature) and config.temperature > 0,
        f"`temperature` must be a number > 0 when do_sample=True, got {config.temperature!r}"
        + (" (for greedy decoding set do_sample=False)" if config.temperature == 0 else ""),
    )
    _require(
        config.top_k is None or (_is_int(config.top_k) and config.top_k >= 0),
        f"`top_k` must be an integer >= 0 (0 disables it), got {config.top_k!r}",
    )
    _require_each(config, "in (0, 1] (1 disables it)", _is_fraction_or_none, "top_p", "typical_p")
    _require_each(config, "in [0, 1) (0 disables it)", _is_cutoff, "epsilon_cutoff", "eta_cutoff")


# Over 40 lines: one check per penalty setting, each with its own message.
def _check_penalties(config: GenerationConfig) -> None:
    _require_each(
        config,
        "a number > 0 (1.0 disables it)",
        _is_positive_or_none,
        "repetition_penalty",
        "encoder_repetition_penalty",
    )
    _require_each(
        config,
        "an integer >= 0 (0 disables it)",
        _is_count_or_none,
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
    )
    words = config.bad_words_ids
    if words is not None:
        _require(
            isinstance(words, list)
            and len(words) > 0
            and all(isinstance(seq, list) and len(seq) > 0 for seq in words)
            and all(_is_int(t) and t >= 0 for seq in words for t in seq),
            "`bad_words_ids` must be a non-empty list of non-empty lists of token ids >= 0, "
            f"got {words!r}",
        )
    bias = config.sequence_bias
    if bias is not None:
        _require(
            isinstance(bias, dict)
            and len(bias) > 0
            and all(
                isinstance(k, tuple) and len(k) > 0 and all(_is_int(t) and t >= 0 for t in k)
                for k in bias
            )
            and all(isinstance(v, float) for v in bias.values()),
            "`sequence_bias` must be a non-empty dict of token-id tuples to float biases, "
            f"got {bias!r}",
        )
    penalty = config.exponential_decay_length_penalty
    _require(
        penalty is None
        or (
            isinstance(penalty, (list, tuple))
            and len(penalty) == 2
            and _is_int(penalty[0])
            and _is_number(penalty[1])
        ),
        "`exponential_decay_length_penalty` must be (start_index: int, decay_factor: float), "
        f"got {penalty!r}",
    )


def _check_token_ids(config: GenerationConfig) -> None:
    # transformers accepts any int as pad_token_id (it fills finished rows, -1 included)
    pad = config.pad_token_id
    _require(pad is None or _is_int(pad), f"`pad_token_id` must be an int or None, got {pad!r}")
    _require_each(
        config,
        "a token id >= 0 or None",
        _is_count_or_none,
        "bos_token_id",
        "forced_bos_token_id",
        "decoder_start_token_id",
    )
    # A negative eos id matches no token: generation runs to max_length (transformers accepts it).
    for name, lowest in (("eos_token_id", None), ("forced_eos_token_id", 0)):
        value = getattr(config, name)
        values = value if isinstance(value, list) else [value]
        ok = value is None or (
            len(values) > 0 and all(_is_int(t) and (lowest is None or t >= lowest) for t in values)
        )
        allowed = "a token id" if lowest is None else "a token id >= 0"
        _require(
            ok, f"`{name}` must be {allowed}, a non-empty list of them, or None; got {value!r}"
        )
    eos = config.eos_token_id
    negative = [t for t in (eos if isinstance(eos, list) else [eos]) if _is_int(t) and t < 0]
    _require(
        not negative or not (config.min_length or config.min_new_tokens),
        f"`min_length`/`min_new_tokens` ban the eos ids until then, which needs ids >= 0; got "
        f"eos_token_id={eos!r} (a negative id means generation never stops at eos)",
    )


def _warn_ignored_flags(config: GenerationConfig, is_init: bool) -> None:
    where = " (found when reading a generation config; the file should be fixed)" if is_init else ""
    ignored = []
    if not config.do_sample:
        defaults = {
            "temperature": 1.0,
            "top_p": 1.0,
            "typical_p": 1.0,
            "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0,
        }
        ignored += [
            (name, "do_sample=True") for name, d in defaults.items() if getattr(config, name) != d
        ]
        if config.top_k != 50 and config.penalty_alpha is None:  # contrastive search uses top_k
            ignored.append(("top_k", "do_sample=True"))
    if config.num_beams == 1:
        defaults = {
            "early_stopping": False,
            "num_beam_groups": 1,
            "diversity_penalty": 0.0,
            "length_penalty": 1.0,
            "constraints": None,
        }
        ignored += [
            (name, "num_beams > 1") for name, d in defaults.items() if getattr(config, name) != d
        ]
    for name, needs in ignored:
        warnings.warn(
            f"`{name}` is set to {getattr(config, name)!r} but only takes effect with {needs}; "
            f"set {needs} or unset `{name}`{where}",
            UserWarning,
            stacklevel=3,
        )


def _without_metadata(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in _METADATA_KEYS}


class GenerationConfigMixin:
    """The `generation_config` attribute of the causal-LM classes of both frameworks: what the
    folder's `generation_config.json` says when the model was loaded from one, else ids taken from
    the model config."""

    _generation_config: GenerationConfig | None = None

    @property
    def generation_config(self) -> GenerationConfig:
        if self._generation_config is None:
            self._generation_config = GenerationConfig.from_model_config(self.config)
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        self._generation_config = value
