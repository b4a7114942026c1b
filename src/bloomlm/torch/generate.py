"""Text generation for BLOOM causal LMs: greedy, sampling, beam search and beam sampling.

Token for token the same as transformers 4.37.2's `generate` (same logits filters in the same order,
same beam bookkeeping, same random draws for a given `torch.manual_seed`). The loop knows the model
only through its forward call:

    out = model(input_ids=new_ids, past_key_values=past, attention_mask=mask, use_cache=True, return_dict=True)
    out.logits          # [N, T, V]
    out.past_key_values # BLOOM's tuples, or the model's own cache object (see `_Stepper`)

Notation: B prompts, N rows decoded together (B * num_beams, or B * num_return_sequences when
sampling), L tokens so far, V vocabulary. Every logits filter is a small pure function of
(input_ids [N, L], scores [N, V]) returning new scores; `build_logits_processors` and
`build_logits_warpers` chain them in transformers' order.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from bloomlm.generation import GenerationConfig
from bloomlm.outputs import ModelOutput
from bloomlm.torch.cache import reorder_legacy_cache

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NEG_INF = -float("inf")

# --------------------------------------------------------------------------------------------------
# Logits processors: pure functions, (input_ids [N, L], scores [N, V]) -> scores [N, V]
# --------------------------------------------------------------------------------------------------


def apply_sequence_bias(
    input_ids: torch.Tensor, scores: torch.Tensor, sequence_bias: dict
) -> torch.Tensor:
    """Add `bias` to the last token of each `sequence` whose prefix ends the row (one-token sequences: always)."""
    vocab_size = scores.shape[-1]
    outside = sorted({t for seq in sequence_bias for t in seq if t >= vocab_size})
    if outside:
        raise ValueError(
            f"`bad_words_ids`/`sequence_bias` name token ids {outside} outside the vocabulary (size {vocab_size})"
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
    """`bad_words_ids` as a sequence bias of -inf; a lone eos token is never banned (transformers' rule)."""
    eos_token_ids = eos_token_ids or []
    kept = [seq for seq in bad_words_ids if all(seq != [eos] for eos in eos_token_ids)]
    return {tuple(seq): NEG_INF for seq in kept}


def apply_repetition_penalty(
    input_ids: torch.Tensor, scores: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty on every token already in the row: negative logits times `penalty`, positive ones divided."""
    seen = torch.gather(scores, 1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, input_ids, seen)


def ban_repeated_ngrams(
    input_ids: torch.Tensor, scores: torch.Tensor, ngram_size: int
) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in the row (prompt included)."""
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


# -- warpers (sampling only) -------------------------------------------------------------------------


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def top_k_filter(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the `top_k` highest scores (ties with the k-th kept too), -inf elsewhere."""
    top_k = min(max(top_k, min_tokens_to_keep), scores.size(-1))
    kth_best = torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(scores < kth_best, NEG_INF)


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches `top_p`."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_to_remove = cumulative_probs <= (1 - top_p)
    sorted_to_remove[..., -min_tokens_to_keep:] = 0
    to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
    return scores.masked_fill(to_remove, NEG_INF)


def typical_filter(scores: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up to `mass`."""
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


def _eos_list(eos_token_id: int | list[int] | None) -> list[int] | None:
    if eos_token_id is None:
        return None
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _when(
    condition: Callable[[torch.Tensor], bool], fn: Callable[[torch.Tensor], torch.Tensor]
) -> LogitsFn:
    return lambda input_ids, scores: fn(scores) if condition(input_ids) else scores


def build_logits_processors(
    config: GenerationConfig, prompt_length: int, custom: Sequence[LogitsFn] = ()
) -> list[LogitsFn]:
    """The processors transformers' `_get_logits_processor` builds for `config`, in its order."""
    # Over 40 lines: one branch per GenerationConfig setting, kept in transformers' order.
    eos = _eos_list(config.eos_token_id)
    chain: list[LogitsFn] = []
    if config.sequence_bias is not None:
        chain.append(partial(apply_sequence_bias, sequence_bias=config.sequence_bias))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        chain.append(partial(apply_repetition_penalty, penalty=config.repetition_penalty))
    if config.no_repeat_ngram_size:
        chain.append(partial(ban_repeated_ngrams, ngram_size=config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        chain.append(
            partial(apply_sequence_bias, sequence_bias=bad_words_bias(config.bad_words_ids, eos))
        )
    if config.min_length and eos is not None:
        chain.append(
            _when(lambda ids: ids.shape[-1] < config.min_length, partial(ban_tokens, token_ids=eos))
        )
    if config.min_new_tokens and eos is not None:
        min_total = prompt_length + config.min_new_tokens
        chain.append(
            _when(lambda ids: ids.shape[-1] < min_total, partial(ban_tokens, token_ids=eos))
        )
    if config.forced_bos_token_id is not None:
        bos = [config.forced_bos_token_id]
        chain.append(_when(lambda ids: ids.shape[-1] == 1, partial(force_tokens, token_ids=bos)))
    if config.forced_eos_token_id is not None:
        forced_eos = _eos_list(config.forced_eos_token_id)
        last = config.max_length - 1
        chain.append(
            _when(lambda ids: ids.shape[-1] == last, partial(force_tokens, token_ids=forced_eos))
        )
    if config.remove_invalid_values is True:
        chain.append(lambda ids, scores: remove_inf_nan(scores))
    if config.exponential_decay_length_penalty is not None:
        start, factor = config.exponential_decay_length_penalty
        start += prompt_length
        chain.append(
            lambda ids, scores: (
                boost_eos_exponentially(
                    scores, _eos_list(config.eos_token_id), ids.shape[-1] - start, factor
                )
                if ids.shape[-1] > start
                else scores
            )
        )
    if config.suppress_tokens is not None:
        chain.append(lambda ids, scores: ban_tokens(scores, config.suppress_tokens))
    if config.begin_suppress_tokens is not None:
        begin = (
            prompt_length
            if (prompt_length > 1 or config.forced_bos_token_id is None)
            else prompt_length + 1
        )
        tokens = list(config.begin_suppress_tokens)
        chain.append(
            _when(lambda ids: ids.shape[1] == begin, partial(ban_tokens, token_ids=tokens))
        )
    chain.extend(custom)
    if config.renormalize_logits is True:
        chain.append(lambda ids, scores: log_normalize(scores))
    return chain


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


def _run_chain(
    chain: Sequence[LogitsFn], input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    for fn in chain:
        scores = fn(input_ids, scores)
    return scores


# --------------------------------------------------------------------------------------------------
# Beam bookkeeping (transformers' BeamSearchScorer / BeamHypotheses, same arithmetic, same tie order)
# --------------------------------------------------------------------------------------------------


class BeamHypotheses:
    """The n best finished hypotheses of one prompt, scored sum_logprobs / generated_len ** length_penalty."""

    def __init__(
        self, num_beams: int, length_penalty: float, early_stopping: bool | str, max_length: int
    ):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        self.beams: list[tuple[float, torch.Tensor, tuple[int, ...] | None]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(
        self, hyp: torch.Tensor, sum_logprobs: float, beam_indices: tuple | None, generated_len: int
    ) -> None:
        score = sum_logprobs / (generated_len**self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp, beam_indices))
            if len(self) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int, prompt_len: int) -> bool:
        """Whether no open beam can still beat the worst kept hypothesis (per `early_stopping`)."""
        if len(self) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            denominator = self.max_length - prompt_len  # the longest a beam can still grow
        else:
            denominator = cur_len - prompt_len
        return self.worst_score >= best_sum_logprobs / denominator**self.length_penalty


class BeamSearchScorer:
    """Chooses each step's `num_beams` continuations per prompt and collects finished hypotheses."""

    def __init__(self, batch_size: int, config: GenerationConfig):
        self.num_beams = config.num_beams
        self.num_beam_hyps_to_keep = config.num_return_sequences
        self.hyps = [
            BeamHypotheses(
                config.num_beams, config.length_penalty, config.early_stopping, config.max_length
            )
            for _ in range(batch_size)
        ]
        self.done = [False] * batch_size

    @property
    def is_done(self) -> bool:
        return all(self.done)

    def process(
        self,
        input_ids: torch.Tensor,
        next_scores: torch.Tensor,
        next_tokens: torch.Tensor,
        next_indices: torch.Tensor,
        pad_token_id: int | None,
        eos_token_ids: list[int] | None,
        beam_indices: tuple | None,
        prompt_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """next_* [B, K] candidates sorted best first -> (beam scores, tokens, source rows), each [N]."""
        # Over 40 lines: transformers' BeamSearchScorer.process rule for rule (same hypotheses).
        cur_len = input_ids.shape[-1] + 1
        num_beams = self.num_beams
        scores_out: list[float] = []
        tokens_out: list[int] = []
        rows_out: list[int] = []
        for b, (tokens, scores, indices) in enumerate(
            zip(next_tokens.tolist(), next_scores.tolist(), next_indices.tolist())
        ):
            if self.done[b]:
                if eos_token_ids is None or pad_token_id is None:
                    raise ValueError(
                        "beam search finished a prompt early: eos_token_id and pad_token_id must be set"
                    )
                # transformers points finished prompts' rows at row 0; only padding is kept from them
                scores_out += [0.0] * num_beams
                tokens_out += [pad_token_id] * num_beams
                rows_out += [0] * num_beams
                continue
            kept = 0
            for rank, (token, score, index) in enumerate(zip(tokens, scores, indices)):
                row = b * num_beams + index
                if eos_token_ids is not None and token in eos_token_ids:
                    if (
                        rank >= num_beams
                    ):  # an eos outside the top num_beams candidates is not a hypothesis
                        continue
                    hyp_indices = beam_indices[row] + (row,) if beam_indices is not None else None
                    self.hyps[b].add(
                        input_ids[row].clone(), score, hyp_indices, cur_len - prompt_len
                    )
                else:
                    scores_out.append(score)
                    tokens_out.append(token)
                    rows_out.append(row)
                    kept += 1
                if kept == num_beams:
                    break
            if kept < num_beams:
                raise ValueError(
                    f"at most {num_beams} of the candidates {tokens} may be eos tokens {eos_token_ids}"
                )
            self.done[b] = self.done[b] or self.hyps[b].is_done(max(scores), cur_len, prompt_len)
        device = input_ids.device
        return (
            torch.tensor(scores_out, dtype=next_scores.dtype, device=device),
            torch.tensor(tokens_out, dtype=next_tokens.dtype, device=device),
            torch.tensor(rows_out, dtype=next_indices.dtype, device=device),
        )

    def finalize(
        self,
        input_ids: torch.Tensor,
        final_beam_scores: torch.Tensor,
        max_length: int,
        pad_token_id: int | None,
        eos_token_ids: list[int] | None,
        beam_indices: tuple | None,
        prompt_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add the open beams, pick the best `num_return_sequences` per prompt; pad, and end with eos if room."""
        final_scores = final_beam_scores.tolist()
        for b, hyps in enumerate(self.hyps):
            if self.done[b]:
                continue
            for row in range(b * self.num_beams, (b + 1) * self.num_beams):
                row_indices = beam_indices[row] if beam_indices is not None else None
                hyps.add(
                    input_ids[row], final_scores[row], row_indices, input_ids.shape[-1] - prompt_len
                )
        best = []
        for hyps in self.hyps:
            ranked = sorted(
                hyps.beams, key=lambda beam: beam[0]
            )  # stable: equal scores keep insertion order
            best += [ranked.pop() for _ in range(self.num_beam_hyps_to_keep)]
        lengths = [len(hyp) for _, hyp, _ in best]
        out_len = min(max(lengths) + 1, max_length)
        if min(lengths) != max(lengths) and pad_token_id is None:
            raise ValueError(
                "beam hypotheses of different lengths need a `pad_token_id` to pad them"
            )
        fill = pad_token_id if pad_token_id is not None else 0
        sequences = input_ids.new_full((len(best), out_len), fill)
        track = len(best) > 0 and best[0][2] is not None
        indices = input_ids.new_full((len(best), out_len), -1) if track else None
        for i, (_, hyp, hyp_indices) in enumerate(best):
            sequences[i, : lengths[i]] = hyp
            if indices is not None:
                indices[i, : len(hyp_indices)] = torch.tensor(hyp_indices, dtype=indices.dtype)
            if lengths[i] < out_len:
                sequences[i, lengths[i]] = eos_token_ids[0]
        scores = torch.tensor(
            [score for score, _, _ in best], dtype=torch.float32, device=input_ids.device
        )
        return sequences, scores, indices


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


# transformers' ModelOutput rule (bloomlm.outputs): index by name or position over the set fields,
# iterate over their names.
@dataclasses.dataclass(repr=False)
class GenerateDecoderOnlyOutput(ModelOutput):
    """Greedy and sampling output: sequences [N, L]; scores per step [N, V] (processed), when asked for."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Any = None


@dataclasses.dataclass(repr=False)
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """Beam output: sequences [B * num_return_sequences, L], their scores, per-step beam scores [N, V]."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Any = None


# --------------------------------------------------------------------------------------------------
# The model step
# --------------------------------------------------------------------------------------------------


class _Stepper:
    """Runs the model on the tokens it has not seen yet and keeps the cache and the attention mask.

    The attention mask covers past + new tokens; a column of ones is appended after every step.
    A model with `_new_static_cache(batch_size, max_length)` gets its preallocated cache, which it
    updates in place and which reorders itself (`reorder_`); otherwise the cache is BLOOM's tuple of
    (key [N*H, D, S], value [N*H, S, D]) per layer.
    """

    def __init__(self, model: Any, attention_mask: torch.Tensor, config: GenerationConfig):
        self.model = model
        self.attention_mask = attention_mask
        self.use_cache = bool(config.use_cache)
        self.past: Any = None
        # the preallocated cache serves the fast path, which returns no attention maps
        if self.use_cache and not config.output_attentions and hasattr(model, "_new_static_cache"):
            self.past = model._new_static_cache(attention_mask.shape[0], config.max_length)
        self.seen = 0
        self.extra = {}
        if config.output_attentions:
            self.extra["output_attentions"] = True
        if config.output_hidden_states:
            self.extra["output_hidden_states"] = True

    def __call__(self, input_ids: torch.Tensor) -> Any:
        new_ids = input_ids[:, self.seen :] if self.use_cache else input_ids
        out = self.model(
            input_ids=new_ids,
            past_key_values=self.past,
            attention_mask=self.attention_mask,
            use_cache=self.use_cache,
            return_dict=True,
            **self.extra,
        )
        if self.use_cache:
            self.past = out.past_key_values
            self.seen = input_ids.shape[1]
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones((input_ids.shape[0], 1))], 1
        )
        return out

    def legacy_past(self) -> Any:
        """The cache in BLOOM's tuple layout, as transformers returns it."""
        return self.past.to_legacy() if hasattr(self.past, "to_legacy") else self.past

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Make row i of the cache a copy of row beam_idx[i] (the attention mask stays, as in transformers)."""
        if self.past is None:
            return
        if hasattr(self.past, "reorder_"):
            self.past.reorder_(beam_idx)
            return
        self.past = reorder_legacy_cache(self.past, beam_idx)


class _Recorder:
    """Collects per-step scores / attentions / hidden states when return_dict_in_generate asks for them."""

    def __init__(self, config: GenerationConfig):
        on = bool(config.return_dict_in_generate)
        self.scores = () if on and config.output_scores else None
        self.attentions = () if on and config.output_attentions else None
        self.hidden_states = () if on and config.output_hidden_states else None

    def add(self, scores: torch.Tensor, model_out: Any) -> None:
        if self.scores is not None:
            self.scores += (scores,)
        if self.attentions is not None:
            self.attentions += (model_out.attentions,)
        if self.hidden_states is not None:
            self.hidden_states += (model_out.hidden_states,)


class _StoppingCriteria:
    """max_length, max_time and the caller's criteria; any one of them stops generation."""

    def __init__(self, config: GenerationConfig, custom: Sequence[Callable]):
        self.max_length = config.max_length
        self.deadline = time.time() + config.max_time if config.max_time is not None else None
        self.custom = list(custom)

    def __call__(self, input_ids: torch.Tensor, scores: Any) -> bool:
        stop = input_ids.shape[-1] >= self.max_length
        stop = stop or (self.deadline is not None and time.time() > self.deadline)
        return bool(stop or any(bool(c(input_ids, scores)) for c in self.custom))


@dataclasses.dataclass
class _LoopTokens:
    """The eos ids and pad id the decoding loops use.

    transformers' loops fall back to the model's own generation config when the resolved config
    has eos or pad set to None (so `eos_token_id=None` does not turn eos off); the logits filters
    use the resolved config only. Both quirks are kept so the tokens match.
    """

    eos: list[int] | None
    pad: int | None

    @classmethod
    def resolve(cls, model: Any, config: GenerationConfig) -> _LoopTokens:
        eos, pad = config.eos_token_id, config.pad_token_id
        if eos is None or pad is None:
            default = _model_generation_config(model)
            eos = default.eos_token_id if eos is None else eos
            pad = default.pad_token_id if pad is None else pad
        tokens = cls(_eos_list(eos), pad)
        if tokens.eos is not None and tokens.pad is None:
            raise ValueError(
                "`eos_token_id` is set, so `pad_token_id` must be set too (it fills finished rows)"
            )
        return tokens


# --------------------------------------------------------------------------------------------------
# Decoding loops
# --------------------------------------------------------------------------------------------------


def _greedy_or_sample(
    step: _Stepper,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    tokens: _LoopTokens,
    processors: list[LogitsFn],
    warpers: list[LogitsFn],
    stop: _StoppingCriteria,
    streamer: Any,
) -> GenerateDecoderOnlyOutput | torch.Tensor:
    # Over 40 lines: the whole decode loop (step, process, pick, record, stop) read in one place.
    eos, pad = tokens.eos, tokens.pad
    eos_tensor = torch.tensor(eos, device=input_ids.device) if eos is not None else None
    record = _Recorder(config)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    while True:
        out = step(input_ids)
        scores = _run_chain(processors, input_ids, out.logits[:, -1, :])
        if config.do_sample:
            scores = _run_chain(warpers, input_ids, scores)
        record.add(scores, out)
        if config.do_sample:
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if eos_tensor is not None:  # finished rows keep receiving padding
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        all_done = False
        if eos_tensor is not None:
            is_eos = next_tokens.tile(eos_tensor.shape[0], 1).eq(eos_tensor.unsqueeze(1)).any(dim=0)
            unfinished = unfinished * (~is_eos).long()
            all_done = unfinished.max() == 0
        if stop(input_ids, record.scores) or all_done:
            break
    if not config.return_dict_in_generate:
        return input_ids
    return GenerateDecoderOnlyOutput(
        sequences=input_ids,
        scores=record.scores,
        attentions=record.attentions,
        hidden_states=record.hidden_states,
        past_key_values=step.legacy_past(),
    )


def _beam_search(
    step: _Stepper,
    input_ids: torch.Tensor,
    batch_size: int,
    config: GenerationConfig,
    tokens: _LoopTokens,
    processors: list[LogitsFn],
    warpers: list[LogitsFn],
    stop: _StoppingCriteria,
) -> GenerateBeamDecoderOnlyOutput | torch.Tensor:
    # Over 40 lines: the whole beam loop (step, process, candidates, score, reorder) in one place.
    num_beams = config.num_beams
    eos, pad = tokens.eos, tokens.pad
    scorer = BeamSearchScorer(batch_size, config)
    record = _Recorder(config)
    track = record.scores is not None
    beam_indices = tuple(() for _ in range(input_ids.shape[0])) if track else None
    prompt_len = input_ids.shape[-1]
    beam_scores = torch.zeros((batch_size, num_beams), dtype=torch.float, device=input_ids.device)
    if not config.do_sample:
        beam_scores[
            :, 1:
        ] = -1e9  # the beams start identical: only the first may expand at step one
    beam_scores = beam_scores.view(-1)
    while True:
        out = step(input_ids)
        log_probs = torch.nn.functional.log_softmax(out.logits[:, -1, :], dim=-1)  # [N, V]
        processed = _run_chain(processors, input_ids, log_probs)
        if config.do_sample:
            processed = _run_chain(warpers, input_ids, processed)
        record.add(processed, out)
        vocab_size = processed.shape[-1]
        candidates = (processed + beam_scores[:, None].expand_as(processed)).view(
            batch_size, num_beams * vocab_size
        )
        cand_scores, flat_ids = _beam_candidates(candidates, num_beams, config.do_sample, eos)
        cand_rows = torch.div(flat_ids, vocab_size, rounding_mode="floor")
        cand_tokens = flat_ids % vocab_size
        beam_scores, beam_tokens, beam_idx = scorer.process(
            input_ids, cand_scores, cand_tokens, cand_rows, pad, eos, beam_indices, prompt_len
        )
        input_ids = torch.cat([input_ids[beam_idx, :], beam_tokens.unsqueeze(-1)], dim=-1)
        step.reorder(beam_idx)
        if beam_indices is not None:
            beam_indices = tuple(beam_indices[i] + (i,) for i in beam_idx.tolist())
        if scorer.is_done or stop(input_ids, record.scores):
            break
    sequences, sequence_scores, indices = scorer.finalize(
        input_ids, beam_scores, stop.max_length, pad, eos, beam_indices, prompt_len
    )
    if not config.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences,
        sequences_scores=sequence_scores if config.output_scores else None,
        scores=record.scores,
        beam_indices=indices,
        attentions=record.attentions,
        hidden_states=record.hidden_states,
        past_key_values=step.legacy_past(),
    )


def _beam_candidates(
    candidates: torch.Tensor, num_beams: int, do_sample: bool, eos: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row, next-token candidates over all its beams [B, num_beams * V], best first:
    (scores, flat ids). Sampling draws 2 * num_beams; search keeps the top ones, room for eos."""
    if do_sample:
        flat_ids = torch.multinomial(torch.softmax(candidates, dim=-1), num_samples=2 * num_beams)
        scores, order = torch.sort(torch.gather(candidates, -1, flat_ids), descending=True, dim=1)
        return scores, torch.gather(flat_ids, -1, order)
    width = max(2, 1 + (len(eos) if eos else 0)) * num_beams
    scores, flat_ids = torch.topk(candidates, width, dim=1, largest=True, sorted=True)
    return scores, flat_ids


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

# Settings of transformers' other decoding modes, with their "off" values.
_UNSUPPORTED_SETTINGS = {
    "num_beam_groups": 1,  # group (diverse) beam search
    "diversity_penalty": 0.0,
    "constraints": None,  # constrained beam search
    "force_words_ids": None,
    "forced_decoder_ids": None,
    "prompt_lookup_num_tokens": None,  # assisted decoding
    "encoder_repetition_penalty": 1.0,  # encoder-decoder only
    "encoder_no_repeat_ngram_size": 0,
}


def generate(
    model: Any,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: Sequence[LogitsFn] | None = None,
    stopping_criteria: Sequence[Callable] | None = None,
    prefix_allowed_tokens_fn: Callable | None = None,
    synced_gpus: bool | None = None,
    assistant_model: Any = None,
    streamer: Any = None,
    negative_prompt_ids: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
    """transformers 4.37's `generate` for a BLOOM causal LM: same arguments, same tokens.

    `inputs` (or `input_ids=`) is [B, L]; `attention_mask=` [B, L] marks left padding. Any
    GenerationConfig field may be passed as a keyword. `logits_processor` / `stopping_criteria` are
    lists of callables `(input_ids, scores)`, run after the built-in ones as in transformers.
    Returns the sequences [B * num_return_sequences, L'] or, with `return_dict_in_generate=True`,
    a `GenerateDecoderOnlyOutput` / `GenerateBeamDecoderOnlyOutput`.
    """
    # Over 40 lines: transformers' signature and its argument resolution, then one dispatch.
    _reject_unsupported_arguments(
        prefix_allowed_tokens_fn, synced_gpus, assistant_model, negative_prompt_ids
    )
    del (
        negative_prompt_attention_mask
    )  # only meaningful with negative_prompt_ids, which is rejected
    user_max_length = kwargs.get("max_length")
    config, model_kwargs = _resolve_config(model, generation_config, kwargs)
    input_ids, attention_mask = _prepare_inputs(model, inputs, model_kwargs, config)
    _finish_lengths(config, input_ids.shape[-1], user_max_length)
    _check_streamer(streamer, config, input_ids.shape[0])

    batch_size, prompt_len = input_ids.shape
    tokens = _LoopTokens.resolve(model, config)
    processors = build_logits_processors(config, prompt_len, logits_processor or ())
    warpers = build_logits_warpers(config) if config.do_sample else []
    stop = _StoppingCriteria(config, stopping_criteria or ())
    expand = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    with torch.inference_mode():
        if streamer is not None:
            streamer.put(input_ids.cpu())
        input_ids = input_ids.repeat_interleave(expand, dim=0)
        step = _Stepper(model, attention_mask.repeat_interleave(expand, dim=0), config)
        try:
            if config.num_beams > 1:
                result = _beam_search(
                    step, input_ids, batch_size, config, tokens, processors, warpers, stop
                )
            else:
                result = _greedy_or_sample(
                    step, input_ids, config, tokens, processors, warpers, stop, streamer
                )
        finally:
            if streamer is not None:  # also on error, so a consumer thread is never left waiting
                streamer.end()
    return _outside_inference_mode(result)


def _reject_unsupported_arguments(
    prefix_fn: Any, synced_gpus: Any, assistant: Any, negative_ids: Any
) -> None:
    for name, value in (
        ("prefix_allowed_tokens_fn", prefix_fn),
        ("assistant_model", assistant),
        ("negative_prompt_ids", negative_ids),
    ):
        if value is not None:
            raise ValueError(f"`{name}` is not supported by bloomlm's generate; leave it None")
    if synced_gpus:
        raise ValueError(
            "`synced_gpus=True` is not supported by bloomlm's generate (single process only)"
        )


def _resolve_config(
    model: Any, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> tuple[GenerationConfig, dict[str, Any]]:
    """Copy the given (or the model's) config, apply the keyword overrides, validate; return leftovers."""
    if generation_config is None:
        generation_config = _model_generation_config(model)
    config = copy.deepcopy(_as_ours(generation_config))
    model_kwargs = config.update(**kwargs)
    config.validate()
    for name, off in _UNSUPPORTED_SETTINGS.items():
        if getattr(config, name) != off:
            raise ValueError(
                f"`{name}`={getattr(config, name)!r} is not supported by bloomlm's generate; use {off!r}"
            )
    if config.guidance_scale is not None and config.guidance_scale != 1:
        raise ValueError(
            "`guidance_scale` (classifier-free guidance) is not supported by bloomlm's generate"
        )
    contrastive = (
        config.penalty_alpha is not None and config.penalty_alpha > 0 and (config.top_k or 0) > 1
    )
    if contrastive and config.num_beams == 1 and not config.do_sample:
        raise ValueError(
            "contrastive search (`penalty_alpha` > 0) is not supported by bloomlm's generate"
        )
    if config.pad_token_id is None and config.eos_token_id is not None:
        if model_kwargs.get("attention_mask") is None:
            logger.warning(
                "The attention mask and the pad token id were not set; pass `attention_mask` for reliable results."
            )
        pad = _eos_list(config.eos_token_id)[0]
        logger.warning(f"Setting `pad_token_id` to `eos_token_id`:{pad} for open-end generation.")
        config.pad_token_id = pad
    return config, model_kwargs


def _as_ours(config: Any) -> GenerationConfig:
    if isinstance(config, GenerationConfig):
        return config
    if not hasattr(config, "to_dict"):
        raise ValueError(
            f"`generation_config` must be a GenerationConfig, got {type(config).__name__}"
        )
    return GenerationConfig(**config.to_dict())  # e.g. transformers' own GenerationConfig


def _model_generation_config(model: Any) -> GenerationConfig:
    """`model.generation_config` when the model has one, else the generation settings of `model.config`."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return GenerationConfig.from_model_config(model.config)
    return _as_ours(config)


def _model_device(model: Any) -> torch.device | None:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return (
        next((p.device for p in model.parameters()), None) if hasattr(model, "parameters") else None
    )


def _prepare_inputs(
    model: Any, inputs: torch.Tensor | None, model_kwargs: dict[str, Any], config: GenerationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the prompt and its mask; build the mask as transformers does when none is given."""
    # Over 40 lines: one check per way transformers accepts (or rejects) a prompt and its mask.
    input_ids = model_kwargs.pop("input_ids", None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    if "inputs_embeds" in model_kwargs:
        raise ValueError("`inputs_embeds` is not supported by bloomlm's generate; pass `input_ids`")
    if model_kwargs:
        raise ValueError(
            f"generate() got unknown arguments {sorted(model_kwargs)}: allowed are `input_ids`, `attention_mask` "
            "and the GenerationConfig fields"
        )
    if inputs is not None and input_ids is not None:
        raise ValueError("pass the prompt once: either `inputs` or `input_ids`, not both")
    input_ids = inputs if inputs is not None else input_ids
    if input_ids is None:  # start from a lone bos token
        if attention_mask is not None:
            raise ValueError("`attention_mask` was given without `input_ids`; pass both or neither")
        if config.bos_token_id is None:
            raise ValueError("`bos_token_id` has to be defined when no `input_ids` are provided")
        input_ids = torch.full(
            (1, 1), config.bos_token_id, dtype=torch.long, device=_model_device(model)
        )
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
    ):
        raise ValueError(
            "`input_ids` must be an integer tensor of shape [batch, length], got "
            + (
                f"{input_ids.dtype} of shape {list(input_ids.shape)}"
                if isinstance(input_ids, torch.Tensor)
                else repr(input_ids)
            )
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"`input_ids` must hold at least one token per row, got shape {list(input_ids.shape)}"
        )
    input_ids = input_ids.long()
    if attention_mask is None:
        attention_mask = _default_attention_mask(
            input_ids, config.pad_token_id, config.eos_token_id
        )
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = (
            list(attention_mask.shape)
            if isinstance(attention_mask, torch.Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(
            f"`attention_mask` must have the shape of `input_ids` {list(input_ids.shape)}, got {shape}"
        )
    pad = config.pad_token_id
    if pad is not None and bool((input_ids[:, -1] == pad).any()):
        logger.warning(
            "A decoder-only architecture is being used, but right-padding was detected! For correct generation "
            "results, please set `padding_side='left'` when initializing the tokenizer."
        )
    return input_ids, attention_mask


def _default_attention_mask(
    input_ids: torch.Tensor, pad: int | None, eos: int | list[int] | None
) -> torch.Tensor:
    """Mask out pad tokens, unless pad is also an eos token (then nothing can be told apart)."""
    eos_ids = _eos_list(eos)
    if (
        pad is not None
        and bool((input_ids == pad).any())
        and (eos_ids is None or pad not in eos_ids)
    ):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids)


def _finish_lengths(config: GenerationConfig, prompt_len: int, user_max_length: int | None) -> None:
    """Turn max_new_tokens into max_length, as transformers does, and check the lengths fit."""
    default_max_length = user_max_length is None
    if config.max_new_tokens is not None:
        if not default_max_length:
            logger.warning(
                f"Both `max_new_tokens` (={config.max_new_tokens}) and `max_length` (={config.max_length}) "
                "are set; `max_new_tokens` takes precedence."
            )
        config.max_length = config.max_new_tokens + prompt_len
    elif default_max_length and config.max_length == 20:
        warnings.warn(
            "Using the model-agnostic default `max_length` (=20) to control the generation length; "
            "set `max_new_tokens` instead.",
            UserWarning,
            stacklevel=3,
        )
    if prompt_len >= config.max_length:
        raise ValueError(
            f"`max_length` ({config.max_length}) must be larger than the prompt length ({prompt_len}); "
            "set `max_new_tokens` to the number of tokens to generate"
        )
    if config.min_length and config.min_length > config.max_length:
        warnings.warn(
            f"`min_length` ({config.min_length}) is larger than `max_length` ({config.max_length}); "
            "generation stops at max_length.",
            UserWarning,
            stacklevel=3,
        )
    if config.min_new_tokens and config.min_new_tokens + prompt_len > config.max_length:
        warnings.warn(
            f"`min_new_tokens` ({config.min_new_tokens}) plus the prompt length ({prompt_len}) is larger "
            f"than `max_length` ({config.max_length}); generation stops at max_length.",
            UserWarning,
            stacklevel=3,
        )


def _check_streamer(streamer: Any, config: GenerationConfig, batch_size: int) -> None:
    if streamer is None:
        return
    if config.num_beams > 1:
        raise ValueError("`streamer` cannot be used with beam search; set `num_beams=1`")
    rows = batch_size * config.num_return_sequences
    if rows > 1:
        raise ValueError(
            f"`streamer` needs a single sequence (batch size 1, num_return_sequences 1), got {rows} rows"
        )
    if not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise ValueError(
            "`streamer` must have `put(token_ids)` and `end()` methods, like TextStreamer"
        )


def _outside_inference_mode(value: Any) -> Any:
    """Copy the returned tensors so callers may edit them in place (inference tensors refuse that)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_outside_inference_mode(v) for v in value)
    if isinstance(value, (GenerateDecoderOnlyOutput, GenerateBeamDecoderOnlyOutput)):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        past = fields.pop(
            "past_key_values"
        )  # left as is: it can be large, and the model reads it fine
        return type(value)(
            **{k: _outside_inference_mode(v) for k, v in fields.items()}, past_key_values=past
        )
    return value


__all__ = ["GenerateBeamDecoderOnlyOutput", "GenerateDecoderOnlyOutput", "generate"]
