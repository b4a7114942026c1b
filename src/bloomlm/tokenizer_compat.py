"""The rest of transformers 4.37's `PreTrainedTokenizerFast` public methods, for BLOOM's tokenizer.

`BloomTokenizerFast` (tokenizer.py) owns encoding, padding, decoding and files; code written
against transformers' generic tokenizer also calls the older entry points (`encode_plus`,
`batch_encode_plus`), the building blocks of slow tokenizers (`prepare_for_model`,
`build_inputs_with_special_tokens`, ...), chat templates and `train_new_from_iterator`. They live
here as one mixin, each with transformers' results: BLOOM adds no special tokens around a text, so
the building blocks are simple concatenations.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

from tokenizers import AddedToken, Tokenizer, trainers

from bloomlm import chat

logger = logging.getLogger(__name__)

PAD_TO_MAX_LENGTH_WARNING = (
    "The `pad_to_max_length` argument is deprecated and will be removed in a future version, use "
    "`padding=True` or `padding='longest'` to pad to the longest sequence in the batch, or use "
    "`padding='max_length'` to pad to a max length. In this case, you can give a specific length "
    "with `max_length` (e.g. `max_length=45`) or leave max_length to None to pad to the maximal "
    "input size of the model (e.g. 512 for Bert)."
)


def legacy_padding(
    padding: Any, pad_to_max_length: bool, max_length: int | None, verbose: bool
) -> Any:
    """transformers' old `pad_to_max_length=True`: "longest" without max_length, else
    "max_length", with its FutureWarning; ignored when `padding` is set."""
    if not pad_to_max_length or padding is not False:
        return padding
    if verbose:
        warnings.warn(PAD_TO_MAX_LENGTH_WARNING, FutureWarning, stacklevel=3)
    return "longest" if max_length is None else "max_length"


class PreTrainedTokenizerFastAPI:
    """Mixed into BloomTokenizerFast; uses its `__call__`, `pad`, special tokens and backend."""

    # -- older entry points ------------------------------------------------------------------------

    def encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> Any:
        """One text (or pair) to a BatchEncoding, as `tokenizer(text, text_pair, ...)`."""
        if isinstance(text, list | tuple) and not kwargs.get("is_split_into_words"):
            raise TypeError(
                "encode_plus takes one text (str); for a batch use batch_encode_plus or call the "
                "tokenizer on a list"
            )
        return self(text, text_pair, **kwargs)

    def batch_encode_plus(self, batch_text_or_text_pairs: Any, **kwargs: Any) -> Any:
        """A list of texts, or of (text, text_pair) tuples, to one BatchEncoding."""
        if isinstance(batch_text_or_text_pairs, str) or not isinstance(
            batch_text_or_text_pairs, list | tuple
        ):
            raise TypeError(
                "batch_encode_plus takes a list of texts or of (text, text_pair) pairs, got "
                f"{type(batch_text_or_text_pairs).__name__}"
            )
        batch = list(batch_text_or_text_pairs)
        pre_split = kwargs.get("is_split_into_words", False)
        if batch and all(isinstance(item, tuple) and len(item) == 2 for item in batch):
            if not pre_split or all(isinstance(item[0], list | tuple) for item in batch):
                first, second = zip(*batch)
                return self(list(first), list(second), **kwargs)
        return self(batch, **kwargs)

    # -- building blocks of slow tokenizers --------------------------------------------------------

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """BLOOM adds no special tokens: the ids, then the pair's ids."""
        return list(token_ids_0) if token_ids_1 is None else list(token_ids_0) + list(token_ids_1)

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """0 for each token of the first sequence, 1 for each of the pair's."""
        return [0] * len(token_ids_0) + ([1] * len(token_ids_1) if token_ids_1 is not None else [])

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 where an id is a special token's. Like transformers' fast tokenizers this only reads
        ids that already went through the tokenizer (`already_has_special_tokens=True`)."""
        if not already_has_special_tokens or token_ids_1 is not None:
            raise ValueError(
                "get_special_tokens_mask needs already_has_special_tokens=True and one sequence "
                "(a fast tokenizer cannot say where special tokens would be added); or call the "
                "tokenizer with return_special_tokens_mask=True"
            )
        special = set(self.all_special_ids)
        return [1 if token in special else 0 for token in token_ids_0]

    # Over 40 lines for transformers' signature; the body is its steps in order.
    def prepare_for_model(
        self,
        ids: list[int],
        pair_ids: list[int] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        prepend_batch_axis: bool = False,
    ) -> Any:
        """Ids (of `tokenize` + `convert_tokens_to_ids`) to model inputs: truncated, special
        tokens added (none for BLOOM), padded, as transformers' `prepare_for_model`."""
        from bloomlm.encoding import BatchEncoding

        padding_strategy, truncation_strategy, max_length = self._resolve_strategies(
            padding, truncation, max_length, pad_to_multiple_of, verbose
        )
        _check_prepare_options(
            pair_ids is not None, add_special_tokens, truncation_strategy, return_token_type_ids,
            return_overflowing_tokens, return_offsets_mapping,
        )  # fmt: skip
        total = len(ids) + (len(pair_ids) if pair_ids is not None else 0)
        encoded: dict[str, Any] = {}
        overflowing: list[int] = []
        if truncation_strategy != "do_not_truncate" and max_length and total > max_length:
            ids, pair_ids, overflowing = self.truncate_sequences(
                ids, pair_ids, total - max_length, truncation_strategy, stride
            )
        if return_overflowing_tokens:
            encoded["overflowing_tokens"] = overflowing
            encoded["num_truncated_tokens"] = total - (max_length or 0)
        encoded["input_ids"] = self.build_inputs_with_special_tokens(ids, pair_ids)
        if return_token_type_ids or (
            return_token_type_ids is None and "token_type_ids" in self.model_input_names
        ):
            encoded["token_type_ids"] = self.create_token_type_ids_from_sequences(ids, pair_ids)
        if return_special_tokens_mask:
            encoded["special_tokens_mask"] = [0] * len(encoded["input_ids"])
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        if padding_strategy != "do_not_pad" or return_attention_mask:
            encoded = dict(self.pad(encoded, padding_strategy, max_length, pad_to_multiple_of,
                                    return_attention_mask, verbose=verbose))  # fmt: skip
        if return_length:
            encoded["length"] = len(encoded["input_ids"])
        if prepend_batch_axis:
            encoded = {key: [value] for key, value in encoded.items()}
        return BatchEncoding(encoded, tensor_type=return_tensors)

    def truncate_sequences(
        self,
        ids: list[int],
        pair_ids: list[int] | None = None,
        num_tokens_to_remove: int = 0,
        truncation_strategy: str = "longest_first",
        stride: int = 0,
    ) -> tuple[list[int], list[int] | None, list[int]]:
        """(ids, pair_ids, overflowing tokens) with `num_tokens_to_remove` tokens cut on
        `truncation_side`, by transformers' rules for each strategy."""
        if truncation_strategy is True:
            truncation_strategy = "longest_first"
        if num_tokens_to_remove <= 0 or truncation_strategy in (False, "do_not_truncate"):
            return ids, pair_ids, []
        left = self.truncation_side == "left"
        if truncation_strategy == "longest_first":
            return (*_cut_longest_first(ids, pair_ids, num_tokens_to_remove, left), [])
        if truncation_strategy not in ("only_first", "only_second"):
            raise ValueError(
                f"truncation_strategy must be one of longest_first, only_first, only_second, "
                f"do_not_truncate; got {truncation_strategy!r}"
            )
        second = truncation_strategy == "only_second"
        target = pair_ids if second else ids
        if target is None or len(target) <= num_tokens_to_remove:
            which = "second" if second else "first"
            logger.error(
                f"We need to remove {num_tokens_to_remove} to truncate the input but the {which} "
                f"sequence has a length {0 if target is None else len(target)}."
            )
            return ids, pair_ids, []
        window = min(len(target), stride + num_tokens_to_remove)
        if left:
            overflowing, kept = target[:window], target[num_tokens_to_remove:]
        else:
            overflowing, kept = target[-window:], target[:-num_tokens_to_remove]
        return (ids, kept, overflowing) if second else (kept, pair_ids, overflowing)

    # -- chat templates ----------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The tokenizer_config.json's `chat_template` (None: `default_chat_template` applies)."""
        return self.init_kwargs.get("chat_template")

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is not None and not isinstance(template, str):
            raise TypeError(f"chat_template must be a str or None, got {type(template).__name__}")
        if template is None:
            self.init_kwargs.pop("chat_template", None)
        else:
            self.init_kwargs["chat_template"] = template

    @property
    def default_chat_template(self) -> str:
        """transformers 4.37's default for BLOOM: contents joined by the eos token (said once)."""
        if "default_chat_template" not in self._warned:
            self._warned.add("default_chat_template")
            logger.warning(
                "No chat template is defined for this tokenizer - using the default template for "
                "BloomTokenizerFast (each message's content, then the eos token). Set "
                "`tokenizer.chat_template` if that is not appropriate for your model."
            )
        return chat.DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(
        self,
        conversation: Any,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        **tokenizer_kwargs: Any,
    ) -> str | list[int] | Any:
        """A conversation ([{"role": ..., "content": ...}, ...]) rendered with the chat template
        (the argument, else `chat_template`, else the default) and, with `tokenize`, encoded
        without special tokens: transformers' ids, or the string with `tokenize=False`."""
        messages = getattr(conversation, "messages", conversation)  # a transformers Conversation
        if chat_template is None:
            chat_template = self.chat_template or self.default_chat_template
        rendered = chat.render_chat(
            messages,
            chat_template,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens_map,
        )
        if not tokenize:
            return rendered
        if padding is True:
            padding = "max_length"  # one sequence: "longest" would pad nothing (transformers')
        return self.encode(rendered, add_special_tokens=False, padding=padding,
                           truncation=truncation, max_length=max_length,
                           return_tensors=return_tensors, **tokenizer_kwargs)  # fmt: skip

    # -- a new vocabulary --------------------------------------------------------------------------

    def train_new_from_iterator(
        self,
        text_iterator: Any,
        vocab_size: int,
        length: int | None = None,
        new_special_tokens: list[str | AddedToken] | None = None,
        special_tokens_map: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A tokenizer of this class with the same pipeline (normaliser, pre-tokeniser, decoder)
        and special tokens, its BPE vocabulary trained on `text_iterator` (batches of texts) by
        the `tokenizers` trainer; `kwargs` go to `tokenizers.trainers.BpeTrainer`."""
        rename = special_tokens_map or {}
        spec = json.loads(self._tokenizer.to_str())
        added_tokens, post_processor = spec.pop("added_tokens"), spec.pop("post_processor")
        model = spec["model"]
        if model["type"] != "BPE":
            raise ValueError(f"train_new_from_iterator trains BPE models, got {model['type']}")
        model["vocab"], model["merges"] = {}, []
        if model.get("unk_token") in rename:
            model["unk_token"] = rename[model["unk_token"]]
        backend = Tokenizer.from_str(json.dumps(spec))
        special_tokens = [
            _renamed_token(token, rename) for token in added_tokens if token["special"]
        ]
        special_tokens += list(new_special_tokens or [])
        for option in ("continuing_subword_prefix", "end_of_word_suffix"):
            if option not in kwargs and model.get(option) is not None:
                kwargs[option] = model[option]
        if (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
            kwargs["initial_alphabet"] = _byte_level_alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special_tokens, **kwargs
        )
        backend.train_from_iterator(text_iterator, trainer=trainer, length=length)
        if post_processor is not None:  # BLOOM's is ByteLevel: no special-token ids to renumber
            trained = json.loads(backend.to_str())
            trained["post_processor"] = post_processor
            backend = Tokenizer.from_str(json.dumps(trained))
        return type(self)(backend, **self._init_kwargs_for_new(rename, new_special_tokens))

    def _init_kwargs_for_new(self, rename: dict[str, str], new_special_tokens: Any) -> dict:
        """This tokenizer's init kwargs with its special tokens renamed by `rename`."""
        kwargs = {k: v for k, v in self.init_kwargs.items() if k != "added_tokens_decoder"}
        for name, token in self._special_tokens.items():
            if name == "additional_special_tokens" or token is None:
                continue
            content = token.content if isinstance(token, AddedToken) else token
            content = rename.get(content, content)
            if isinstance(token, AddedToken):
                flags = dict(single_word=token.single_word, lstrip=token.lstrip,
                             rstrip=token.rstrip, normalized=token.normalized)  # fmt: skip
                kwargs[name] = AddedToken(content, special=True, **flags)
            else:
                kwargs[name] = content
        additional = list(self.additional_special_tokens) + list(new_special_tokens or [])
        if additional:
            kwargs["additional_special_tokens"] = additional
        return kwargs


def _renamed_token(token: dict[str, Any], rename: dict[str, str]) -> AddedToken:
    fields = {k: v for k, v in token.items() if k not in ("id", "special")}
    fields["content"] = rename.get(fields["content"], fields["content"])
    return AddedToken(**fields, special=True)


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def _cut_longest_first(
    ids: list[int], pair_ids: list[int] | None, remove: int, left: bool
) -> tuple[list[int], list[int] | None]:
    """transformers' longest_first: cut the longer sequence down to the shorter's length, then
    both alike (the first gets the odd token); no overflowing tokens are kept."""
    len_ids, len_pair = len(ids), len(pair_ids) if pair_ids is not None else 0
    first_remove = min(abs(len_pair - len_ids), remove)
    second_remove = remove - first_remove
    if len_ids > len_pair:
        from_ids, from_pair = first_remove + second_remove // 2, second_remove - second_remove // 2
    else:
        from_ids = second_remove // 2
        from_pair = first_remove + second_remove - second_remove // 2
    if left:
        return ids[from_ids:], (pair_ids[from_pair:] if pair_ids is not None else None)
    ids = ids[:-from_ids] if from_ids > 0 else ids
    if pair_ids is not None and from_pair > 0:
        pair_ids = pair_ids[:-from_pair]
    return ids, pair_ids


def _check_prepare_options(
    pair: bool,
    add_special_tokens: bool,
    truncation_strategy: str,
    return_token_type_ids: bool | None,
    return_overflowing_tokens: bool,
    return_offsets_mapping: bool,
) -> None:
    """`prepare_for_model`'s refusals, transformers' own."""
    if return_offsets_mapping:
        raise NotImplementedError("return_offset_mapping is not available when using ids")
    if return_token_type_ids and not add_special_tokens:
        raise ValueError(
            "return_token_type_ids=True needs add_special_tokens=True (as in transformers)"
        )
    if return_overflowing_tokens and truncation_strategy == "longest_first" and pair:
        raise ValueError(
            "overflowing tokens cannot be returned for a pair with truncation 'longest_first'; "
            "use 'only_first' or 'only_second'"
        )
