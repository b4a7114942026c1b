"""Beam search and beam sampling: transformers' BeamSearchScorer / BeamHypotheses bookkeeping (same
arithmetic, same tie order) and the loop that drives the decoder through it."""

from __future__ import annotations

import torch

from bloomlm.generation import GenerationConfig
from bloomlm.torch.decoding.processors import GroupStep, run_chain
from bloomlm.torch.decoding.state import GenerateBeamDecoderOnlyOutput, Loop
from bloomlm.torch.engine import sample_tokens


class BeamHypotheses:
    """The n best finished hypotheses of one prompt (or group), scored
    sum_logprobs / generated_len ** length_penalty."""

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
    """Chooses each step's beams per prompt and collects finished hypotheses. With `num_groups`
    > 1 (group beam search) every prompt has one set of hypotheses per group of
    num_beams / num_groups beams, and `process` scores one group at a time."""

    def __init__(self, batch_size: int, config: GenerationConfig, num_groups: int = 1):
        self.num_beams = config.num_beams
        self.num_groups = num_groups
        self.group_size = config.num_beams // num_groups
        self.num_beam_hyps_to_keep = config.num_return_sequences
        self.hyps = [
            BeamHypotheses(
                self.group_size, config.length_penalty, config.early_stopping, config.max_length
            )
            for _ in range(batch_size * num_groups)
        ]
        self.done = [False] * (batch_size * num_groups)

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
        group: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """next_* [B, K] candidates sorted best first -> (beam scores, tokens, source rows), each
        [B * group_size]; `input_ids` and the rows are the group's own rows."""
        cur_len = input_ids.shape[-1] + 1
        chosen: list[tuple[float, int, int]] = []  # (score, token, source row) per new beam
        for b, candidates in enumerate(
            zip(next_tokens.tolist(), next_scores.tolist(), next_indices.tolist())
        ):
            h = b * self.num_groups + group
            if self.done[h]:
                if eos_token_ids is None or pad_token_id is None:
                    raise ValueError(
                        "beam search finished a prompt early: eos_token_id and pad_token_id must "
                        "be set"
                    )
                # transformers points finished prompts' rows at row 0; only padding is kept
                chosen += [(0.0, pad_token_id, 0)] * self.group_size
                continue
            track = (input_ids, eos_token_ids, beam_indices, cur_len - prompt_len)
            chosen += self._choose(h, b * self.group_size, *candidates, *track)
            best = max(candidates[1])
            self.done[h] = self.done[h] or self.hyps[h].is_done(best, cur_len, prompt_len)
        scores, tokens, rows = zip(*chosen)
        device = input_ids.device
        return (
            torch.tensor(scores, dtype=next_scores.dtype, device=device),
            torch.tensor(tokens, dtype=next_tokens.dtype, device=device),
            torch.tensor(rows, dtype=next_indices.dtype, device=device),
        )

    def _choose(
        self,
        h: int,
        first_row: int,
        tokens: list[int],
        scores: list[float],
        indices: list[int],
        input_ids: torch.Tensor,
        eos_token_ids: list[int] | None,
        beam_indices: tuple | None,
        generated_len: int,
    ) -> list[tuple[float, int, int]]:
        """Hypothesis set h's next beams, best first: eos candidates among the top group_size
        become hypotheses; the first group_size others continue."""
        size = self.group_size
        kept: list[tuple[float, int, int]] = []
        for rank, (token, score, index) in enumerate(zip(tokens, scores, indices)):
            row = first_row + index
            if eos_token_ids is not None and token in eos_token_ids:
                if rank >= size:  # an eos outside the top group_size candidates is no hypothesis
                    continue
                hyp_indices = beam_indices[row] + (row,) if beam_indices is not None else None
                self.hyps[h].add(input_ids[row].clone(), score, hyp_indices, generated_len)
            else:
                kept.append((score, token, row))
            if len(kept) == size:
                return kept
        raise ValueError(
            f"at most {size} of the candidates {tokens} may be eos tokens {eos_token_ids}"
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
        """Add the open beams, pick the best `num_return_sequences` per prompt (over all its
        groups); pad, and end with eos if room."""
        final_scores = final_beam_scores.tolist()
        generated_len = input_ids.shape[-1] - prompt_len
        for h, hyps in enumerate(self.hyps):
            if self.done[h]:
                continue
            for row in range(h * self.group_size, (h + 1) * self.group_size):
                row_indices = beam_indices[row] if beam_indices is not None else None
                hyps.add(input_ids[row], final_scores[row], row_indices, generated_len)
        best = []
        for b in range(len(self.hyps) // self.num_groups):
            groups = self.hyps[b * self.num_groups : (b + 1) * self.num_groups]
            # stable: equal scores keep insertion order (group by group)
            ranked = sorted((beam for hyps in groups for beam in hyps.beams), key=lambda x: x[0])
            best += [ranked.pop() for _ in range(self.num_beam_hyps_to_keep)]
        return pad_hypotheses(best, input_ids, max_length, pad_token_id, eos_token_ids)


def pad_hypotheses(
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
        if indices is not None and hyp_indices is not None:
            indices[i, : len(hyp_indices)] = torch.tensor(hyp_indices, dtype=indices.dtype)
        if lengths[i] < out_len:
            sequences[i, lengths[i]] = eos_token_ids[0]
    scores = torch.tensor(
        [score for score, _, _ in best], dtype=torch.float32, device=input_ids.device
    )
    return sequences, scores, indices


def beam_search(loop: Loop, batch_size: int) -> GenerateBeamDecoderOnlyOutput | torch.Tensor:
    config, seqs, record = loop.config, loop.seqs, loop.record
    num_beams, eos, pad = config.num_beams, loop.tokens.eos, loop.tokens.pad
    scorer = BeamSearchScorer(batch_size, config)
    track = record.scores is not None
    beam_indices = tuple(() for _ in range(seqs.ids.shape[0])) if track else None
    beam_scores = torch.zeros((batch_size, num_beams), dtype=torch.float, device=seqs.ids.device)
    if not config.do_sample:  # the beams start identical: only the first may expand at step one
        beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    while True:
        out = loop.feed()
        processed = loop.filter(torch.nn.functional.log_softmax(out.logits[:, -1, :], dim=-1))
        record.add(processed, out)
        candidates = _beam_candidates(processed, beam_scores, loop, num_beams)
        beam_scores, beam_tokens, beam_idx = scorer.process(
            seqs.current, *candidates, pad, eos, beam_indices, seqs.prompt_length
        )
        seqs.reorder(beam_idx)
        seqs.append(beam_tokens)
        loop.decoder.reorder(beam_idx, masks=False)  # transformers keeps the mask in place
        if beam_indices is not None:
            beam_indices = tuple(beam_indices[i] + (i,) for i in beam_idx.tolist())
        if scorer.is_done or loop.stop(seqs.current, record.scores):
            break
    return _beam_output(loop, scorer, beam_scores, beam_indices)


def _beam_output(
    loop: Loop, scorer: BeamSearchScorer, beam_scores: torch.Tensor, beam_indices: tuple | None
) -> GenerateBeamDecoderOnlyOutput | torch.Tensor:
    """The best hypotheses per prompt, as transformers returns them."""
    seqs, tokens = loop.seqs, loop.tokens
    sequences, sequence_scores, indices = scorer.finalize(
        seqs.current, beam_scores, loop.stop.max_length, tokens.pad, tokens.eos, beam_indices,
        seqs.prompt_length,
    )  # fmt: skip
    return beam_result(loop, sequences, sequence_scores, indices)


def beam_result(
    loop: Loop, sequences: torch.Tensor, sequence_scores: torch.Tensor, indices: tuple | None
) -> GenerateBeamDecoderOnlyOutput | torch.Tensor:
    """A beam search's finalized hypotheses as transformers returns them (every beam loop)."""
    config, record = loop.config, loop.record
    if not config.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences, sequences_scores=sequence_scores if config.output_scores else None,
        scores=record.scores, beam_indices=indices, attentions=record.attentions,
        hidden_states=record.hidden_states, past_key_values=loop.decoder.legacy_cache(),
    )  # fmt: skip


def _beam_candidates(
    processed: torch.Tensor, beam_scores: torch.Tensor, loop: Loop, num_beams: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt, next-token candidates over its `num_beams` beams (a group's, in group beam
    search), best first: (scores, tokens, beam index), each [B, K]. Sampling draws
    2 * num_beams; search keeps the top ones, with room for eos."""
    config, eos = loop.config, loop.tokens.eos
    vocab_size = processed.shape[-1]
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
# Group (diverse) beam search
# --------------------------------------------------------------------------------------------------


# Over 40 lines: transformers' group loop kept in its order, so ids and beam indices match.
def group_beam_search(
    loop: Loop, batch_size: int, group_step: GroupStep
) -> GenerateBeamDecoderOnlyOutput | torch.Tensor:
    """num_beams split into num_beam_groups groups searched one after the other each step; the
    diversity penalty (in the processor chain, fed through `group_step`) lowers the tokens the
    earlier groups chose at this step. transformers' beam-history bookkeeping is kept as it is:
    one tuple per group, indexed by the group's own rows."""
    # Over 40 lines: beam_search's step, run once per group, then one reorder for all groups.
    config, seqs, record = loop.config, loop.seqs, loop.record
    groups, num_beams = config.num_beam_groups, config.num_beams
    scorer = BeamSearchScorer(batch_size, config, groups)
    size = scorer.group_size
    track = record.scores is not None
    histories = [tuple(() for _ in range(size * batch_size)) for _ in range(groups)]
    beam_indices = histories if track else None
    beam_scores = torch.full((batch_size, num_beams), -1e9, device=seqs.ids.device)
    beam_scores[:, ::size] = 0  # the first beam of every group may expand at step one
    beam_scores = beam_scores.view(-1)
    while True:
        out = loop.feed()
        log_probs = torch.nn.functional.log_softmax(out.logits[:, -1, :], dim=-1)
        step = _GroupStepResult(log_probs, track)
        for group in range(groups):
            rows = _group_rows(group, size, num_beams, batch_size, log_probs.device)
            group_step.current_tokens, group_step.group = step.tokens, group
            group_ids = seqs.current[rows]
            processed = run_chain(loop.processors, group_ids, log_probs[rows])
            candidates = _beam_candidates(processed, beam_scores[rows], loop, size)
            history = sum(beam_indices, ()) if beam_indices is not None else None
            scores, tokens, index = scorer.process(
                group_ids, *candidates, loop.tokens.pad, loop.tokens.eos, history,
                seqs.prompt_length, group=group,
            )  # fmt: skip
            beam_scores[rows] = scores
            if beam_indices is not None:
                old = beam_indices[group]
                beam_indices[group] = tuple(old[i] + (i,) for i in index.tolist())
            step.add(
                rows, processed, tokens, num_beams * (index // size) + group * size + index % size
            )
        record.add(step.processed, out)
        seqs.reorder(step.sources)
        seqs.append(step.tokens)
        loop.decoder.reorder(step.sources, masks=False)  # transformers keeps the mask in place
        if scorer.is_done or loop.stop(seqs.current, record.scores):
            break
    history = sum(beam_indices, ()) if beam_indices is not None else None
    return _beam_output(loop, scorer, beam_scores, history)


class _GroupStepResult:
    """One step of group beam search, filled group by group: every row's processed scores, next
    token, and the row it continues."""

    def __init__(self, log_probs: torch.Tensor, keep_scores: bool):
        rows = log_probs.shape[0]
        self.processed = torch.zeros_like(log_probs) if keep_scores else None
        self.tokens = torch.zeros(rows, dtype=torch.long, device=log_probs.device)
        self.sources = torch.zeros(rows, dtype=torch.long, device=log_probs.device)

    def add(self, rows: torch.Tensor, processed: torch.Tensor, tokens: torch.Tensor,
            sources: torch.Tensor) -> None:  # fmt: skip
        if self.processed is not None:
            self.processed[rows] = processed
        self.tokens[rows] = tokens
        self.sources[rows] = sources


def _group_rows(
    group: int, size: int, num_beams: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The rows of one group, prompt by prompt: b * num_beams + group * size + 0 .. size - 1."""
    offsets = torch.arange(size, device=device) + group * size
    return (torch.arange(batch_size, device=device)[:, None] * num_beams + offsets).view(-1)
