"""Logits processors and warpers: small pure functions of (input_ids [N, L], scores [N, V]).

Each is checked against the transformers 4.37 processor it replaces; `build_logits_processors` and
`build_logits_warpers` chain them in the order transformers' `_get_logits_processor` and
`_get_logits_warper` do, so the scores every decoding loop sees are transformers' scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from bloomlm.generation import GenerationConfig

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NEG_INF = -float("inf")

# --------------------------------------------------------------------------------------------------
# Logits processors: pure functions, (input_ids [N, L], scores [N, V]) -> scores [N, V]
# --------------------------------------------------------------------------------------------------


def apply_sequence_bias(
    input_ids: torch.Tensor, scores: torch.Tensor, sequence_bias: dict
) -> torch.Tensor:
    """Add `bias` to the last token of each `sequence` whose prefix ends the row (one-token
    sequences: always)."""
    vocab_size = scores.shape[-1]
    outside = sorted({t for seq in sequence_bias for t in seq if t >= vocab_size})
    if outside:
        raise ValueError(
            f"`bad_words_ids`/`sequence_bias` name token ids {outside} outside the vocabulary "
            f"(size {vocab_size})"
        )
    bias = torch.zeros_like(scores)
    length_1_bias = torch.zeros(vocab_size, dtype=torch.float, device=scores.device)
    for sequence_ids, value in sequence_bias.items():
        if len(sequence_ids) == 1:
            length_1_bias[sequence_ids[-1]] = value
    bias += length_1_bias
    for sequence_ids, value in sequence_bias.items():
        if len(sequence_ids) == 1 or len(sequence_ids) > input_ids.shape[1]:
            continue
        prefix = torch.tensor(sequence_ids[:-1], dtype=input_ids.dtype, device=input_ids.device)
        matching_rows = torch.eq(input_ids[:, -prefix.numel() :], prefix).prod(dim=1).bool()
        zero = torch.tensor(0.0, device=scores.device)
        bias[:, sequence_ids[-1]] += torch.where(
            matching_rows, torch.tensor(value, device=scores.device), zero
        )
    return scores + bias


def bad_words_bias(bad_words_ids: list[list[int]], eos_token_ids: list[int] | None) -> dict:
    """`bad_words_ids` as a sequence bias of -inf; a lone eos token is never banned
    (transformers' rule)."""
    eos_token_ids = eos_token_ids or []
    kept = [seq for seq in bad_words_ids if all(seq != [eos] for eos in eos_token_ids)]
    return {tuple(seq): NEG_INF for seq in kept}


def apply_repetition_penalty(
    input_ids: torch.Tensor, scores: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty on every token already in the row: negative logits times `penalty`,
    positive ones divided."""
    seen = torch.gather(scores, 1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, input_ids, seen)


def ban_repeated_ngrams(
    input_ids: torch.Tensor, scores: torch.Tensor, ngram_size: int
) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in the row (prompt
    included)."""
    length = input_ids.shape[1]
    if length < ngram_size:
        return scores
    windows = input_ids.unfold(1, ngram_size, 1)  # [N, W, n], every n-gram of the row
    current_prefix = input_ids[:, length - ngram_size + 1 :]  # [N, n-1]
    matches = (windows[:, :, :-1] == current_prefix[:, None, :]).all(dim=-1)  # [N, W]
    # scatter_add, not scatter: an n-gram's last token can repeat with different match flags.
    counts = torch.zeros(scores.shape, dtype=torch.long, device=scores.device)
    counts.scatter_add_(1, windows[:, :, -1], matches.long())
    return scores.masked_fill(counts > 0, NEG_INF)


def ban_tokens(scores: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Set the given tokens' scores to -inf (min length, suppress_tokens)."""
    index = torch.tensor(list(token_ids), dtype=torch.long, device=scores.device)
    return scores.index_fill(1, index, NEG_INF)


def force_tokens(scores: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Only the given tokens stay possible, each with score 0 (forced bos/eos)."""
    forced = torch.full_like(scores, NEG_INF)
    forced[:, list(token_ids)] = 0
    return forced


def remove_inf_nan(scores: torch.Tensor) -> torch.Tensor:
    finfo = torch.finfo(scores.dtype)
    return torch.nan_to_num(scores, nan=0.0, posinf=finfo.max, neginf=finfo.min)


def boost_eos_exponentially(
    scores: torch.Tensor, eos_token_ids: list[int], steps: int, factor: float
) -> torch.Tensor:
    """exponential_decay_length_penalty: raise eos scores by |score| * (factor**steps - 1)."""
    scores = scores.clone()
    for eos in eos_token_ids:
        scores[:, eos] = scores[:, eos] + torch.abs(scores[:, eos]) * (pow(factor, steps) - 1)
    return scores


def hamming_diversity(
    scores: torch.Tensor, current_tokens: torch.Tensor, group_start: int, num_beams: int,
    penalty: float,
) -> torch.Tensor:  # fmt: skip
    """Group beam search's diversity: scores [B * group_size, V] of one group lose `penalty` per
    time a token was chosen this step by the earlier groups' beams (`current_tokens` [B *
    num_beams], rows before `group_start` in each prompt)."""
    if group_start == 0:
        return scores
    batch_size, vocab_size = current_tokens.shape[0] // num_beams, scores.shape[-1]
    group_size = scores.shape[0] // batch_size
    scores = scores.clone()
    for b in range(batch_size):
        earlier = current_tokens[b * num_beams : b * num_beams + group_start]
        frequency = torch.bincount(earlier, minlength=vocab_size).to(scores.device)
        scores[b * group_size : (b + 1) * group_size] -= penalty * frequency
    return scores


def allow_prefix_tokens(
    input_ids: torch.Tensor, scores: torch.Tensor, allowed_tokens: Callable, num_beams: int
) -> torch.Tensor:
    """`prefix_allowed_tokens_fn`: only the tokens `allowed_tokens(batch_id, row_ids)` names stay
    possible in each row (rows come in runs of `num_beams` per prompt)."""
    mask = torch.full_like(scores, NEG_INF)
    length = input_ids.shape[-1]
    for batch_id, beams in enumerate(input_ids.view(-1, num_beams, length)):
        for beam_id, row in enumerate(beams):
            allowed = allowed_tokens(batch_id, row)
            if len(allowed) == 0:
                raise ValueError(
                    f"`prefix_allowed_tokens_fn` returned no tokens for batch id {batch_id}: the "
                    "constraint cannot be met; return at least one token id"
                )
            mask[batch_id * num_beams + beam_id, allowed] = 0
    return scores + mask


# -- warpers (sampling only) ---------------------------------------------------------------------


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def top_k_filter(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the `top_k` highest scores (ties with the k-th kept too), -inf elsewhere."""
    top_k = min(max(top_k, min_tokens_to_keep), scores.size(-1))
    kth_best = torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(scores < kth_best, NEG_INF)


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability
    reaches `top_p`."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_to_remove = cumulative_probs <= (1 - top_p)
    sorted_to_remove[..., -min_tokens_to_keep:] = 0
    to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
    return scores.masked_fill(to_remove, NEG_INF)


def typical_filter(scores: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up
    to `mass`."""
    log_probs = torch.nn.functional.log_softmax(scores, dim=-1)
    entropy = -(log_probs * torch.exp(log_probs)).nansum(-1, keepdim=True)
    shifted = torch.abs((-log_probs) - entropy)
    sorted_shifted, sorted_indices = torch.sort(shifted, descending=False)
    cumulative_probs = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last_index = (cumulative_probs < mass).sum(dim=1)
    last_index.clamp_(max=sorted_shifted.shape[-1] - 1)
    sorted_to_remove = sorted_shifted > sorted_shifted.gather(1, last_index.view(-1, 1))
    sorted_to_remove[..., :min_tokens_to_keep] = 0
    to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
    return scores.masked_fill(to_remove, NEG_INF)


def _keep_top_tokens(
    scores: torch.Tensor, to_remove: torch.Tensor, min_tokens_to_keep: int
) -> torch.Tensor:
    top_k = min(min_tokens_to_keep, scores.size(-1))
    to_remove = to_remove & (scores < torch.topk(scores, top_k)[0][..., -1, None])
    return scores.masked_fill(to_remove, NEG_INF)


def epsilon_filter(
    scores: torch.Tensor, epsilon: float, min_tokens_to_keep: int = 1
) -> torch.Tensor:
    """Drop tokens with probability below `epsilon`."""
    return _keep_top_tokens(scores, scores.softmax(dim=-1) < epsilon, min_tokens_to_keep)


def eta_filter(scores: torch.Tensor, epsilon: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens with probability below min(eps, sqrt(eps) * exp(-entropy))."""
    epsilon_t = torch.tensor(epsilon)
    entropy = torch.distributions.Categorical(logits=scores).entropy()
    eta = torch.min(epsilon_t, torch.sqrt(epsilon_t) * torch.exp(-entropy))[..., None]
    return _keep_top_tokens(scores, scores.softmax(dim=-1) < eta, min_tokens_to_keep)


def log_normalize(scores: torch.Tensor) -> torch.Tensor:
    return scores.log_softmax(dim=-1)


# -- assembling the chains -------------------------------------------------------------------------


def eos_list(eos_token_id: int | list[int] | None) -> list[int] | None:
    if eos_token_id is None:
        return None
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _when(
    condition: Callable[[torch.Tensor], bool], fn: Callable[[torch.Tensor], torch.Tensor]
) -> LogitsFn:
    return lambda input_ids, scores: fn(scores) if condition(input_ids) else scores


@dataclasses.dataclass
class GroupStep:
    """Group beam search's position within a step, which the diversity penalty reads: the group
    being scored and the tokens every row has chosen so far this step (the loop sets both)."""

    current_tokens: torch.Tensor | None = None
    group: int = 0


@dataclasses.dataclass
class ChainExtras:
    """What some processors need besides the config: `prefix_allowed_tokens_fn`, the group beam
    search's `GroupStep` (diversity penalty), and the classifier-free guidance processor."""

    prefix_allowed_tokens_fn: Callable | None = None
    group_step: GroupStep | None = None
    guidance: LogitsFn | None = None


def build_logits_processors(
    config: GenerationConfig,
    prompt_length: int,
    custom: Sequence[LogitsFn] = (),
    extras: ChainExtras | None = None,
) -> list[LogitsFn]:
    """The processors transformers' `_get_logits_processor` builds for `config`, in its order."""
    extras = extras or ChainExtras()
    eos = eos_list(config.eos_token_id)
    chain = [extras.guidance] if extras.guidance is not None else []
    chain += _token_processors(config, eos, extras.group_step)
    chain += _length_processors(config, prompt_length, eos, extras.prefix_allowed_tokens_fn)
    if config.remove_invalid_values is True:
        chain.append(lambda ids, scores: remove_inf_nan(scores))
    chain += _late_processors(config, prompt_length)
    chain.extend(custom)
    if config.renormalize_logits is True:
        chain.append(lambda ids, scores: log_normalize(scores))
    return chain


def _token_processors(
    config: GenerationConfig, eos: list[int] | None, group_step: GroupStep | None
) -> list[LogitsFn]:
    """Sequence bias, diversity, repetition penalty, repeated n-grams, bad words."""
    chain: list[LogitsFn] = []
    if config.sequence_bias is not None:
        chain.append(partial(apply_sequence_bias, sequence_bias=config.sequence_bias))
    if group_step is not None and config.diversity_penalty:
        group_size = config.num_beams // config.num_beam_groups

        def diversity(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            start = group_step.group * group_size
            return hamming_diversity(scores, group_step.current_tokens, start, config.num_beams,
                                     config.diversity_penalty)  # fmt: skip

        chain.append(diversity)
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        chain.append(partial(apply_repetition_penalty, penalty=config.repetition_penalty))
    if config.no_repeat_ngram_size:
        chain.append(partial(ban_repeated_ngrams, ngram_size=config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        bias = bad_words_bias(config.bad_words_ids, eos)
        chain.append(partial(apply_sequence_bias, sequence_bias=bias))
    return chain


def _length_processors(
    config: GenerationConfig, prompt_length: int, eos: list[int] | None, prefix_fn: Callable | None
) -> list[LogitsFn]:
    """Minimum lengths (eos banned until reached), allowed prefixes, forced first and last
    tokens."""
    chain: list[LogitsFn] = []
    if config.min_length and eos is not None:
        ban_eos = partial(ban_tokens, token_ids=eos)
        chain.append(_when(lambda ids: ids.shape[-1] < config.min_length, ban_eos))
    if config.min_new_tokens and eos is not None:
        min_total = prompt_length + config.min_new_tokens
        chain.append(
            _when(lambda ids: ids.shape[-1] < min_total, partial(ban_tokens, token_ids=eos))
        )
    if prefix_fn is not None:
        beams = config.num_beams // config.num_beam_groups
        chain.append(partial(allow_prefix_tokens, allowed_tokens=prefix_fn, num_beams=beams))
    if config.forced_bos_token_id is not None:
        bos = [config.forced_bos_token_id]
        chain.append(_when(lambda ids: ids.shape[-1] == 1, partial(force_tokens, token_ids=bos)))
    if config.forced_eos_token_id is not None:
        forced_eos = partial(force_tokens, token_ids=eos_list(config.forced_eos_token_id))
        last = config.max_length - 1
        chain.append(_when(lambda ids: ids.shape[-1] == last, forced_eos))
    return chain


def _late_processors(config: GenerationConfig, prompt_length: int) -> list[LogitsFn]:
    """The exponential eos boost and token suppression, which transformers applies last."""
    chain: list[LogitsFn] = []
    if config.exponential_decay_length_penalty is not None:
        start, factor = config.exponential_decay_length_penalty
        start += prompt_length
        eos = eos_list(config.eos_token_id)

        def boost(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if ids.shape[-1] <= start:
                return scores
            return boost_eos_exponentially(scores, eos, ids.shape[-1] - start, factor)

        chain.append(boost)
    if config.suppress_tokens is not None:
        chain.append(lambda ids, scores: ban_tokens(scores, config.suppress_tokens))
    forced = forced_decoder_map(config.forced_decoder_ids)
    if config.begin_suppress_tokens is not None:
        late_start = prompt_length == 1 and config.forced_bos_token_id is not None
        begin = prompt_length + 1 if late_start else prompt_length
        if forced:  # generation starts after the last forced token
            begin += config.forced_decoder_ids[-1][0]
        ban = partial(ban_tokens, token_ids=list(config.begin_suppress_tokens))
        chain.append(_when(lambda ids: ids.shape[1] == begin, ban))
    if forced:  # the token forced at a given sequence length (prompt included, as transformers)
        chain.append(
            lambda ids, scores: (
                force_tokens(scores, [forced[ids.shape[-1]]]) if ids.shape[-1] in forced else scores
            )
        )
    return chain


def forced_decoder_map(forced_decoder_ids: Any) -> dict[int, int]:
    """`forced_decoder_ids` [[length, token], ...] as {length: token}, checked."""
    if forced_decoder_ids is None:
        return {}
    pairs_ok = isinstance(forced_decoder_ids, list | tuple) and all(
        isinstance(pair, list | tuple) and len(pair) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair
        )
        for pair in forced_decoder_ids
    )  # fmt: skip
    if not pairs_ok or not forced_decoder_ids:
        raise ValueError(
            "`forced_decoder_ids` must be a non-empty list of [index, token_id] pairs of ints "
            f">= 0, got {forced_decoder_ids!r}"
        )
    return {int(index): int(token) for index, token in forced_decoder_ids}


def build_logits_warpers(config: GenerationConfig) -> list[LogitsFn]:
    """The sampling filters of transformers' `_get_logits_warper`, in its order."""
    if config.num_beams > 1:
        # beams must keep at least one non-eos candidate per beam
        eos = config.eos_token_id
        min_keep = len(eos) + 1 if isinstance(eos, list) else 2
    else:
        min_keep = 1
    chain: list[LogitsFn] = []
    if config.temperature is not None and config.temperature != 1.0:
        chain.append(lambda ids, scores: apply_temperature(scores, float(config.temperature)))
    if config.top_k is not None and config.top_k != 0:
        chain.append(lambda ids, scores: top_k_filter(scores, config.top_k, min_keep))
    if config.top_p is not None and config.top_p < 1.0:
        chain.append(lambda ids, scores: top_p_filter(scores, float(config.top_p), min_keep))
    if config.typical_p is not None and config.typical_p < 1.0:
        chain.append(lambda ids, scores: typical_filter(scores, float(config.typical_p), min_keep))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        chain.append(
            lambda ids, scores: epsilon_filter(scores, float(config.epsilon_cutoff), min_keep)
        )
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        chain.append(lambda ids, scores: eta_filter(scores, float(config.eta_cutoff), min_keep))
    if config.renormalize_logits is True:
        chain.append(lambda ids, scores: log_normalize(scores))
    return chain


def run_chain(
    chain: Sequence[LogitsFn], input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    for fn in chain:
        scores = fn(input_ids, scores)
    return scores
