"""Greedy search and multinomial sampling: one token per row per step."""

from __future__ import annotations

from typing import Any

import torch

from bloomlm.torch.decoding.state import GenerateDecoderOnlyOutput, Loop
from bloomlm.torch.engine import sample_tokens


def greedy_or_sample(loop: Loop, streamer: Any) -> GenerateDecoderOnlyOutput | torch.Tensor:
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
