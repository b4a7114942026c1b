"""BloomConfig: the hyperparameters of a BLOOM checkpoint, read from and written to `config.json`.

Framework-free on purpose (no torch, no jax), so the Flax side, the CLI and tools can import it
alone. Field names and defaults are transformers 4.37's, so a folder written by either library reads
in the other. Hub configs of the original bigscience checkpoints use Megatron-era names (`n_embed`,
`num_attention_heads`) and carry keys transformers never declared (`seq_length`, `offset_alibi`,
...): the names are mapped, the extra keys kept as attributes and written back unchanged.

transformers' generic `PretrainedConfig` surface (its attributes and `to_diff_dict`, `to_json_file`,
`update`, ...) comes from `bloomlm.config_compat`. As in transformers, building a config checks
nothing that involves several fields, so a config can be built up step by step; `validate()` runs
where a model is built from it (`BloomModel(config)`, `from_pretrained`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from bloomlm.config_compat import GENERIC_DEFAULTS, PretrainedConfigAPI
from bloomlm.errors import CheckpointNotFoundError

CONFIG_NAME = "config.json"

# Declared fields and their defaults, grouped as the architecture uses them.
_DEFAULTS: dict[str, Any] = {
    # shapes
    "vocab_size": 250880,
    "hidden_size": 64,
    "n_layer": 2,
    "n_head": 8,
    # numerics and regularisation
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "apply_residual_connection_post_layernorm": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    # Megatron tensor parallelism used in pre-training; > 1 only matters with slow_but_exact
    "pretraining_tp": 1,
    "slow_but_exact": False,
    # tokens
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    # heads
    "tie_word_embeddings": True,
    "problem_type": None,
    # forward-call defaults
    "use_cache": True,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict": True,
    # bookkeeping
    "torch_dtype": None,
    "architectures": None,
}

# Every declared attribute: transformers' generic ones, then BLOOM's (which override bos/eos ids).
_FIELDS: dict[str, Any] = {**GENERIC_DEFAULTS, **_DEFAULTS}

# Read by the heads but, as in transformers' BloomConfig, not declared: written only when set.
_OPTIONAL_FIELDS: dict[str, Any] = {"classifier_dropout": None}

# Other names for the same field: (alias -> field). The first two are transformers' attribute_map,
# `n_embed` is what the original hub files call hidden_size.
ALIASES = {
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "n_embed": "hidden_size",
}

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Keys written by transformers that carry no meaning for a model and are not kept as extras.
_DROPPED_KEYS = {
    "model_type",
    "transformers_version",
    "num_labels",
    "attn_implementation",
    "_attn_implementation_internal",
}


class BloomConfig(PretrainedConfigAPI):
    """Configuration of a BLOOM model; `BloomConfig()` gives transformers 4.37's defaults.

    Any keyword that is not a declared field is kept as an attribute and written back by
    `save_pretrained` (the hub files carry several). `num_labels` sets `id2label`/`label2id`.
    """

    model_type = "bloom"
    attribute_map = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}

    def __init__(self, **kwargs: Any) -> None:
        kwargs = _resolve_aliases(kwargs)
        for name, default in _FIELDS.items():
            object.__setattr__(self, name, copy.deepcopy(kwargs.pop(name, default)))
        object.__setattr__(self, "_extra_keys", [])
        name_or_path = kwargs.pop("name_or_path", kwargs.pop("_name_or_path", ""))
        object.__setattr__(self, "_name_or_path", str(name_or_path))
        # The hub revision a loaded config came from (pipelines read it); never written.
        object.__setattr__(self, "_commit_hash", kwargs.pop("_commit_hash", None))
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        for key in _DROPPED_KEYS:
            kwargs.pop(key, None)
        if id2label is not None:
            self.id2label = id2label
            if label2id is not None:
                self.label2id = {str(k): int(v) for k, v in label2id.items()}
        else:
            self.num_labels = 2 if num_labels is None else num_labels
        if num_labels is not None and num_labels != len(self.id2label):
            self.num_labels = num_labels
        for key, value in kwargs.items():
            setattr(self, key, value)
        # The one check transformers makes when a config is built; the rest wait for a model.
        _check_problem_type(self.problem_type)

    # -- attributes -------------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        name = ALIASES.get(name, name)
        if name == "torch_dtype" and value is not None and not isinstance(value, str):
            value = str(value).removeprefix("torch.")  # a torch.dtype, stored by name as in JSON
        if (
            name not in _FIELDS
            and not name.startswith("_")
            and name not in ("id2label", "label2id")
        ):
            if name not in self._extra_keys and not isinstance(
                getattr(type(self), name, None), property
            ):
                self._extra_keys.append(name)
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: aliases resolve to their field, optional fields
        # that were never set read as their default.
        if name in ALIASES:
            return getattr(self, ALIASES[name])
        if name in _OPTIONAL_FIELDS:
            return _OPTIONAL_FIELDS[name]
        raise AttributeError(f"'BloomConfig' has no attribute '{name}'")

    @property
    def id2label(self) -> dict[int, str]:
        return self._id2label

    @id2label.setter
    def id2label(self, mapping: dict) -> None:
        # JSON turns int keys into strings; transformers turns them back, so do we.
        id2label = {int(k): str(v) for k, v in mapping.items()}
        object.__setattr__(self, "_id2label", id2label)
        object.__setattr__(self, "label2id", {v: k for k, v in id2label.items()})

    @property
    def num_labels(self) -> int:
        return len(self._id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"num_labels must be a positive integer, got {n!r}")
        if getattr(self, "_id2label", None) is None or len(self._id2label) != n:
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    # -- validation -------------------------------------------------------------------------------

    # Over 40 lines: one check per config field, each naming the field.
    def validate(self) -> None:
        """Raise ValueError naming the field when a value cannot describe a BLOOM model.

        Models call it when they are built from this config; building the config does not.
        """
        if self.num_labels < 1:
            raise ValueError(
                f"BloomConfig.num_labels must be a positive integer, got {self.num_labels}"
            )
        for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "pretraining_tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BloomConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_head != 0:
            raise ValueError(
                f"BloomConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"n_head ({self.n_head}); "
                f"allowed n_head values divide {self.hidden_size}"
            )
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(
                    f"BloomConfig.{name} must be a probability in [0, 1], got {value!r}"
                )
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ValueError(
                f"BloomConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}"
            )
        _check_problem_type(self.problem_type)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and not 0 <= value < self.vocab_size
            ):
                raise ValueError(
                    f"BloomConfig.{name} ({value}) must lie in [0, vocab_size={self.vocab_size}) "
                    "or be None"
                )

    # -- dict / json ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every attribute, as transformers' BloomConfig.to_dict() gives them (less its version)."""
        out: dict[str, Any] = {"model_type": self.model_type, "_name_or_path": self._name_or_path}
        for name in _FIELDS:
            out[name] = copy.deepcopy(getattr(self, name))
        out["id2label"] = dict(self.id2label)
        out["label2id"] = dict(self.label2id)
        for name in self._extra_keys:
            out[name] = copy.deepcopy(getattr(self, name))
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> BloomConfig:
        """`kwargs` override the dict's values; with `return_unused_kwargs=True` returns
        (config, {}), as transformers does (every keyword is kept here)."""
        return_unused = kwargs.pop("return_unused_kwargs", False)
        config = cls(**{**config_dict, **kwargs})
        return (config, {}) if return_unused else config

    @classmethod
    def from_json_string(cls, text: str) -> BloomConfig:
        """The inverse of `to_json_string`."""
        config_dict = json.loads(text)
        if not isinstance(config_dict, dict):
            raise ValueError(f"a config's JSON must be an object, got {type(config_dict).__name__}")
        return cls.from_dict(config_dict)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BloomConfig:
        from bloomlm.files import read_json_object

        return cls.from_dict(read_json_object(path))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> BloomConfig:
        """Read `config.json` from a folder (or a hub name, see `bloomlm.hub`);
        kwargs override fields."""
        from bloomlm.hub import HUB_KEYWORDS, resolve_model_dir

        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KEYWORDS}
        return_unused = kwargs.pop("return_unused_kwargs", False)
        path = Path(name_or_path)
        if path.is_file():
            config = cls.from_json_file(path)
        else:
            folder = resolve_model_dir(name_or_path, [CONFIG_NAME], **hub_kwargs)
            config = cls.from_json_file(folder / CONFIG_NAME)
        config.update(kwargs)
        return (config, {}) if return_unused else config

    def with_overrides(self, **overrides: Any) -> BloomConfig:
        """A validated copy with `overrides` set; this config is left as it is.

        Allowed keys: the declared fields, their aliases, `num_labels`/`id2label`/`label2id`, and
        the extra keys this config already carries. `id2label` alone also sets `num_labels` to its
        length.
        """
        allowed = set(self.to_dict()) | set(ALIASES) | set(_OPTIONAL_FIELDS) | {"num_labels"}
        unknown = sorted(key for key in overrides if key not in allowed)
        if unknown:
            extras = f", this config's extra keys {self._extra_keys}" if self._extra_keys else ""
            raise TypeError(
                f"unexpected keyword arguments {unknown}: not BloomConfig fields (config keys "
                f"allowed: the fields {sorted(_DEFAULTS)}, their aliases {sorted(ALIASES)}, "
                f"num_labels, id2label, label2id, classifier_dropout, transformers' generic "
                f"config attributes such as output_hidden_states{extras})"
            )
        if "id2label" in overrides and "num_labels" not in overrides:
            overrides = {**overrides, "num_labels": len(overrides["id2label"])}
        config = BloomConfig.from_dict(self.to_dict())
        for key, value in overrides.items():
            setattr(config, key, value)
        config.validate()
        return config

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` into the folder, as one commit (`bloomlm.files.folder_save`)."""
        from bloomlm import files

        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained needs a directory, but {folder} is a file")
        with files.folder_save(folder, files.owns_names(CONFIG_NAME)) as staging:
            files.write_text(staging / CONFIG_NAME, self.to_json_string(use_diff=True))

    # -- python protocol ---------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        # Where a config was read from is not part of what it says (transformers compares it too).
        if not isinstance(other, BloomConfig):
            return False
        mine, theirs = self.to_dict(), other.to_dict()
        mine.pop("_name_or_path")
        theirs.pop("_name_or_path")
        return mine == theirs

    def __repr__(self) -> str:
        return f"BloomConfig {self.to_json_string()}"

    def __deepcopy__(self, memo: dict) -> BloomConfig:
        return BloomConfig.from_dict(self.to_dict())

    def __reduce__(self):  # pickling, e.g. for multiprocessing data loaders
        return (BloomConfig.from_dict, (self.to_dict(),))


# -- model size -------------------------------------------------------------------------------

MAX_PARAMETERS = 10**13
# The deepest transformers ever trained have about 1,000 layers (DeepNet); BLOOM-176B has 70.
MAX_LAYERS = 10_000
# BLOOM-176B's shape: the yardstick for naming which field made a size absurd.
_BLOOM_176B = {"vocab_size": 250880, "hidden_size": 14336, "n_layer": 70}


def check_buildable(config: Any, owner: str) -> BloomConfig:
    """`config` as a model class takes it (both frameworks' constructors call this): a
    BloomConfig, valid, and of a size that can be built; else the error, before anything is
    built or traced."""
    if not isinstance(config, BloomConfig):
        raise TypeError(f"{owner} needs a bloomlm.BloomConfig, got {type(config).__name__}")
    config.validate()
    check_model_size(config)
    return config


def check_model_size(config: BloomConfig) -> int:
    """The parameter count of the largest model `config` describes (the trunk plus its largest
    head: an untied LM head, or a task head), computed from the config alone; a ValueError naming
    the field, at once, when it is absurd (over MAX_LAYERS layers, over MAX_PARAMETERS
    parameters), before anything is built.

    Called where models are built (both frameworks) and by `bloomlm info`: a config.json asking
    for 10**9 layers or a hidden size of 10**12 must fail here, not hang building modules or fail
    in an allocator.
    """
    vocab, hidden, layers = config.vocab_size, config.hidden_size, config.n_layer
    if not all(isinstance(v, int) and v > 0 for v in (vocab, hidden, layers)):
        return 0  # validate() names the field that is not a positive integer
    if layers > MAX_LAYERS:
        raise ValueError(
            f"BloomConfig.n_layer={layers} is absurd: more than {MAX_LAYERS:,} layers (BLOOM-176B "
            "has 70); check config.json"
        )
    # Per block: fused QKV 3C*C + 3C, dense C*C + C, MLP 4C*C + 4C and 4C*C + C, two LayerNorms 4C.
    block = 12 * hidden * hidden + 13 * hidden
    lm_head = 0 if config.tie_word_embeddings else vocab * hidden
    head = max(lm_head, config.num_labels * (hidden + 1), 2 * hidden + 2)  # the largest head
    # Embeddings and their LayerNorm, the blocks, the final LayerNorm, a head.
    parameters = vocab * hidden + 2 * hidden + layers * block + 2 * hidden + head
    if parameters > MAX_PARAMETERS:
        # Name the field furthest above BLOOM-176B's value.
        field = max(_BLOOM_176B, key=lambda name: getattr(config, name) / _BLOOM_176B[name])
        raise ValueError(
            f"BloomConfig.{field}={getattr(config, field)} is absurd: the model would have "
            f"{parameters:.3g} parameters ({4 * parameters:.3g} bytes in float32), more than "
            f"{MAX_PARAMETERS:.0e} (BLOOM-176B: {field}={_BLOOM_176B[field]}, 1.76e+11 "
            "parameters); check config.json"
        )
    return parameters


def load_model_config(
    folder: str | os.PathLike,
    config: Any = None,
    overrides: dict[str, Any] | None = None,
    *,
    caller: str,
) -> BloomConfig:
    """The config `from_pretrained` builds a model from, in both frameworks: a copy of `config` when
    one is given (any object with `to_dict`), else the folder's `config.json`; `overrides` applied.

    `caller` names the API in errors: a missing config.json is a CheckpointNotFoundError, a keyword
    that is no config field a TypeError.
    """
    if config is None:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"{folder} has no {CONFIG_NAME}; a BLOOM model folder needs one"
            )
        config = BloomConfig.from_json_file(path)
        config.name_or_path = folder  # as transformers' models record where they came from
    else:
        config = BloomConfig.from_dict(config.to_dict())
    try:
        return config.with_overrides(**(overrides or {}))
    except TypeError as err:
        raise TypeError(f"{caller} got {err}") from None


def _check_problem_type(problem_type: Any) -> None:
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ValueError(
            f"BloomConfig.problem_type must be one of {PROBLEM_TYPES} or None, got {problem_type!r}"
        )


def _resolve_aliases(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for alias, field in ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            # An explicit field wins over its alias only if the alias is absent; both present and
            # different is a contradiction in the file.
            if field in out and out[field] != value:
                raise ValueError(
                    f"config sets both {field}={out[field]!r} and its alias {alias}={value!r}"
                )
            out[field] = value
    return out
