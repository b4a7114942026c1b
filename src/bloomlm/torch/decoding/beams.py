"""Beam search and beam sampling: transformers' BeamSearchScorer / BeamHypotheses bookkeeping (same
arithmetic, same tie order) and the loop that drives the decoder through it."""

from __future__ import annotations

import torch

from bloomlm.generation import GenerationConfig
from bloomlm.torch.decoding.state import GenerateBeamDecoderOnlyOutput, Loop
from bloomlm.torch.engine import sample_tokens


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


def beam_search(loop: Loop, batch_size: int) -> GenerateBeamDecoderOnlyOutput | torch.Tensor:
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
    processed: torch.Tensor, beam_scores: torch.Tensor, loop: Loop
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
