"""BLOOM in PyTorch, top to bottom as the architecture diagram reads.

    input_ids ─ word_embeddings ─ word_embeddings_layernorm ─┬─ BloomBlock × n_layer ─ ln_f ─ head
                                                              │ x = x + attention(ln(x), ALiBi)
                                                              │ x = x + mlp(ln(x))

Notation in shape comments: B batch, T new tokens, S past + new tokens (key length), H heads,
D head_dim, C hidden_size = H * D.

Parameter names are transformers' (the checkpoint schema), so its folders load unchanged. Loading,
saving and the shared plumbing (flags, head mask, embeddings, the heads' trunk call and outputs)
live in `pretrained.py`; input checks in `checks.py`, the cache in `cache.py`, the heads' losses in
`losses.py`; this file holds the math.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bloomlm.alibi import alibi_slopes
from bloomlm.config import BloomConfig
from bloomlm.generation import GenerationConfigMixin
from bloomlm.outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from bloomlm.torch import checks
from bloomlm.torch.cache import LayerPast, StaticCache, reorder_legacy_cache
from bloomlm.torch.hf_compat import CausalLMAPI
from bloomlm.torch.losses import (
    causal_lm_loss,
    question_answering_loss,
    sequence_classification_loss,
    token_classification_loss,
)
from bloomlm.torch.pretrained import BloomPreTrainedModel, _BloomHead

# --------------------------------------------------------------------------------------------------
# Position bias and masks
# --------------------------------------------------------------------------------------------------


def build_alibi(
    attention_mask: torch.Tensor,
    n_head: int,
    dtype: torch.dtype,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """ALiBi bias (B * H, 1, S): slope[h] * position of key s, counted over kept tokens only.
    `slopes` [H]: given under tensor parallelism (a rank's slice of the global heads' slopes)."""
    batch_size, key_length = attention_mask.shape
    if slopes is None:
        slopes = torch.from_numpy(alibi_slopes(n_head))
    slopes = slopes.to(attention_mask.device)
    positions = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]  # (B, 1, S)
    alibi = slopes[None, :, None] * positions  # (B, H, S)
    return alibi.reshape(batch_size * n_head, 1, key_length).to(dtype)


def build_causal_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, S), True where a query may NOT look: future keys and padding.

    With a cache of P = S - T tokens, query t sits at position P + t and sees keys 0 .. P + t.
    """
    batch_size, key_length = attention_mask.shape
    past_length = key_length - query_length
    device = attention_mask.device
    query_pos = torch.arange(past_length, key_length, device=device)[:, None]
    key_pos = torch.arange(key_length, device=device)[None, :]
    future = key_pos > query_pos  # (T, S)
    padding = attention_mask[:, None, None, :] == 0  # (B, 1, 1, S)
    return future[None, None] | padding


def attention_bias(
    alibi: torch.Tensor, causal_mask: torch.Tensor, n_head: int, dtype: torch.dtype
) -> torch.Tensor:
    """ALiBi and masking as one additive bias (B, H, T, S) for the fused attention path.

    Masked entries get dtype's lowest value, not -inf: a query that sees nothing (a padding row)
    then gets uniform weights, as in transformers' eager path, instead of NaN.
    """
    batch_size = causal_mask.shape[0]
    bias = alibi.view(batch_size, n_head, 1, -1).to(dtype)
    return bias.masked_fill(causal_mask, torch.finfo(dtype).min)


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, BLOOM's: x/2 (1 + tanh(0.79788456 x (1 + 0.044715 x²))).

    torch's fused kernel computes the same formula (its sqrt(2/pi) differs from BLOOM's 0.79788456
    by 1e-9, results by ~1e-8 relative) in one op instead of seven: decoding runs it every token.
    """
    return F.gelu(x, approximate="tanh")


def tp_linear(x: torch.Tensor, layer: nn.Linear, pretraining_tp: int) -> torch.Tensor:
    """`layer(x)`, summed in `pretraining_tp` column slices when that is > 1: the order Megatron's
    TP ranks added them (`slow_but_exact` reproduces the pre-training rounding). Unlike transformers
    4.37 it also adds the bias, so it equals `layer(x)` up to rounding.
    """
    if pretraining_tp == 1:
        return layer(x)
    in_features = layer.weight.shape[-1]
    slice_width = in_features / pretraining_tp
    out = torch.zeros(*x.shape[:-1], layer.weight.shape[0], dtype=x.dtype, device=x.device)
    for i in range(pretraining_tp):
        lo, hi = int(i * slice_width), int((i + 1) * slice_width)
        out = out + F.linear(x[..., lo:hi], layer.weight[:, lo:hi])
    return out if layer.bias is None else out + layer.bias


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return residual + F.dropout(x, p=p, training=training)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class BloomAttention(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        self.num_heads = config.n_head
        self.head_dim = config.hidden_size // config.n_head
        self.hidden_dropout = config.hidden_dropout
        self.tp_slices = config.pretraining_tp if config.slow_but_exact else 1
        self.inv_norm_factor = self.head_dim**-0.5
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = nn.Dropout(config.attention_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor | None,
        attention_mask: torch.Tensor,
        layer_past: LayerPast | StaticCache | None = None,
        head_mask: torch.Tensor | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, LayerPast | StaticCache | None, torch.Tensor | None]:
        """Two paths, one result. With `alibi` given, transformers' eager math, needed to return
        attention probabilities or apply a head mask. With `alibi=None`, `attention_mask` is the
        ready additive bias (ALiBi + masking, `attention_bias`); one fused SDPA call does the rest.
        """
        B, T, _ = hidden_states.shape
        # The fused projection is laid out per head: (..., H, 3, D), not (..., 3, H, D).
        qkv = self.query_key_value(hidden_states).view(B, T, self.num_heads, 3, self.head_dim)
        query, key, value = (qkv[..., i, :].transpose(1, 2) for i in range(3))  # (B, H, T, D) each
        key, value, present = self._extend_cache(key, value, layer_past, use_cache)  # (B, H, S, D)
        if alibi is None:
            dropout_p = self.attention_dropout.p if self.training else 0.0
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout_p,
                scale=self.inv_norm_factor,
            )  # fmt: skip
            probs = None
        else:
            context, probs = self._attend_eager(query, key, value, alibi, attention_mask, head_mask)
        context = context.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        output = tp_linear(context, self.dense, self.tp_slices)
        output = dropout_add(output, residual, self.hidden_dropout, self.training)
        return output, present, (probs if output_attentions else None)

    def _extend_cache(self, key, value, layer_past, use_cache):
        """Past + new keys and values (B, H, S, D) and the cache to hand back: a StaticCache written
        in place, or BLOOM's tuple layout, converted here at the boundary."""
        if isinstance(layer_past, StaticCache):
            key, value = layer_past.update(self.layer_idx, key, value)
            return key, value, layer_past
        B, H, _, D = key.shape
        if layer_past is not None:
            past_key, past_value = layer_past  # (B*H, D, P), (B*H, P, D)
            P = past_key.shape[-1]
            key = torch.cat((past_key.view(B, H, D, P).transpose(-1, -2), key), dim=2)
            value = torch.cat((past_value.view(B, H, P, D), value), dim=2)
        if not use_cache:
            return key, value, None
        S = key.shape[2]
        return key, value, (key.transpose(-1, -2).reshape(B * H, D, S), value.reshape(B * H, S, D))

    def _attend_eager(self, query, key, value, alibi, causal_mask, head_mask):
        """transformers' eager math on (B, H, *, D) inputs; returns context (B, H, T, D), probs."""
        B, H, T, D = query.shape
        S = key.shape[2]
        query = query.reshape(B * H, T, D)
        key = key.transpose(-1, -2).reshape(B * H, D, S)
        # scores = alibi + (q . k) / sqrt(D), softmax in float32 whatever the weights' dtype:
        # float16's smallest value (-65504) could not mask, and half-precision sums lose the tail.
        scores = alibi.baddbmm(query, key, beta=1.0, alpha=self.inv_norm_factor).view(B, H, T, S)
        if scores.dtype == torch.float16:
            scores = scores.float()
        scores = scores.masked_fill(causal_mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        probs = self.attention_dropout(probs)
        if head_mask is not None:
            probs = probs * head_mask
        context = torch.bmm(probs.view(B * H, T, S), value.reshape(B * H, S, D))
        return context.view(B, H, T, D), probs


class BloomMLP(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.tp_slices = config.pretraining_tp if config.slow_but_exact else 1
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden_states = bloom_gelu(self.dense_h_to_4h(hidden_states))
        output = tp_linear(hidden_states, self.dense_4h_to_h, self.tp_slices)
        return dropout_add(output, residual, self.hidden_dropout, self.training)


class BloomBlock(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_epsilon
        )
        self.mlp = BloomMLP(config)
        # Some BLOOM variants take the residual after the LayerNorm instead of before it.
        self.post_ln_residual = config.apply_residual_connection_post_layernorm

    def forward(
        self,
        hidden_states: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_past: LayerPast | None = None,
        head_mask: torch.Tensor | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, LayerPast | None, torch.Tensor | None]:
        normed = self.input_layernorm(hidden_states)
        residual = normed if self.post_ln_residual else hidden_states
        attn_output, present, probs = self.self_attention(
            normed, residual, alibi, attention_mask, layer_past, head_mask, use_cache,
            output_attentions,
        )  # fmt: skip
        normed = self.post_attention_layernorm(attn_output)
        residual = normed if self.post_ln_residual else attn_output
        return self.mlp(normed, residual), present, probs


# --------------------------------------------------------------------------------------------------
# The base model
# --------------------------------------------------------------------------------------------------


class BloomModel(BloomPreTrainedModel):
    """Embeddings, the decoder blocks and the final LayerNorm; returns the last hidden state."""

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.embed_dim = config.hidden_size
        self.num_heads = config.n_head  # the heads computed here: H / N under tensor parallelism
        self.alibi_slopes: torch.Tensor | None = None  # tensor parallelism: slopes of those heads
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_epsilon
        )
        self.h = nn.ModuleList([BloomBlock(config) for _ in range(config.n_layer)])
        for i, block in enumerate(self.h):
            block.self_attention.layer_idx = i  # the StaticCache slot this layer writes
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.word_embeddings = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: tuple[LayerPast, ...] | StaticCache | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **deprecated_arguments,
    ) -> BaseModelOutputWithPastAndCrossAttentions | tuple:
        # Over 40 lines: the one pass down the blocks, collecting what each flag asks for.
        self._pop_deprecated(deprecated_arguments)
        flags = self._resolve_flags(use_cache, output_attentions, output_hidden_states, return_dict)
        use_cache, output_attentions, output_hidden_states, return_dict = flags
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the recomputed blocks cannot hand back a cache
        # The eager path exposes the probabilities and head masks, and gives transformers'
        # gradients: a padding query sees only masked keys, and there the fused kernel's backward
        # (an additive bias instead of masked_fill) lets gradient into its q and k. The fused path
        # serves inference.
        eager = output_attentions or head_mask is not None or torch.is_grad_enabled()
        hidden_states, alibi, mask = self._embed(
            input_ids, past_key_values, attention_mask, inputs_embeds, eager
        )
        static_cache = past_key_values if isinstance(past_key_values, StaticCache) else None
        if past_key_values is None or static_cache is not None:
            past_key_values = (static_cache,) * len(self.h)  # a StaticCache serves every layer

        presents = () if use_cache else None
        all_attentions = () if output_attentions else None
        all_hidden_states = () if output_hidden_states else None
        head_masks = self._layer_head_masks(head_mask)
        for block, layer_past, layer_head_mask in zip(self.h, past_key_values, head_masks):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            args = (hidden_states, alibi, mask, layer_past, layer_head_mask, use_cache)
            if self.gradient_checkpointing and self.training:
                outputs = checkpoint(block, *args, output_attentions, use_reentrant=False)
            else:
                outputs = block(*args, output_attentions)
            hidden_states, present, probs = outputs
            if use_cache:
                presents += (present,)
            if output_attentions:
                all_attentions += (probs,)
        if static_cache is not None:
            static_cache.advance(hidden_states.shape[1])
            presents = static_cache if use_cache else None
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutputWithPastAndCrossAttentions(
            hidden_states, presents, all_hidden_states, all_attentions
        )  # last_hidden_state, past_key_values, hidden_states, attentions
        return output if return_dict else output.to_tuple()

    def _embed(
        self,
        input_ids: torch.LongTensor | None,
        past_key_values: tuple[LayerPast, ...] | StaticCache | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        eager: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Checked inputs to the blocks' (hidden states, alibi, mask): the embeddings after their
        LayerNorm, and the position bias and masks built once, not once per layer: ALiBi and the
        causal mask for the eager path, (None, one additive bias) for the fused path."""
        checks.check_inputs(self.config, input_ids, inputs_embeds)
        batch_size, seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if isinstance(past_key_values, StaticCache):
            past_length = checks.check_static_cache(past_key_values, batch_size, seq_length)
        else:
            past_length = checks.check_past(
                self.config, past_key_values, batch_size, self.num_heads
            )
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        hidden_states = self.word_embeddings_layernorm(inputs_embeds)

        if attention_mask is None:
            shape = (batch_size, past_length + seq_length)
            attention_mask = torch.ones(shape, device=hidden_states.device)
        else:
            checks.check_attention_mask(attention_mask, batch_size, past_length, seq_length)
            attention_mask = attention_mask.to(hidden_states.device)
        dtype = hidden_states.dtype
        alibi = build_alibi(attention_mask, self.num_heads, dtype, self.alibi_slopes)
        causal_mask = build_causal_mask(attention_mask, seq_length)
        if eager:
            return hidden_states, alibi, causal_mask
        return hidden_states, None, attention_bias(alibi, causal_mask, self.num_heads, dtype)


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


class BloomForCausalLM(GenerationConfigMixin, CausalLMAPI, _BloomHead):
    """Next-token logits from an LM head tied to the input embeddings; `generate` for text."""

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.transformer = BloomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: tuple[LayerPast, ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        *,
        num_logits_to_keep: int = 0,
        **deprecated_arguments,
    ) -> CausalLMOutputWithCrossAttentions | tuple:
        """`num_logits_to_keep`: logits for only the last k positions (0: all, transformers'
        behaviour). Generation needs only the last one, and the LM head (vocab x hidden, the
        largest matrix) then runs on that position alone."""
        checks.check_logits_to_keep(num_logits_to_keep, labels)
        base, return_dict = self._run_trunk(
            input_ids, past_key_values, attention_mask, head_mask, inputs_embeds,
            use_cache, output_attentions, output_hidden_states, return_dict, deprecated_arguments,
        )  # fmt: skip
        logits = self.lm_head(base.last_hidden_state[:, -num_logits_to_keep:])  # -0: every position
        loss = None
        if labels is not None:
            checks.check_token_labels(labels, logits.shape[:2], "labels")
            loss = causal_lm_loss(logits, labels.to(logits.device))
        return self._output(
            CausalLMOutputWithCrossAttentions, base, return_dict, loss=loss, logits=logits
        )

    def generate(self, *args, **kwargs):
        """Greedy, sampling and beam search with transformers' arguments (`torch/generate.py`)."""
        from bloomlm.torch.generate import generate

        return generate(self, *args, **kwargs)

    def _new_static_cache(self, batch_size: int, max_length: int) -> StaticCache:
        """A preallocated cache for `generate`: written in place, no concatenation per step."""
        n_head = self.transformer.num_heads  # a rank's heads under tensor parallelism
        return StaticCache(self.config, batch_size, max_length, self.dtype, self.device, n_head)

    def _reorder_cache(
        self, past: tuple[LayerPast, ...], beam_idx: torch.LongTensor
    ) -> tuple[LayerPast, ...]:
        """transformers' beam-search hook: row i of the result is row beam_idx[i] of `past`."""
        return reorder_legacy_cache(past, beam_idx)


class BloomForSequenceClassification(_BloomHead):
    """One label (or regression value) per sequence, read at the last non-padding token of a row."""

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = BloomModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: tuple[LayerPast, ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **deprecated_arguments,
    ) -> SequenceClassifierOutputWithPast | tuple:
        base, return_dict = self._run_trunk(
            input_ids, past_key_values, attention_mask, head_mask, inputs_embeds,
            use_cache, output_attentions, output_hidden_states, return_dict, deprecated_arguments,
        )  # fmt: skip
        logits = self.score(base.last_hidden_state)  # (B, T, num_labels)
        last = self._last_token_index(input_ids, inputs_embeds)
        pooled_logits = logits[torch.arange(logits.shape[0], device=logits.device), last]
        loss = None
        if labels is not None:
            problem = checks.sequence_problem_type(
                self.config, self.num_labels, labels, len(logits)
            )
            loss = sequence_classification_loss(pooled_logits, labels.to(logits.device), problem)
        return self._output(
            SequenceClassifierOutputWithPast, base, return_dict, loss=loss, logits=pooled_logits
        )

    def _last_token_index(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | int:
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None:
            if batch_size != 1:
                raise ValueError(
                    "BloomForSequenceClassification needs config.pad_token_id to find the last "
                    f"token of each row when batch size > 1 (got batch size {batch_size}); set "
                    "pad_token_id or pass one row"
                )
            return -1
        if input_ids is None:
            warnings.warn(
                "BloomForSequenceClassification cannot detect padding in inputs_embeds; the last "
                "position of each row is used",
                stacklevel=3,
            )
            return -1
        # The last position holding a real token. Unlike transformers 4.37 (the token before the
        # first pad), a pad id inside a row, or a BOS equal to the pad id, does not cut it short.
        not_pad = (input_ids != pad_token_id).int()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (not_pad * positions).argmax(-1).to(input_ids.device)


class BloomForTokenClassification(_BloomHead):
    """One label per token (tagging, NER)."""

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = BloomModel(config)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: tuple[LayerPast, ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **deprecated_arguments,
    ) -> TokenClassifierOutput | tuple:
        # The output has no cache field, so none is built (transformers builds one and drops it).
        base, return_dict = self._run_trunk(
            input_ids, past_key_values, attention_mask, head_mask, inputs_embeds,
            False, output_attentions, output_hidden_states, return_dict, deprecated_arguments,
        )  # fmt: skip
        logits = self.classifier(self.dropout(base.last_hidden_state))
        loss = None
        if labels is not None:
            checks.check_token_labels(labels, logits.shape[:2], "labels")
            loss = token_classification_loss(logits, labels.to(logits.device))
        return self._output(TokenClassifierOutput, base, return_dict, loss=loss, logits=logits)


class BloomForQuestionAnswering(_BloomHead):
    """Extractive QA: a start and an end logit for every token."""

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.transformer = BloomModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> QuestionAnsweringModelOutput | tuple:
        if position_ids is not None:
            self._warn_position_ids()
        # No cache in, none out: transformers' QA signature has neither.
        base, return_dict = self._run_trunk(
            input_ids, None, attention_mask, head_mask, inputs_embeds,
            False, output_attentions, output_hidden_states, return_dict, {},
        )  # fmt: skip
        start_logits, end_logits = self.qa_outputs(base.last_hidden_state).unbind(dim=-1)
        start_logits, end_logits = start_logits.contiguous(), end_logits.contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            B = start_logits.shape[0]
            start_positions = checks.check_span_positions(start_positions, B, "start_positions")
            end_positions = checks.check_span_positions(end_positions, B, "end_positions")
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return self._output(
            QuestionAnsweringModelOutput, base, return_dict,
            loss=loss, start_logits=start_logits, end_logits=end_logits,
        )  # fmt: skip
