"""Text generation for BLOOM causal LMs: greedy, sampling, beam search and beam sampling.

Token for token the same as transformers 4.37.2's `generate` (same logits filters in the same order,
same beam bookkeeping, same random draws for a given `torch.manual_seed`). The loops know the model
only through the engine's step protocol (`torch/engine.py`):

    decoder = model.make_decoder(rows, max_length, compile=...)
    out = decoder.prefill(prompt_ids, prompt_mask)   # out.logits [N, 1, V]: the last position only
    out = decoder.step(next_ids [N, 1])               # then one token per row per step
    decoder.reorder(beam_idx)                         # beams

bloomlm's BloomForCausalLM makes its own decoder (a preallocated KV cache, compiled step on
request); any other model with BLOOM's forward signature (transformers' in the parity tests) is
driven through `ForwardDecoder`. The ids and mask live in buffers preallocated to max_length
(a step writes one column); the filters see the view of the columns so far. Steps run under
`no_grad`, so what `generate` returns is an ordinary tensor, never a copy made to leave
`inference_mode`.

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
from bloomlm.torch.engine import StepOutput, decoder_source, sample_tokens

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
    eos = _eos_list(config.eos_token_id)
    chain = _token_processors(config, eos) + _length_processors(config, prompt_length, eos)
    if config.remove_invalid_values is True:
        chain.append(lambda ids, scores: remove_inf_nan(scores))
    chain += _late_processors(config, prompt_length)
    chain.extend(custom)
    if config.renormalize_logits is True:
        chain.append(lambda ids, scores: log_normalize(scores))
    return chain


def _token_processors(config: GenerationConfig, eos: list[int] | None) -> list[LogitsFn]:
    """Sequence bias, repetition penalty, repeated n-grams, bad words."""
    chain: list[LogitsFn] = []
    if config.sequence_bias is not None:
        chain.append(partial(apply_sequence_bias, sequence_bias=config.sequence_bias))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        chain.append(partial(apply_repetition_penalty, penalty=config.repetition_penalty))
    if config.no_repeat_ngram_size:
        chain.append(partial(ban_repeated_ngrams, ngram_size=config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        bias = bad_words_bias(config.bad_words_ids, eos)
        chain.append(partial(apply_sequence_bias, sequence_bias=bias))
    return chain


def _length_processors(
    config: GenerationConfig, prompt_length: int, eos: list[int] | None
) -> list[LogitsFn]:
    """Minimum lengths (eos banned until reached), forced first and last tokens."""
    chain: list[LogitsFn] = []
    if config.min_length and eos is not None:
        ban_eos = partial(ban_tokens, token_ids=eos)
        chain.append(_when(lambda ids: ids.shape[-1] < config.min_length, ban_eos))
    if config.min_new_tokens and eos is not None:
        min_total = prompt_length + config.min_new_tokens
        chain.append(
            _when(lambda ids: ids.shape[-1] < min_total, partial(ban_tokens, token_ids=eos))
        )
    if config.forced_bos_token_id is not None:
        bos = [config.forced_bos_token_id]
        chain.append(_when(lambda ids: ids.shape[-1] == 1, partial(force_tokens, token_ids=bos)))
    if config.forced_eos_token_id is not None:
        forced_eos = partial(force_tokens, token_ids=_eos_list(config.forced_eos_token_id))
        last = config.max_length - 1
        chain.append(_when(lambda ids: ids.shape[-1] == last, forced_eos))
    return chain


def _late_processors(config: GenerationConfig, prompt_length: int) -> list[LogitsFn]:
    """The exponential eos boost and token suppression, which transformers applies last."""
    chain: list[LogitsFn] = []
    if config.exponential_decay_length_penalty is not None:
        start, factor = config.exponential_decay_length_penalty
        start += prompt_length
        eos = _eos_list(config.eos_token_id)

        def boost(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if ids.shape[-1] <= start:
                return scores
            return boost_eos_exponentially(scores, eos, ids.shape[-1] - start, factor)

        chain.append(boost)
    if config.suppress_tokens is not None:
        chain.append(lambda ids, scores: ban_tokens(scores, config.suppress_tokens))
    if config.begin_suppress_tokens is not None:
        late_start = prompt_length == 1 and config.forced_bos_token_id is not None
        begin = prompt_length + 1 if late_start else prompt_length
        ban = partial(ban_tokens, token_ids=list(config.begin_suppress_tokens))
        chain.append(_when(lambda ids: ids.shape[1] == begin, ban))
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
        cur_len = input_ids.shape[-1] + 1
        chosen: list[tuple[float, int, int]] = []  # (score, token, source row) per new beam
        for b, candidates in enumerate(
            zip(next_tokens.tolist(), next_scores.tolist(), next_indices.tolist())
        ):
            if self.done[b]:
                if eos_token_ids is None or pad_token_id is None:
                    raise ValueError(
                        "beam search finished a prompt early: eos_token_id and pad_token_id must be set"
                    )
                # transformers points finished prompts' rows at row 0; only padding is kept from them
                chosen += [(0.0, pad_token_id, 0)] * self.num_beams
                continue
            track = (input_ids, eos_token_ids, beam_indices, cur_len - prompt_len)
            chosen += self._choose(b, *candidates, *track)
            best = max(candidates[1])
            self.done[b] = self.done[b] or self.hyps[b].is_done(best, cur_len, prompt_len)
        scores, tokens, rows = zip(*chosen)
        device = input_ids.device
        return (
            torch.tensor(scores, dtype=next_scores.dtype, device=device),
            torch.tensor(tokens, dtype=next_tokens.dtype, device=device),
            torch.tensor(rows, dtype=next_indices.dtype, device=device),
        )

    def _choose(
        self,
        b: int,
        tokens: list[int],
        scores: list[float],
        indices: list[int],
        input_ids: torch.Tensor,
        eos_token_ids: list[int] | None,
        beam_indices: tuple | None,
        generated_len: int,
    ) -> list[tuple[float, int, int]]:
        """Prompt b's next beams, best first: eos candidates among the top num_beams become
        hypotheses; the first num_beams others continue."""
        num_beams = self.num_beams
        kept: list[tuple[float, int, int]] = []
        for rank, (token, score, index) in enumerate(zip(tokens, scores, indices)):
            row = b * num_beams + index
            if eos_token_ids is not None and token in eos_token_ids:
                if (
                    rank >= num_beams
                ):  # an eos outside the top num_beams candidates is not a hypothesis
                    continue
                hyp_indices = beam_indices[row] + (row,) if beam_indices is not None else None
                self.hyps[b].add(input_ids[row].clone(), score, hyp_indices, generated_len)
            else:
                kept.append((score, token, row))
            if len(kept) == num_beams:
                return kept
        raise ValueError(
            f"at most {num_beams} of the candidates {tokens} may be eos tokens {eos_token_ids}"
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
        return _pad_hypotheses(best, input_ids, max_length, pad_token_id, eos_token_ids)


def _pad_hypotheses(
    best: list[tuple[float, torch.Tensor, tuple | None]],
    input_ids: torch.Tensor,
    max_length: int,
    pad_token_id: int | None,
    eos_token_ids: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The chosen hypotheses as one padded tensor (eos after each shorter one), their scores, and
    their beam indices when tracked."""
    lengths = [len(hyp) for _, hyp, _ in best]
    out_len = min(max(lengths) + 1, max_length)
    if min(lengths) != max(lengths) and pad_token_id is None:
        raise ValueError("beam hypotheses of different lengths need a `pad_token_id` to pad them")
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
# The loop's state
# --------------------------------------------------------------------------------------------------


class _Sequences:
    """The ids and attention mask of every row, preallocated to max_length; a step writes one
    column (no growth per step). `current` is the view [N, length] the logits filters see."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int):
        rows, self.length = input_ids.shape
        self.prompt_length = self.length
        self.ids = input_ids.new_zeros(rows, max_length)
        self.ids[:, : self.length] = input_ids
        self.mask = attention_mask.new_ones(rows, max_length)
        self.mask[:, : self.length] = attention_mask

    @property
    def current(self) -> torch.Tensor:
        return self.ids[:, : self.length]

    def append(self, tokens: torch.Tensor) -> None:
        self.ids[:, self.length] = tokens
        self.length += 1

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes row rows[i] (the mask stays, as in transformers' beam search)."""
        self.ids[:, : self.length] = self.ids[rows, : self.length]


class _Recorder:
    """Collects per-step scores / attentions / hidden states when return_dict_in_generate asks for them."""

    def __init__(self, config: GenerationConfig):
        on = bool(config.return_dict_in_generate)
        self.scores = () if on and config.output_scores else None
        self.attentions = () if on and config.output_attentions else None
        self.hidden_states = () if on and config.output_hidden_states else None

    def add(self, scores: torch.Tensor, out: StepOutput) -> None:
        if self.scores is not None:
            self.scores += (scores,)
        if self.attentions is not None:
            self.attentions += (out.attentions,)
        if self.hidden_states is not None:
            self.hidden_states += (out.hidden_states,)


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


@dataclasses.dataclass
class _Loop:
    """Everything a decoding loop uses: the decoder (the model), the sequences so far, the
    filters, the stopping rule, the recorder, and the per-row random generators if any."""

    config: GenerationConfig
    decoder: Any  # a Decoder or ForwardDecoder (torch/engine.py)
    seqs: _Sequences
    tokens: _LoopTokens
    processors: list[LogitsFn]
    warpers: list[LogitsFn]
    stop: _StoppingCriteria
    record: _Recorder
    generators: list[torch.Generator] | None

    def feed(self) -> StepOutput:
        """Run the model on the tokens it has not seen (the whole sequence without a cache)."""
        config, seqs = self.config, self.seqs
        outputs = dict(output_attentions=self.record.attentions is not None,
                       output_hidden_states=self.record.hidden_states is not None)  # fmt: skip
        if config.use_cache and seqs.length > seqs.prompt_length:
            return self.decoder.step(seqs.ids[:, seqs.length - 1 : seqs.length], **outputs)
        self.decoder.crop(0)
        return self.decoder.prefill(seqs.current, seqs.mask[:, : seqs.length], **outputs)

    def filter(self, scores: torch.Tensor) -> torch.Tensor:
        """The logits processors, then (when sampling) the warpers, on scores [N, V]."""
        scores = _run_chain(self.processors, self.seqs.current, scores)
        if self.config.do_sample:
            scores = _run_chain(self.warpers, self.seqs.current, scores)
        return scores


# --------------------------------------------------------------------------------------------------
# Decoding loops
# --------------------------------------------------------------------------------------------------


def _greedy_or_sample(loop: _Loop, streamer: Any) -> GenerateDecoderOnlyOutput | torch.Tensor:
    seqs, eos, pad = loop.seqs, loop.tokens.eos, loop.tokens.pad
    eos_tensor = torch.tensor(eos, device=seqs.ids.device) if eos is not None else None
    unfinished = torch.ones(seqs.ids.shape[0], dtype=torch.long, device=seqs.ids.device)
    while True:
        out = loop.feed()
        scores = loop.filter(out.logits[:, -1, :])
        loop.record.add(scores, out)
        if loop.config.do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_tokens = sample_tokens(probs, loop.generators).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if eos_tensor is not None:  # finished rows keep receiving padding
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        seqs.append(next_tokens)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        all_done = False
        if eos_tensor is not None:
            is_eos = next_tokens.tile(eos_tensor.shape[0], 1).eq(eos_tensor.unsqueeze(1)).any(dim=0)
            unfinished = unfinished * (~is_eos).long()
            all_done = unfinished.max() == 0
        if loop.stop(seqs.current, loop.record.scores) or all_done:
            break
    if not loop.config.return_dict_in_generate:
        return seqs.current.contiguous()
    record = loop.record
    return GenerateDecoderOnlyOutput(
        sequences=seqs.current.contiguous(), scores=record.scores, attentions=record.attentions,
        hidden_states=record.hidden_states, past_key_values=loop.decoder.legacy_cache(),
    )  # fmt: skip


def _beam_search(loop: _Loop, batch_size: int) -> GenerateBeamDecoderOnlyOutput | torch.Tensor:
    config, seqs, record = loop.config, loop.seqs, loop.record
    num_beams, eos, pad = config.num_beams, loop.tokens.eos, loop.tokens.pad
    scorer = BeamSearchScorer(batch_size, config)
    track = record.scores is not None
    beam_indices = tuple(() for _ in range(seqs.ids.shape[0])) if track else None
    beam_scores = torch.zeros((batch_size, num_beams), dtype=torch.float, device=seqs.ids.device)
    if not config.do_sample:
        beam_scores[
            :, 1:
        ] = -1e9  # the beams start identical: only the first may expand at step one
    beam_scores = beam_scores.view(-1)
    while True:
        out = loop.feed()
        processed = loop.filter(torch.nn.functional.log_softmax(out.logits[:, -1, :], dim=-1))
        record.add(processed, out)
        cand_scores, cand_tokens, cand_rows = _beam_candidates(processed, beam_scores, loop)
        beam_scores, beam_tokens, beam_idx = scorer.process(
            seqs.current, cand_scores, cand_tokens, cand_rows, pad, eos, beam_indices,
            seqs.prompt_length,
        )  # fmt: skip
        seqs.reorder(beam_idx)
        seqs.append(beam_tokens)
        loop.decoder.reorder(beam_idx, masks=False)  # transformers keeps the mask in place
        if beam_indices is not None:
            beam_indices = tuple(beam_indices[i] + (i,) for i in beam_idx.tolist())
        if scorer.is_done or loop.stop(seqs.current, record.scores):
            break
    sequences, sequence_scores, indices = scorer.finalize(
        seqs.current, beam_scores, loop.stop.max_length, pad, eos, beam_indices, seqs.prompt_length
    )
    if not config.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences, sequences_scores=sequence_scores if config.output_scores else None,
        scores=record.scores, beam_indices=indices, attentions=record.attentions,
        hidden_states=record.hidden_states, past_key_values=loop.decoder.legacy_cache(),
    )  # fmt: skip


def _beam_candidates(
    processed: torch.Tensor, beam_scores: torch.Tensor, loop: _Loop
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt, next-token candidates over all its beams, best first: (scores, tokens, beam
    index), each [B, K]. Sampling draws 2 * num_beams; search keeps the top ones, room for eos."""
    config, eos = loop.config, loop.tokens.eos
    num_beams, vocab_size = config.num_beams, processed.shape[-1]
    candidates = (processed + beam_scores[:, None].expand_as(processed)).view(
        -1, num_beams * vocab_size
    )
    if config.do_sample:
        probs = torch.softmax(candidates, dim=-1)
        generators = loop.generators[::num_beams] if loop.generators is not None else None
        flat_ids = sample_tokens(probs, generators, num_samples=2 * num_beams)
        scores, order = torch.sort(torch.gather(candidates, -1, flat_ids), descending=True, dim=1)
        flat_ids = torch.gather(flat_ids, -1, order)
    else:
        width = max(2, 1 + (len(eos) if eos else 0)) * num_beams
        scores, flat_ids = torch.topk(candidates, width, dim=1, largest=True, sorted=True)
    rows = torch.div(flat_ids, vocab_size, rounding_mode="floor")
    return scores, flat_ids % vocab_size, rows


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
    *,
    compile: bool | str | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    max_model_len: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
    """transformers 4.37's `generate` for a BLOOM causal LM: same arguments, same tokens.

    `inputs` (or `input_ids=`) is [B, L]; `attention_mask=` [B, L] marks left padding. Any
    GenerationConfig field may be passed as a keyword. `logits_processor` / `stopping_criteria` are
    lists of callables `(input_ids, scores)`, run after the built-in ones as in transformers.
    Returns the sequences [B * num_return_sequences, L'] or, with `return_dict_in_generate=True`,
    a `GenerateDecoderOnlyOutput` / `GenerateBeamDecoderOnlyOutput`.

    `model` is bloomlm's BloomForCausalLM, or any model with BLOOM's forward signature (driven
    through `ForwardDecoder`). bloomlm's own keywords: `compile` (True or a torch.compile mode:
    run the decode step compiled; default: the model's `from_pretrained(compile=...)`),
    `generator` (one torch.Generator per prompt, so each prompt's draws are its own and its text
    does not depend on the rest of the batch; default: the global generator, transformers'
    draws), `max_model_len` (the most tokens a row may reach, prompt included: a longer request
    is a ValueError before anything runs).
    """
    # Over 40 lines: transformers' signature and docstring; the body resolves, checks, dispatches.
    _reject_unsupported_arguments(
        prefix_allowed_tokens_fn, synced_gpus, assistant_model, negative_prompt_ids
    )
    del negative_prompt_attention_mask  # only meaningful with negative_prompt_ids, rejected above
    source = decoder_source(model)
    user_max_length = kwargs.get("max_length")
    config, model_kwargs = _resolve_config(source, generation_config, kwargs)
    input_ids, attention_mask = _prepare_inputs(source, inputs, model_kwargs, config)
    _finish_lengths(config, input_ids.shape[-1], user_max_length)
    _check_usable_length(config, input_ids.shape[-1], max_model_len)
    _check_streamer(streamer, config, input_ids.shape[0])
    loop = _make_loop(source, config, input_ids, attention_mask, logits_processor,
                      stopping_criteria, generator, compile)  # fmt: skip
    with torch.no_grad():  # not inference_mode: what is returned is an ordinary tensor
        if streamer is not None:
            streamer.put(input_ids.cpu())
        try:
            if config.num_beams > 1:
                return _beam_search(loop, input_ids.shape[0])
            return _greedy_or_sample(loop, streamer)
        finally:
            if streamer is not None:  # also on error, so a consumer thread is never left waiting
                streamer.end()


def _make_loop(
    source: Any,
    config: GenerationConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_processor: Sequence[LogitsFn] | None,
    stopping_criteria: Sequence[Callable] | None,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    compile: bool | str | None,
) -> _Loop:
    """Expand the prompts to their rows (beams, or returned sequences) and set up the loop."""
    batch_size, prompt_len = input_ids.shape
    expand = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    generators = _row_generators(generator, batch_size, expand)
    tokens = _LoopTokens.resolve(source, config)
    processors = build_logits_processors(config, prompt_len, logits_processor or ())
    warpers = build_logits_warpers(config) if config.do_sample else []
    stop = _StoppingCriteria(config, stopping_criteria or ())
    rows_ids, rows_mask = (t.repeat_interleave(expand, dim=0) for t in (input_ids, attention_mask))
    seqs = _Sequences(rows_ids, rows_mask, config.max_length)
    decoder = source.make_decoder(batch_size * expand, config.max_length, compile=compile)
    record = _Recorder(config)
    return _Loop(config, decoder, seqs, tokens, processors, warpers, stop, record, generators)


def _row_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None, batch_size: int, expand: int
) -> list[torch.Generator] | None:
    """One generator per row: prompt b's for each of its `expand` rows."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        generators = [generator] * batch_size
    else:
        generators = list(generator)
    if len(generators) != batch_size or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            f"`generator` must be a torch.Generator or a list of one per prompt ({batch_size}), "
            f"got {generator!r}"
        )
    return [g for g in generators for _ in range(expand)]


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


def _prepare_inputs(
    model: Any, inputs: torch.Tensor | None, model_kwargs: dict[str, Any], config: GenerationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the prompt and its mask; build the mask as transformers does when none is given."""
    input_ids = model_kwargs.pop("input_ids", None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    if "inputs_embeds" in model_kwargs:
        raise ValueError("`inputs_embeds` is not supported by bloomlm's generate; pass `input_ids`")
    if model_kwargs:
        raise ValueError(
            f"generate() got unknown arguments {sorted(model_kwargs)}: allowed are `input_ids`, "
            "`attention_mask`, the GenerationConfig fields, `compile`, `generator` and "
            "`max_model_len`"
        )
    if inputs is not None and input_ids is not None:
        raise ValueError("pass the prompt once: either `inputs` or `input_ids`, not both")
    input_ids = _prompt_ids(model, inputs if inputs is not None else input_ids, attention_mask,
                            config)  # fmt: skip
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


def _prompt_ids(
    model: Any, input_ids: Any, attention_mask: Any, config: GenerationConfig
) -> torch.Tensor:
    """The checked prompt [B, L] as int64, or a lone bos token when none is given."""
    if input_ids is None:  # start from a lone bos token
        if attention_mask is not None:
            raise ValueError("`attention_mask` was given without `input_ids`; pass both or neither")
        if config.bos_token_id is None:
            raise ValueError("`bos_token_id` has to be defined when no `input_ids` are provided")
        device = getattr(model, "device", None)  # None for a model without parameters
        return torch.full((1, 1), config.bos_token_id, dtype=torch.long, device=device)
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
    ):
        got = (
            f"{input_ids.dtype} of shape {list(input_ids.shape)}"
            if isinstance(input_ids, torch.Tensor)
            else repr(input_ids)
        )
        raise ValueError(
            f"`input_ids` must be an integer tensor of shape [batch, length], got {got}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"`input_ids` must hold at least one token per row, got shape {list(input_ids.shape)}"
        )
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} in `input_ids` is outside the vocabulary: ids must lie in "
                f"[0, {vocab_size})"
            )
    return input_ids.long()


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


def _check_usable_length(
    config: GenerationConfig, prompt_len: int, max_model_len: int | None
) -> None:
    """A request longer than the usable length fails now, before any memory is allocated."""
    if max_model_len is None:
        return
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1:
        raise ValueError(f"`max_model_len` must be a positive integer, got {max_model_len!r}")
    if config.max_length > max_model_len:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) plus the tokens to generate make "
            f"{config.max_length}, "
            f"more than the usable length max_model_len={max_model_len}; lower max_new_tokens "
            "or raise max_model_len"
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


__all__ = ["GenerateBeamDecoderOnlyOutput", "GenerateDecoderOnlyOutput", "generate"]
