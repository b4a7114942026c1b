"""Input checks at the PyTorch API boundary.

Each raises ValueError (or TypeError for a wrong kind of object) saying what was wrong and what is
allowed, so a misuse never surfaces as an IndexError or a shape error from deep inside the model.
"""

from __future__ import annotations

import torch

from bloomlm.config import BloomConfig

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_inputs(
    config: BloomConfig, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> None:
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("pass either input_ids or inputs_embeds, not both")
    if input_ids is None and inputs_embeds is None:
        raise ValueError(
            "pass input_ids (batch, seq_len) or inputs_embeds (batch, seq_len, hidden_size)"
        )
    if input_ids is not None:
        _check_input_ids(config, input_ids)
    else:
        _check_inputs_embeds(config, inputs_embeds)


def _check_input_ids(config: BloomConfig, input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}"
        )
    if input_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"input_ids must hold integers (torch.long), got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"token id {bad} is outside the vocabulary: ids must lie in [0, {config.vocab_size})"
        )


def _check_inputs_embeds(config: BloomConfig, inputs_embeds: torch.Tensor) -> None:
    if not isinstance(inputs_embeds, torch.Tensor):
        raise TypeError(f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(
            f"inputs_embeds must have shape (batch, seq_len, {config.hidden_size}), "
            f"got {tuple(inputs_embeds.shape)}"
        )
    if inputs_embeds.shape[1] == 0:
        raise ValueError("inputs_embeds is empty; pass at least one position")


# Over 40 lines: one check per cache property, each naming what was wrong.
def check_past(
    config: BloomConfig, past_key_values, batch_size: int, n_head: int | None = None
) -> int:
    """Validate a BLOOM-layout cache; return its length (0 when there is none). `n_head`: the
    heads the model computes (a rank's H / N under tensor parallelism; default config.n_head)."""
    if past_key_values is None:
        return 0
    if not isinstance(past_key_values, (tuple, list)):
        raise TypeError(
            "past_key_values must be a tuple of (key, value) pairs, one per layer, "
            f"got {type(past_key_values).__name__}"
        )
    if len(past_key_values) != config.n_layer:
        raise ValueError(
            f"past_key_values has {len(past_key_values)} layers, "
            f"the model has n_layer={config.n_layer}"
        )
    n_head = config.n_head if n_head is None else n_head
    rows, head_dim = batch_size * n_head, config.head_dim
    past_length = None
    for i, layer in enumerate(past_key_values):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise ValueError(f"past_key_values[{i}] must be a (key, value) pair")
        key, value = layer
        if key.dim() != 3 or key.shape[0] != rows or key.shape[1] != head_dim:
            raise ValueError(
                f"past_key_values[{i}] key must have shape "
                f"(batch * n_head = {rows}, head_dim = {head_dim}, past_len), "
                f"got {tuple(key.shape)} (batch size {batch_size}, n_head {n_head})"
            )
        expected_value = (rows, key.shape[2], head_dim)
        if tuple(value.shape) != expected_value:
            raise ValueError(
                f"past_key_values[{i}] value must have shape "
                f"(batch * n_head, past_len, head_dim) = {expected_value}, "
                f"got {tuple(value.shape)}"
            )
        if past_length is not None and key.shape[2] != past_length:
            raise ValueError(
                f"past_key_values[{i}] has length {key.shape[2]}, layer 0 has {past_length}"
            )
        past_length = key.shape[2]
    return past_length


def check_kv_cache(cache, batch_size: int, seq_length: int) -> int:
    """Validate a KVCache given to a public forward; return how many columns each row holds."""
    if cache.rows != batch_size:
        raise ValueError(
            f"the KVCache was made for {cache.rows} rows, the inputs have batch size {batch_size}"
        )
    lengths = set(cache.lengths)
    if len(lengths) != 1:
        raise ValueError(
            f"a forward call needs every KVCache row at the same length, got {sorted(lengths)}; "
            "use a Decoder's step_rows for rows at different lengths"
        )
    past_length = lengths.pop()
    if past_length + seq_length > cache.limit:
        raise ValueError(
            f"the KVCache holds at most {cache.limit} columns: {past_length} are filled and "
            f"{seq_length} more do not fit; make it with a larger limit"
        )
    return past_length


def check_attention_mask(
    attention_mask: torch.Tensor, batch_size: int, past_length: int, seq_length: int
):
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}"
        )
    expected = (batch_size, past_length + seq_length)
    if tuple(attention_mask.shape) != expected:
        raise ValueError(
            f"attention_mask must have shape (batch, past_len + seq_len) = {expected} "
            f"(past {past_length} + new {seq_length}), got {tuple(attention_mask.shape)}"
        )


def check_head_mask(head_mask: torch.Tensor, n_layer: int, n_head: int) -> None:
    if not isinstance(head_mask, torch.Tensor):
        raise TypeError(f"head_mask must be a torch.Tensor, got {type(head_mask).__name__}")
    if tuple(head_mask.shape) not in ((n_head,), (n_layer, n_head)):
        raise ValueError(
            f"head_mask must have shape (n_head,) = ({n_head},) "
            f"or (n_layer, n_head) = ({n_layer}, {n_head}), got {tuple(head_mask.shape)}"
        )


def check_token_labels(labels: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(
            f"{name} must hold integer class ids (torch.long; -100 to ignore), got {labels.dtype}"
        )
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape (batch, seq_len) = {tuple(shape)}, got {tuple(labels.shape)}"
        )


def check_logits_to_keep(num_logits_to_keep: int, labels: torch.Tensor | None) -> None:
    if isinstance(num_logits_to_keep, bool) or not isinstance(num_logits_to_keep, int):
        kind = type(num_logits_to_keep).__name__
        raise TypeError(f"num_logits_to_keep must be an int (0 keeps every position), got {kind}")
    if num_logits_to_keep < 0:
        raise ValueError(
            f"num_logits_to_keep must be >= 0 (0 keeps every position), got {num_logits_to_keep}"
        )
    if num_logits_to_keep and labels is not None:
        raise ValueError(
            "num_logits_to_keep cannot be combined with labels: the loss needs every position"
        )


def check_span_positions(positions: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dim() > 1:
        positions = positions.squeeze(-1)
    _check_batch_of_ints(positions, batch_size, f"{name} must hold integer token positions")
    return positions


def _check_batch_of_ints(values: torch.Tensor, batch_size: int, rule: str) -> None:
    """One integer per row: `rule` says what the values are, in the error."""
    if values.dtype not in _INT_DTYPES:
        raise TypeError(f"{rule} (torch.long), got {values.dtype}")
    if tuple(values.shape) != (batch_size,):
        raise ValueError(f"{rule} of shape (batch,) = ({batch_size},), got {tuple(values.shape)}")


# Over 40 lines: transformers' problem-type rules, one branch per label kind.
def sequence_problem_type(
    config: BloomConfig, num_labels: int, labels: torch.Tensor, batch_size: int
) -> str:
    """The loss to use for these labels, decided per call (the config is read, never written)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    problem_type = config.problem_type
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in _INT_DTYPES:
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "single_label_classification":
        _check_batch_of_ints(labels, batch_size, "single_label_classification needs integer labels")
    elif problem_type == "multi_label_classification":
        if not labels.is_floating_point():
            raise TypeError(
                "multi_label_classification needs float 0/1 labels of shape "
                f"(batch, {num_labels}), got {labels.dtype}"
            )
        if tuple(labels.shape) != (batch_size, num_labels):
            raise ValueError(
                "multi_label_classification labels must have shape "
                f"(batch, num_labels={num_labels}), got {tuple(labels.shape)}"
            )
    else:
        allowed = (
            [(batch_size,), (batch_size, 1)] if num_labels == 1 else [(batch_size, num_labels)]
        )
        if labels.dim() == 0 or tuple(labels.shape) not in allowed:
            raise ValueError(
                f"regression labels must have shape {allowed[0]}, got {tuple(labels.shape)}"
            )
    return problem_type
