"""Assisted decoding (speculative decoding): transformers 4.37's `assisted_decoding` on the engine's
step protocol.

Each round a drafter proposes tokens after the sequence, and the model scores all of them in one
pass (`step(..., num_logits=k + 1)`): greedy keeps the longest run of drafted tokens the model
itself would have chosen, plus the model's own next token, so the text is plain greedy search's;
sampling accepts drafted tokens by the speculative-sampling rule (Leviathan et al. 2023, with the
assistant's probabilities) or, without them, samples each position. Rejected columns are `crop`ped
from the cache. Two drafters, as in transformers:

- `AssistantDrafter`: a smaller model (`assistant_model=`) decoding greedily or by sampling on its
  own decoder, `num_assistant_tokens` at a time (its generation config's; the "heuristic" schedule
  adds 2 after a round where every drafted token was kept and removes 1, down to 1, otherwise);
- `PromptLookupDrafter` (`prompt_lookup_num_tokens`): the tokens that followed the first earlier
  occurrence of the sequence's last 2 tokens (else of its last token), copied from the sequence.

transformers' details are kept because they decide the ids: the assistant re-reads the last two
tokens each round, a drafted eos at the end of a fully accepted draft is not followed by a model
token, prompt lookup proposes token 0 when it finds nothing, and the per-step attentions and
hidden states of the first round are sliced as transformers slices them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from bloomlm.generation import GenerationConfig
from bloomlm.torch.decoding.processors import (
    LogitsFn,
    build_logits_processors,
    build_logits_warpers,
    run_chain,
)
from bloomlm.torch.decoding.state import (
    GenerateDecoderOnlyOutput,
    Loop,
    LoopTokens,
    StoppingCriteria,
    model_generation_config,
)
from bloomlm.torch.engine import StepOutput, sample_tokens

# --------------------------------------------------------------------------------------------------
# Drafters: candidates(ids [1, L], generators) -> (new ids [1, k], their logits [1, k, V] or None)
# --------------------------------------------------------------------------------------------------


class PromptLookupDrafter:
    """Candidates copied from the sequence itself: what followed the first earlier occurrence of
    its last `max_ngram` (then fewer) tokens, at most `num_tokens` of them."""

    def __init__(self, num_tokens: int, max_ngram: int = 2):
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(
                f"`prompt_lookup_num_tokens` must be a positive integer, got {num_tokens!r}"
            )
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.overshoot = num_tokens  # drafts may run past max_length; the cache needs the room

    def candidates(
        self, ids: torch.Tensor, generators: Sequence[torch.Generator] | None
    ) -> tuple[torch.Tensor, None]:
        length = ids.shape[1]
        for size in range(min(self.max_ngram, length - 1), 0, -1):
            windows = ids.unfold(dimension=1, size=size, step=1)
            matches = (windows == ids[0, -size:]).all(dim=2).nonzero(as_tuple=True)[1]
            for index in matches.tolist():
                start, end = index + size, min(index + size + self.num_tokens, length)
                if start < end:
                    return ids[:, start:end], None
        return ids.new_zeros((1, 1)), None  # transformers' fallback: propose token 0

    def update(self, num_matches: int) -> None:
        """Prompt lookup has no schedule."""


class AssistantDrafter:
    """Candidates from a smaller model, decoded with the main config's strategy on its own
    decoder (kept across rounds, cropped to the accepted tokens)."""

    overshoot = 0

    def __init__(
        self, assistant: Any, target: Any, config: GenerationConfig,
        user_processors: Sequence[LogitsFn], prompt_mask: torch.Tensor, compile: Any,
    ):  # fmt: skip
        _check_assistant(assistant, target)
        own = model_generation_config(assistant)
        self.assistant, self.config, self.compile = assistant, copy.deepcopy(config), compile
        self.num_tokens = float(own.num_assistant_tokens)
        self.schedule = own.num_assistant_tokens_schedule
        self.user_processors, self.prompt_mask = list(user_processors), prompt_mask
        self.tokens = LoopTokens.resolve(assistant, self.config)
        self.decoder: Any = None

    def candidates(
        self, ids: torch.Tensor, generators: Sequence[torch.Generator] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        length = ids.shape[1]
        count = min(int(self.num_tokens), self.config.max_length - length - 1)
        if count <= 0:
            return ids[:, length:], None
        out = self._read(ids)
        config = copy.deepcopy(self.config)
        config.max_new_tokens, config.max_length = count, length + count
        processors = build_logits_processors(config, length, self.user_processors)
        warpers = build_logits_warpers(config) if config.do_sample else []
        stop, drafted, logits = StoppingCriteria(config, ()), ids, []
        while True:
            scores = run_chain(warpers, drafted, run_chain(processors, drafted, out.logits[:, -1]))
            logits.append(scores)
            if config.do_sample:
                token = sample_tokens(torch.softmax(scores, dim=-1), generators).squeeze(1)
            else:
                token = torch.argmax(scores, dim=-1)
            drafted = torch.cat([drafted, token[:, None]], dim=-1)
            ended = self.tokens.eos is not None and int(token) in self.tokens.eos
            if ended or stop(drafted, None):
                return drafted[:, length:], torch.stack(logits, dim=1)
            out = self.decoder.step(token[:, None])

    def _read(self, ids: torch.Tensor) -> StepOutput:
        """Bring the assistant's cache up to `ids`: the prompt on the first round; later, drop
        all but the accepted tokens before the last two and feed those two (transformers)."""
        if self.decoder is None:
            capacity = self.config.max_length
            self.decoder = self.assistant.make_decoder(1, capacity, compile=self.compile)
            mask = torch.ones_like(ids)
            mask[:, : self.prompt_mask.shape[1]] = self.prompt_mask
            return self.decoder.prefill(ids, mask)
        self.decoder.crop(ids.shape[1] - 2)
        return self.decoder.step(ids[:, -2:])

    def update(self, num_matches: int) -> None:
        """transformers' "heuristic" schedule: more drafts after a round where all were kept."""
        if self.schedule == "heuristic":
            if num_matches == int(self.num_tokens):
                self.num_tokens += 2.0
            else:
                self.num_tokens = max(1.0, self.num_tokens - 1.0)


def _check_assistant(assistant: Any, target: Any) -> None:
    """The assistant's drafts must be ids the model can read."""
    ours = getattr(assistant.config, "vocab_size", None)
    theirs = getattr(target.config, "vocab_size", None)
    if ours is not None and theirs is not None and ours > theirs:
        raise ValueError(
            f"`assistant_model` has a larger vocabulary ({ours}) than the model ({theirs}): its "
            "drafts could be ids the model cannot read; use an assistant with the model's tokenizer"
        )


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


# Over 40 lines: draft, verify, accept, crop: one step of transformers' loop in its order.
def assisted_decoding(
    loop: Loop, drafter: Any, streamer: Any
) -> GenerateDecoderOnlyOutput | torch.Tensor:
    # Over 40 lines: draft, verify, select, keep; then transformers' eos and stopping checks.
    seqs, record, eos = loop.seqs, loop.record, loop.tokens.eos
    if loop.prefill_inputs.uses_embeds:
        raise ValueError(
            "assisted decoding takes ids: the model's prepare_inputs_for_generation replaces them "
            "with embeddings (PEFT prompt learning?); generate without an assistant"
        )
    cached = 0  # columns the model's cache holds: all but the sequence's last token
    while True:
        cur_len = seqs.length
        new, draft_logits = drafter.candidates(seqs.current, loop.generators)
        candidate_ids = torch.cat([seqs.current, new], dim=-1)
        count = new.shape[1]
        last_is_eos = eos is not None and int(candidate_ids[0, -1]) in eos
        out = _verify(loop, candidate_ids, cached, count)
        logits = _filter_positions(loop, candidate_ids, out.logits, cur_len)
        max_matches = loop.stop.max_length - cur_len - 1
        if loop.config.do_sample and draft_logits is not None:
            valid, matches = speculative_sample(
                candidate_ids, draft_logits, count, logits, last_is_eos, max_matches,
                loop.generators,
            )  # fmt: skip
        else:
            valid, matches = _select(loop, new, logits, last_is_eos, max_matches)
        seqs.append(valid)
        if streamer is not None:
            streamer.put(valid.cpu())
        cached = seqs.length - 1
        loop.decoder.crop(cached)
        drafter.update(int(matches))
        if record.scores is not None:
            record.scores += tuple(logits[:, i, :] for i in range(int(matches) + 1))
        added = seqs.length if cur_len == seqs.prompt_length else int(matches) + 1
        _record_split(record, out, cur_len, added)
        finished = eos is not None and int(seqs.current[0, -1]) in eos
        if loop.stop(seqs.current, record.scores) or finished:
            break
    if not loop.config.return_dict_in_generate:
        return seqs.current.contiguous()
    return GenerateDecoderOnlyOutput(
        sequences=seqs.current.contiguous(), scores=record.scores, attentions=record.attentions,
        hidden_states=record.hidden_states, past_key_values=loop.decoder.legacy_cache(),
    )  # fmt: skip


def _verify(loop: Loop, candidate_ids: torch.Tensor, cached: int, count: int) -> StepOutput:
    """The model's logits [1, count + 1, V] after the sequence's last token and each candidate:
    the prompt and the candidates in one prefill on the first round, else one step."""
    flags = dict(loop.output_flags, num_logits=count + 1)
    if cached == 0:
        seqs = loop.seqs
        mask = torch.ones_like(candidate_ids)
        mask[:, : seqs.length] = seqs.mask[:, : seqs.length]
        loop.decoder.crop(0)
        return loop.decoder.prefill(candidate_ids, mask, **flags)
    return loop.decoder.step(candidate_ids[:, cached:], **flags)


def _filter_positions(
    loop: Loop, candidate_ids: torch.Tensor, logits: torch.Tensor, cur_len: int
) -> torch.Tensor:
    """The processors (and warpers, when sampling) at every verified position i, seeing the
    sequence up to it: logits [1, k + 1, V] -> scores [1, k + 1, V]."""
    scores = []
    for i in range(logits.shape[1]):
        ids = candidate_ids[:, : cur_len + i]
        position = run_chain(loop.processors, ids, logits[:, i, :])
        if loop.config.do_sample:
            position = run_chain(loop.warpers, ids, position)
        scores.append(position)
    return torch.stack(scores, dim=1)


def _select(
    loop: Loop, new: torch.Tensor, scores: torch.Tensor, last_is_eos: bool, max_matches: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (or, without drafted probabilities, sampled) tokens at every position; keep the
    drafted ones up to the first disagreement, then the model's own."""
    if loop.config.do_sample:
        generator = loop.generators[0] if loop.generators is not None else None
        probs = scores.softmax(dim=-1)
        selected = torch.multinomial(probs[0], num_samples=1, generator=generator).squeeze(1)[None]
    else:
        selected = scores.argmax(dim=-1)
    matches = ((~(new == selected[:, :-1])).cumsum(dim=-1) < 1).sum()
    if last_is_eos and matches == new.shape[1]:
        matches -= 1  # a fully accepted draft ending in eos gets no token after it
    matches = min(matches, max_matches)
    return selected[:, : matches + 1], matches


def speculative_sample(
    candidate_ids: torch.Tensor, draft_logits: torch.Tensor, count: int, scores: torch.Tensor,
    last_is_eos: bool, max_matches: int, generators: Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Algorithm 1 of Leviathan et al.: keep drafted token i with probability min(1, p_i / q_i)
    until the first rejection, then sample from max(p - q, 0) renormalised (or from p after a
    fully accepted draft). transformers' draws, in transformers' order."""
    generator = generators[0] if generators is not None else None
    new = candidate_ids[:, -count:]
    positions = torch.arange(count)
    q = draft_logits.softmax(dim=-1)
    p = scores.softmax(dim=-1)
    ratio = p[:, positions, new].squeeze(0, 1) / q[:, positions, new].squeeze(0, 1)
    draws = torch.rand(ratio.shape, dtype=ratio.dtype, device=ratio.device, generator=generator)
    matches = ((~(draws <= ratio)).cumsum(dim=-1) < 1).sum()
    if last_is_eos and matches == count:
        matches -= 1
        return new[:, : matches + 1], matches
    matches = min(matches, max_matches)
    gamma = min(draft_logits.shape[1], max_matches)
    following = p[:, matches, :]
    if matches < gamma:
        following = torch.clamp(following - q[:, matches, :], min=0)
        following.div_(following.sum())
    token = torch.multinomial(following, num_samples=1, generator=generator).squeeze(1)[None, :]
    return (torch.cat((new[:, :matches], token), dim=-1) if matches > 0 else token), matches


def _record_split(record: Any, out: StepOutput, cur_len: int, added: int) -> None:
    """Per-token attentions / hidden states from one verification pass, sliced as
    transformers' `_split_model_outputs` slices them (the first round's include the prompt)."""
    for name, is_attention in (("attentions", True), ("hidden_states", False)):
        kept = getattr(record, name)
        if kept is None:
            continue
        layers, length, count = getattr(out, name), cur_len, added
        if len(kept) == 0:
            last = length if is_attention else None
            kept += (tuple(layer[..., :length, :last] for layer in layers),)
            length += 1
            count -= length
        for i in range(count):
            last = length + i if is_attention else None
            kept += (tuple(layer[..., i : i + 1, :last] for layer in layers),)
        setattr(record, name, kept)
