"""Contrastive search (`penalty_alpha` > 0 with `top_k` > 1; Su et al. 2022), transformers 4.37's
loop on the engine's step protocol.

Each step looks one token ahead: the top_k candidates of every row are all fed to the model, and
the one kept maximises (1 - alpha) * p(candidate) - alpha * max cosine similarity between its last
hidden state and those of every earlier position (prompt and padding included, as transformers
does). So the cache always holds the kept candidate's keys and values: the candidate pass is the
next step's pass.

Two layouts, both transformers': by default the decoder holds B * top_k rows (row b * k + j is
prompt b's candidate j) and one batched step scores every candidate, then `reorder` copies the
kept candidate's row over its prompt's k rows; with `low_memory=True` it holds B rows and runs the
k candidates one after the other, `crop`ping each away, then feeds the kept one again.
"""

from __future__ import annotations

from typing import Any

import torch

from bloomlm.torch.decoding.processors import run_chain
from bloomlm.torch.decoding.state import GenerateDecoderOnlyOutput, Loop
from bloomlm.torch.engine import StepOutput


# Over 40 lines: transformers' contrastive step in its order, so ids and hidden states match.
def contrastive_search(
    loop: Loop, streamer: Any, low_memory: bool = False
) -> GenerateDecoderOnlyOutput | torch.Tensor:
    # Over 40 lines: the greedy loop's eos/streamer/stopping bookkeeping around the look-ahead.
    config, seqs, tokens = loop.config, loop.seqs, loop.tokens
    k, alpha = config.top_k, config.penalty_alpha
    batch = seqs.ids.shape[0]
    first = torch.arange(batch, device=seqs.ids.device) * (1 if low_memory else k)
    out = _first_pass(loop, 1 if low_memory else k)
    context = out.hidden_states[-1][first]  # [B, S, C]: every position's last hidden state
    logits, shown = out.logits[first, -1], _rows_of(out, first)
    eos = torch.tensor(tokens.eos, device=seqs.ids.device) if tokens.eos is not None else None
    unfinished = torch.ones(batch, dtype=torch.long, device=seqs.ids.device)
    while True:
        scores = run_chain(loop.processors, seqs.current, logits)
        top_probs, top_ids = torch.topk(torch.softmax(scores, dim=-1), dim=-1, k=k)
        loop.record.add(scores, shown)
        candidates = _candidates(loop, top_ids, low_memory)  # rows b * k + j
        chosen = _rank(context, candidates.hidden, top_probs, alpha, k)
        rows = torch.arange(batch, device=chosen.device) * k + chosen
        next_tokens = top_ids[torch.arange(batch), chosen]
        context = torch.cat([context, candidates.hidden[rows]], dim=1)
        logits, shown = candidates.logits[rows, -1], _rows_of(candidates, rows)
        _keep(loop, next_tokens, rows, k, low_memory)
        if eos is not None:  # finished rows keep receiving padding
            next_tokens = next_tokens * unfinished + tokens.pad * (1 - unfinished)
        seqs.append(next_tokens)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos is not None:
            unfinished = unfinished * (~torch.isin(next_tokens, eos)).long()
        if loop.stop(seqs.current, loop.record.scores) or (
            eos is not None and unfinished.max() == 0
        ):
            break
    if not config.return_dict_in_generate:
        return seqs.current.contiguous()
    record = loop.record
    return GenerateDecoderOnlyOutput(
        sequences=seqs.current.contiguous(), scores=record.scores, attentions=record.attentions,
        hidden_states=record.hidden_states, past_key_values=_cache_without_lookahead(loop, k,
                                                                                  low_memory),
    )  # fmt: skip


def _first_pass(loop: Loop, copies: int) -> StepOutput:
    """The prompt, with every layer's hidden states (the ranking needs every position's last);
    each prompt's row repeated `copies` times (the batched layout's candidate rows)."""
    seqs, flags = loop.seqs, loop.output_flags
    flags["output_hidden_states"] = True
    embeds, mask = loop.prefill_inputs(seqs.current, seqs.mask[:, : seqs.length])
    ids = seqs.current.repeat_interleave(copies, dim=0)
    if embeds is not None:
        flags["inputs_embeds"] = embeds.repeat_interleave(copies, dim=0)
    loop.decoder.crop(0)
    return loop.decoder.prefill(ids, mask.repeat_interleave(copies, dim=0), **flags)


def _candidates(loop: Loop, top_ids: torch.Tensor, low_memory: bool) -> StepOutput:
    """Every candidate fed one step ahead: logits [B * k, 1, V], last hidden [B * k, 1, C] (and
    what the recorder asks for), rows b * k + j."""
    flags = dict(loop.output_flags, hidden=True)
    if not low_memory:
        return loop.decoder.step(top_ids.reshape(-1, 1), **flags)
    length = loop.seqs.length  # the kept token of the last step is already cached
    outs = []
    for j in range(top_ids.shape[1]):
        outs.append(loop.decoder.step(top_ids[:, j : j + 1], **flags))
        loop.decoder.crop(length)
    return _interleave(outs)


def _interleave(outs: list[StepOutput]) -> StepOutput:
    """k outputs of B rows each -> one output of B * k rows, row b * k + j from outs[j]."""

    def stack(tensors: Any) -> Any:
        if tensors[0] is None:
            return None
        if isinstance(tensors[0], tuple):
            return tuple(stack(layer) for layer in zip(*tensors))
        return torch.stack(tensors, dim=1).flatten(0, 1)

    fields = ("logits", "hidden", "attentions", "hidden_states")
    return StepOutput(*(stack([getattr(out, name) for out in outs]) for name in fields))


def _rank(
    context: torch.Tensor, hidden: torch.Tensor, top_probs: torch.Tensor, alpha: float, k: int
) -> torch.Tensor:
    """Per prompt, the candidate j maximising (1 - alpha) * p_j - alpha * (max cosine similarity
    of its hidden state [B * k, 1, C] with the context [B, S, C]); transformers' arithmetic."""
    context = context.repeat_interleave(k, dim=0)
    norm_context = context / context.norm(dim=2, keepdim=True)
    norm_next = hidden / hidden.norm(dim=2, keepdim=True)
    cosine = torch.matmul(norm_context, norm_next.transpose(1, 2)).squeeze(-1)  # [B * k, S]
    penalty, _ = torch.max(cosine, dim=-1)
    score = (1.0 - alpha) * top_probs.view(-1) - alpha * penalty
    _, chosen = torch.stack(torch.split(score, k)).max(dim=-1)
    return chosen


def _keep(loop: Loop, tokens: torch.Tensor, rows: torch.Tensor, k: int, low_memory: bool) -> None:
    """Make the cache hold the kept candidates: copy their rows over their prompts' k rows, or
    (one row per prompt) feed them again."""
    if low_memory:
        loop.decoder.step(tokens[:, None])
    else:
        loop.decoder.reorder(rows.repeat_interleave(k), masks=False)


def _rows_of(out: StepOutput, rows: torch.Tensor) -> StepOutput:
    """The per-layer outputs the recorder keeps, for the given rows only."""

    def select(layers: tuple | None) -> tuple | None:
        return None if layers is None else tuple(layer[rows] for layer in layers)

    return StepOutput(out.logits, None, select(out.attentions), select(out.hidden_states))


def _cache_without_lookahead(loop: Loop, k: int, low_memory: bool) -> tuple:
    """The cache of the returned sequences, in BLOOM's layout: one row per prompt, without the
    last token's column (the look-ahead pass wrote it; the other loops never feed it)."""
    past = loop.decoder.legacy_cache()
    rows = loop.seqs.ids.shape[0]
    copies = 1 if low_memory else k

    def first_copies(tensor: torch.Tensor) -> torch.Tensor:
        per_row = tensor.view(rows, copies, -1, *tensor.shape[1:])[:, 0]
        return per_row.reshape(-1, *tensor.shape[1:])

    return tuple((first_copies(key)[..., :-1], first_copies(value)[:, :-1]) for key, value in past)
