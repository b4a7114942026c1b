"""What every decoding loop shares: the sequences so far, the recorder of per-step outputs, the
stopping rule, the eos/pad ids, the output classes, and `Loop`, which bundles them with the
decoder."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bloomlm.generation import GenerationConfig
from bloomlm.outputs import ModelOutput
from bloomlm.torch.decoding.inputs import PrefillInputs
from bloomlm.torch.decoding.processors import GroupStep, LogitsFn, eos_list, run_chain
from bloomlm.torch.engine import StepOutput


# transformers' ModelOutput rule (bloomlm.outputs): index by name or position over the set fields,
# iterate over their names.
@dataclasses.dataclass(repr=False)
class GenerateDecoderOnlyOutput(ModelOutput):
    """Greedy, sampling, contrastive and assisted output: sequences [N, L]; scores per step
    [N, V] (processed), when asked for."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Any = None


@dataclasses.dataclass(repr=False)
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """Beam output: sequences [B * num_return_sequences, L], their scores, per-step beam
    scores [N, V]."""

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


class Sequences:
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
        """One token per row ([N]), or several ([N, t], assisted decoding)."""
        count = 1 if tokens.dim() == 1 else tokens.shape[1]
        self.ids[:, self.length : self.length + count] = tokens.view(tokens.shape[0], count)
        self.length += count

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes row rows[i] (the mask stays, as in transformers' beam search)."""
        self.ids[:, : self.length] = self.ids[rows, : self.length]


class Recorder:
    """Collects per-step scores / attentions / hidden states when return_dict_in_generate asks
    for them."""

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


class StoppingCriteria:
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
class LoopTokens:
    """The eos ids and pad id the decoding loops use.

    transformers' loops fall back to the model's own generation config when the resolved config
    has eos or pad set to None (so `eos_token_id=None` does not turn eos off); the logits filters
    use the resolved config only. Both quirks are kept so the tokens match.
    """

    eos: list[int] | None
    pad: int | None

    @classmethod
    def resolve(cls, model: Any, config: GenerationConfig) -> LoopTokens:
        eos, pad = config.eos_token_id, config.pad_token_id
        if eos is None or pad is None:
            default = model_generation_config(model)
            eos = default.eos_token_id if eos is None else eos
            pad = default.pad_token_id if pad is None else pad
        tokens = cls(eos_list(eos), pad)
        if tokens.eos is not None and tokens.pad is None:
            raise ValueError(
                "`eos_token_id` is set, so `pad_token_id` must be set too (it fills finished rows)"
            )
        return tokens


@dataclasses.dataclass
class Loop:
    """Everything a decoding loop uses: the decoder (the model), the sequences so far, the
    filters, the stopping rule, the recorder, and the per-row random generators if any."""

    config: GenerationConfig
    decoder: Any  # a Decoder or ForwardDecoder (torch/engine.py)
    seqs: Sequences
    tokens: LoopTokens
    processors: list[LogitsFn]
    warpers: list[LogitsFn]
    stop: StoppingCriteria
    record: Recorder
    generators: list[torch.Generator] | None
    prefill_inputs: PrefillInputs = dataclasses.field(default_factory=PrefillInputs)
    group_step: GroupStep | None = None  # group beam search's position, for the diversity penalty

    @property
    def output_flags(self) -> dict[str, bool]:
        return dict(output_attentions=self.record.attentions is not None,
                    output_hidden_states=self.record.hidden_states is not None)  # fmt: skip

    def feed(self) -> StepOutput:
        """Run the model on the tokens it has not seen (the whole sequence without a cache)."""
        config, seqs = self.config, self.seqs
        if config.use_cache and seqs.length > seqs.prompt_length:
            step_ids = seqs.ids[:, seqs.length - 1 : seqs.length]
            return self.decoder.step(step_ids, **self.output_flags)
        return self.prefill(**self.output_flags)

    def prefill(self, **flags: Any) -> StepOutput:
        """A pass over the whole sequence from an empty cache (ids, or the embeddings the
        caller or the model's prepare_inputs_for_generation gives)."""
        seqs = self.seqs
        embeds, mask = self.prefill_inputs(seqs.current, seqs.mask[:, : seqs.length])
        if embeds is not None:
            flags["inputs_embeds"] = embeds
        self.decoder.crop(0)
        return self.decoder.prefill(seqs.current, mask, **flags)

    def filter(self, scores: torch.Tensor) -> torch.Tensor:
        """The logits processors, then (when sampling) the warpers, on scores [N, V]."""
        scores = run_chain(self.processors, self.seqs.current, scores)
        if self.config.do_sample:
            scores = run_chain(self.warpers, self.seqs.current, scores)
        return scores


def as_generation_config(config: Any) -> GenerationConfig:
    if isinstance(config, GenerationConfig):
        return config
    if not hasattr(config, "to_dict"):
        raise ValueError(
            f"`generation_config` must be a GenerationConfig, got {type(config).__name__}"
        )
    return GenerationConfig(**config.to_dict())  # e.g. transformers' own GenerationConfig


def model_generation_config(model: Any) -> GenerationConfig:
    """`model.generation_config` when the model has one, else the generation settings of
    `model.config`."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return GenerationConfig.from_model_config(model.config)
    return as_generation_config(config)
