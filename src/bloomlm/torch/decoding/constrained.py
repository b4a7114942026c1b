"""Constrained beam search (`constraints=`, `force_words_ids=`): transformers 4.37's
ConstrainedBeamSearchScorer on the engine's step protocol.

Each step the usual top candidates are chosen; then every beam also proposes the tokens that would
advance its unfinished constraints, and the beams kept are picked bank by bank: a hypothesis'
bank is its progress through the constraints, and the best hypothesis of each bank comes before
the second best of any (so progress is never crowded out by likelier text). A finished
hypothesis counts only when it satisfies every constraint (`bloomlm.constraints`).
"""

from __future__ import annotations

from typing import Any

import torch

from bloomlm.constraints import ConstraintListState
from bloomlm.generation import GenerationConfig
from bloomlm.torch.decoding.beams import BeamHypotheses, beam_result, pad_hypotheses
from bloomlm.torch.decoding.processors import run_chain
from bloomlm.torch.decoding.state import GenerateBeamDecoderOnlyOutput, Loop


class ConstrainedBeamSearchScorer:
    """BeamSearchScorer's bookkeeping, where only hypotheses meeting every constraint finish."""

    def __init__(self, batch_size: int, config: GenerationConfig, constraints: list[Any]):
        self.num_beams = config.num_beams
        self.num_beam_hyps_to_keep = config.num_return_sequences
        self.constraints = constraints
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

    def states(self, count: int) -> list[ConstraintListState]:
        return [ConstraintListState([c.copy() for c in self.constraints]) for _ in range(count)]

    def completes(self, sequence: list[int]) -> bool:
        state = self.states(1)[0]
        state.reset(sequence)
        return state.completed

    def process(
        self,
        input_ids: torch.Tensor,
        candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        vocab_scores: torch.Tensor,
        tokens: tuple[int | None, list[int] | None],
        beam_indices: tuple | None,
        prompt_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`candidates` (scores, tokens, beam index) [B, K] best first, `vocab_scores` [N, V] every
        token's score -> (beam scores, tokens, source rows), each [N]."""
        pad, eos = tokens
        cur_len = input_ids.shape[-1] + 1
        out_scores, out_tokens, out_rows = [], [], []
        for b, row_candidates in enumerate(zip(*(c.tolist() for c in candidates))):
            if self.done[b]:
                if eos is None or pad is None:
                    raise ValueError(
                        "beam search finished a prompt early: eos_token_id and pad_token_id must "
                        "be set"
                    )
                out_scores.append(candidates[0].new_zeros(self.num_beams))
                out_tokens.append(candidates[1].new_full((self.num_beams,), pad))
                out_rows.append(candidates[2].new_zeros(self.num_beams))
                continue
            kept = self._choose(b, *row_candidates, input_ids, eos, beam_indices,
                                cur_len - prompt_len)  # fmt: skip
            chosen = [torch.tensor(column, dtype=c.dtype, device=c.device)
                      for column, c in zip(zip(*kept), candidates)]  # fmt: skip
            chosen = self._push_constraints(b, input_ids, vocab_scores, *chosen)
            for out, column in zip((out_scores, out_tokens, out_rows), chosen):
                out.append(column)
            best = max(row_candidates[0])
            self.done[b] = self.hyps[b].is_done(best, cur_len, prompt_len)
        return tuple(torch.cat(column) for column in (out_scores, out_tokens, out_rows))

    def _choose(
        self, b: int, scores: list[float], tokens: list[int], indices: list[int],
        input_ids: torch.Tensor, eos: list[int] | None, beam_indices: tuple | None,
        generated_len: int,
    ) -> list[tuple[float, int, int]]:  # fmt: skip
        """Prompt b's top beams: an eos among the top num_beams candidates finishes its
        hypothesis only when the hypothesis meets every constraint."""
        kept: list[tuple[float, int, int]] = []
        for rank, (score, token, index) in enumerate(zip(scores, tokens, indices)):
            row = b * self.num_beams + index
            if eos is not None and token in eos:
                if rank < self.num_beams and self.completes(input_ids[row].tolist()):
                    hyp_indices = beam_indices[row] + (row,) if beam_indices is not None else None
                    self.hyps[b].add(input_ids[row].clone(), score, hyp_indices, generated_len)
            else:
                kept.append((score, token, row))
            if len(kept) == self.num_beams:
                return kept
        raise ValueError(
            f"at most {self.num_beams} of the candidates {tokens} may be eos tokens {eos}"
        )

    def _push_constraints(
        self, b: int, input_ids: torch.Tensor, vocab_scores: torch.Tensor,
        beam_scores: torch.Tensor, beam_tokens: torch.Tensor, beam_rows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Add every beam's constraint-advancing continuation to the chosen ones, then keep
        num_beams of them bank by bank (transformers' step_sentence_constraint)."""
        n, first = beam_rows.size(0), b * beam_rows.size(0)
        kept_states = self.states(n)
        full = torch.cat((input_ids[beam_rows], beam_tokens[:, None]), dim=-1)
        seen = full.tolist()
        new_states, new_rows, new_tokens, new_scores = [], [], [], []
        for i, prefix in enumerate(input_ids[first : first + n].tolist()):
            kept_states[i].reset(seen[i])
            state = self.states(1)[0]
            state.reset(prefix)
            if state.completed:
                continue
            for token in state.advance():
                advanced = state.copy(stateful=True)
                advanced.add(token)
                if prefix + [token] not in seen:
                    seen.append(prefix + [token])
                    new_states.append(advanced)
                    new_rows.append(first + i)
                    new_tokens.append(token)
                    new_scores.append(vocab_scores[first + i, token])
        if not new_rows:
            return beam_scores, beam_tokens, beam_rows
        scores = torch.cat((beam_scores, torch.stack(new_scores)))
        tokens = torch.cat((beam_tokens, beam_tokens.new_tensor(new_tokens)))
        rows = torch.cat((beam_rows, beam_rows.new_tensor(new_rows)))
        banks = torch.tensor([s.get_bank() for s in kept_states + new_states], device=scores.device)
        order = _bank_order(banks, scores)[:n]
        return scores[order], tokens[order], rows[order]

    def finalize(
        self, input_ids: torch.Tensor, final_beam_scores: torch.Tensor, max_length: int,
        tokens: tuple[int | None, list[int] | None], beam_indices: tuple | None, prompt_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Open beams that meet the constraints become hypotheses; if fewer than
        num_return_sequences do, the others join too. Then the best per prompt, padded."""
        final_scores, generated_len = final_beam_scores.tolist(), input_ids.shape[-1] - prompt_len
        for b, hyps in enumerate(self.hyps):
            if self.done[b]:
                continue
            rows = range(b * self.num_beams, (b + 1) * self.num_beams)
            meeting = [row for row in rows if self.completes(input_ids[row].tolist())]
            for row in meeting:
                row_indices = beam_indices[row] if beam_indices is not None else None
                hyps.add(input_ids[row], final_scores[row], row_indices, generated_len)
            if len(meeting) < self.num_beam_hyps_to_keep:
                for row in (row for row in rows if row not in meeting):
                    hyps.add(input_ids[row], final_scores[row], None, generated_len)
        best = []
        for hyps in self.hyps:
            ranked = sorted(hyps.beams, key=lambda beam: beam[0])  # stable, as transformers'
            best += [ranked.pop() for _ in range(self.num_beam_hyps_to_keep)]
        pad, eos = tokens
        return pad_hypotheses(best, input_ids, max_length, pad, eos)


def _bank_order(banks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Candidates by bank (most progress first) and score, then round-robin over the banks: the
    best of every bank, then the second best of every bank, ..."""
    order = (banks * 100 + scores).sort(descending=True).indices
    rank_in_bank, previous, count = [], None, -1
    for bank in banks[order].tolist():
        count = count + 1 if bank == previous else 0
        previous = bank
        rank_in_bank.append(count)
    round_robin = sorted(range(len(rank_in_bank)), key=rank_in_bank.__getitem__)  # stable
    return order[torch.tensor(round_robin, device=order.device)]


# Over 40 lines: transformers' constrained loop kept in its order, so ids and scores match.
def constrained_beam_search(
    loop: Loop, batch_size: int, constraints: list[Any]
) -> GenerateBeamDecoderOnlyOutput | torch.Tensor:
    # Over 40 lines: the loop mirrors beam_search's, with the constrained scorer's extra input.
    config, seqs, record = loop.config, loop.seqs, loop.record
    num_beams, tokens = config.num_beams, (loop.tokens.pad, loop.tokens.eos)
    scorer = ConstrainedBeamSearchScorer(batch_size, config, constraints)
    beam_indices = (
        tuple(() for _ in range(seqs.ids.shape[0])) if record.scores is not None else None
    )
    beam_scores = torch.zeros((batch_size, num_beams), dtype=torch.float, device=seqs.ids.device)
    beam_scores[:, 1:] = -1e9  # the beams start identical: only the first may expand at step one
    beam_scores = beam_scores.view(-1)
    eos = loop.tokens.eos
    width = max(2, 1 + (len(eos) if eos else 0)) * num_beams
    while True:
        out = loop.feed()
        log_probs = torch.nn.functional.log_softmax(out.logits[:, -1, :], dim=-1)
        processed = run_chain(loop.processors, seqs.current, log_probs)
        scores = processed + beam_scores[:, None].expand_as(processed)
        record.add(scores, out)  # transformers records the scores with the beam scores added
        vocab_size = scores.shape[-1]
        top_scores, flat_ids = torch.topk(scores.view(batch_size, -1), width, dim=1)
        rows = (flat_ids / vocab_size).long()  # transformers' float division, kept
        candidates = (top_scores, flat_ids % vocab_size, rows)
        beam_scores, beam_tokens, beam_idx = scorer.process(
            seqs.current, candidates, scores, tokens, beam_indices, seqs.prompt_length
        )
        seqs.reorder(beam_idx)
        seqs.append(beam_tokens)
        loop.decoder.reorder(beam_idx, masks=False)
        if beam_indices is not None:
            beam_indices = tuple(beam_indices[i] + (i,) for i in beam_idx.tolist())
        if scorer.is_done or loop.stop(seqs.current, record.scores):
            break
    sequences, sequence_scores, indices = scorer.finalize(
        seqs.current, beam_scores, loop.stop.max_length, tokens, beam_indices, seqs.prompt_length
    )
    return beam_result(loop, sequences, sequence_scores, indices)
