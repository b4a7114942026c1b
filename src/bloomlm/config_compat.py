"""The generic half of transformers 4.37's `PretrainedConfig`, for `BloomConfig` only.

Code written against transformers' base class (PEFT, `Trainer`, pipelines, people's scripts) reads
generic attributes (`is_encoder_decoder`, `use_return_dict`, `forced_bos_token_id`, ...) and calls
generic methods (`to_diff_dict`, `to_json_file`, `update_from_string`, ...). This module holds
those attributes' defaults as one table and the methods as a mixin, written once for BLOOM's
config: no registry, no nested configs, no hub upload. Framework-free, like `config.py`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

# transformers 4.37's `PretrainedConfig._get_generation_defaults()`: generation settings that a
# model config may carry (legacy: they belong in generation_config.json).
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
}

# Every attribute `PretrainedConfig()` sets, with its default, as its `to_dict()` writes them
# (`id2label`/`label2id`/`_name_or_path` are kept by BloomConfig itself). Most mean nothing to a
# decoder-only model without pruning or TorchScript; they are data, so files and code that carry
# them keep working.
GENERIC_DEFAULTS: dict[str, Any] = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "torchscript": False,
    "torch_dtype": None,
    "use_bfloat16": False,
    "tf_legacy_loss": False,
    "pruned_heads": {},
    "tie_word_embeddings": True,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "is_decoder": False,
    "cross_attention_hidden_size": None,
    "add_cross_attention": False,
    "tie_encoder_decoder": False,
    **GENERATION_DEFAULTS,
    "architectures": None,
    "finetuning_task": None,
    "tokenizer_class": None,
    "prefix": None,
    "bos_token_id": None,
    "pad_token_id": None,
    "eos_token_id": None,
    "sep_token_id": None,
    "decoder_start_token_id": None,
    "task_specific_params": None,
    "problem_type": None,
}

# What `PretrainedConfig().to_dict()` holds besides GENERIC_DEFAULTS: the base of `to_diff_dict`.
_BASE_CONFIG_DICT: dict[str, Any] = {
    **GENERIC_DEFAULTS,
    "id2label": {0: "LABEL_0", 1: "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "_name_or_path": "",
    "model_type": "",
}


@functools.lru_cache(maxsize=4)
def _class_defaults(config_class: type) -> dict[str, Any]:
    """`config_class().to_dict()`, made once (read-only: callers must not change it)."""
    return config_class().to_dict()


def _parse_like(old: Any, text: str, key: str) -> Any:
    """`text` as the type of the value it replaces (transformers' update_from_string rules)."""
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "y", "yes"):
            return True
        if text.lower() in ("false", "0", "n", "no"):
            return False
        raise ValueError(f"can't derive true or false from {text!r} (key {key})")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    raise ValueError(
        f"update_from_string can only update int, float, bool or str values, "
        f"but {key} holds {old!r}"
    )


class PretrainedConfigAPI:
    """transformers' generic config methods over a class that defines `to_dict()` and keeps its
    attributes settable (BloomConfig)."""

    is_composition = False
    # transformers' `keys_to_ignore_at_inference` for BLOOM: outputs `Trainer` leaves out of eval.
    keys_to_ignore_at_inference = ["past_key_values"]

    def to_dict(self) -> dict[str, Any]:  # defined by the config class
        raise NotImplementedError

    @property
    def use_return_dict(self) -> bool:
        """Whether models return output dataclasses (not with `torchscript`, as in transformers)."""
        return bool(self.return_dict and not self.torchscript)

    @property
    def name_or_path(self) -> str:
        """The folder or hub name this config was loaded from ("" when built in code)."""
        return self._name_or_path

    @name_or_path.setter
    def name_or_path(self, value: str | os.PathLike) -> None:
        object.__setattr__(self, "_name_or_path", str(value))

    def to_diff_dict(self) -> dict[str, Any]:
        """The values that differ from `PretrainedConfig()`'s or from this class's defaults:
        what transformers writes to config.json."""
        class_defaults = _class_defaults(type(self))
        return {
            key: value
            for key, value in self.to_dict().items()
            if key not in _BASE_CONFIG_DICT
            or value != _BASE_CONFIG_DICT[key]
            or (key in class_defaults and value != class_defaults[key])
        }

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON with sorted keys; only the non-default values with `use_diff` (transformers')."""
        config_dict = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(config_dict, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Write `to_json_string(use_diff)` to a file, atomically."""
        from bloomlm.files import atomic_write_text

        atomic_write_text(json_file_path, self.to_json_string(use_diff=use_diff))

    def update(self, config_dict: dict[str, Any]) -> None:
        """Set each key of `config_dict` as an attribute (unknown keys become extra keys)."""
        for key, value in config_dict.items():
            setattr(self, key, value)

    def update_from_string(self, update_str: str) -> None:
        """`"n_layer=4,use_cache=false"`: update existing keys, each parsed as its current type."""
        pairs = [item.split("=", 1) for item in update_str.split(",")]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(
                f"update_from_string expects 'key=value,key=value', got {update_str!r}"
            )
        for key, text in pairs:
            if not hasattr(self, key):
                raise ValueError(f"key {key} isn't in the original config dict")
            setattr(self, key, _parse_like(getattr(self, key), text, key))
