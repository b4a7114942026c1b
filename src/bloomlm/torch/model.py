"""BLOOM in PyTorch, top to bottom as the architecture diagram reads.

    input_ids ─ word_embeddings ─ word_embeddings_layernorm ─┬─ BloomBlock × n_layer ─ ln_f ─ head
                                                              │ x = x + attention(ln(x), ALiBi)
                                                              │ x = x + mlp(ln(x))

Notation in shape comments: B batch, T new tokens, S past + new tokens (key length), H heads,
D head_dim, C hidden_size = H * D.

Parameter names are transformers' (the checkpoint schema), so its folders load unchanged. Loading,
saving and the shared plumbing (flags, head mask, the heads' trunk call) live in `pretrained.py`,
input checks in `checks.py`, the KV cache and attention bias in `cache.py`, the decoding engine in
`engine.py`, the heads' losses in `losses.py`; this file holds the math.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

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
from bloomlm.torch.cache import (  # noqa: F401
    AttentionInputs,
    CacheWrite,
    KVCache,
    LayerPast,
    attention_bias,
    build_alibi,
    build_causal_mask,
    call_cache,
    reorder_legacy_cache,
)
from bloomlm.torch.engine import Decoder, StepOutput
from bloomlm.torch.hf_compat import CausalLMAPI
from bloomlm.torch.losses import (
    causal_lm_loss,
    question_answering_loss,
    sequence_classification_loss,
    token_classification_loss,
)
from bloomlm.torch.pretrained import BloomPreTrainedModel, _BloomHead

# -- Attention paths (the bias builders live in cache.py, beside the cache they read) --------------


def attention_implementation(
    requested: str | None, output_attentions: bool, head_mask: torch.Tensor | None, training: bool
) -> str:
    """The attention path of one call: "eager" (transformers' math) or "sdpa" (one fused call).

    Eager where only it serves the call: attention probabilities, a head mask, and training by
    default (attention dropout then draws transformers' masks). Otherwise `requested`
    (`from_pretrained(attn_implementation=...)`, stored as `config._attn_implementation`), by
    default "sdpa". Both paths give transformers' gradients (see `BloomAttention`).
    """
    if output_attentions or head_mask is not None:
        return "eager"
    if requested is None:
        return "eager" if training else "sdpa"
    return requested


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, BLOOM's: x/2 (1 + tanh(0.79788456 x (1 + 0.044715 x²))).

    torch's fused kernel computes the same formula (its sqrt(2/pi) differs from BLOOM's 0.79788456
    by 1e-9, results by ~1e-8 relative) in one op instead of seven: decoding runs it every token.
    """
    return F.gelu(x, approximate="tanh")


def tp_linear(x: torch.Tensor, layer: nn.Module, pretraining_tp: int) -> torch.Tensor:
    """`layer(x)`, summed in `pretraining_tp` column slices when that is > 1: the order Megatron's
    TP ranks added them (`slow_but_exact` reproduces the pre-training rounding). Unlike transformers
    4.37 it also adds the bias, so it equals `layer(x)` up to rounding. A layer that is not an
    nn.Linear (a quantized one: any module mapping [.., C] -> [.., out]) is simply called.
    """
    if pretraining_tp == 1 or not isinstance(layer, nn.Linear):
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


# -- Layers ----------------------------------------------------------------------------------------


class BloomAttention(nn.Module):
    def __init__(self, config: BloomConfig, layer_idx: int = 0):
        super().__init__()
        self.num_heads = config.n_head
        self.head_dim = config.hidden_size // config.n_head
        self.hidden_dropout = config.hidden_dropout
        self.tp_slices = config.pretraining_tp if config.slow_but_exact else 1
        self.inv_norm_factor = self.head_dim**-0.5
        self.layer_idx = layer_idx  # the cache slot this layer writes
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = nn.Dropout(config.attention_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        inputs: AttentionInputs,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Two paths, one result: transformers' eager math (needed for attention probabilities
        or a head mask), or one fused SDPA call with the ready additive bias."""
        B, T, _ = hidden_states.shape
        # The fused projection is laid out per head: (..., H, 3, D), not (..., 3, H, D).
        qkv = self.query_key_value(hidden_states).view(B, T, self.num_heads, 3, self.head_dim)
        query, key, value = (qkv[..., i, :].transpose(1, 2) for i in range(3))  # (B, H, T, D) each
        if inputs.write is not None:
            key, value = inputs.write.update(self.layer_idx, key, value)  # (B, H, S, D)
        if inputs.eager:
            context, probs = self._attend_eager(query, key, value, inputs, head_mask)
        else:
            context, probs = self._attend_fused(query, key, value, inputs), None
        context = context.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        output = tp_linear(context, self.dense, self.tp_slices)
        output = dropout_add(output, residual, self.hidden_dropout, self.training)
        return output, (probs if output_attentions else None)

    def _attend_fused(self, query, key, value, inputs):
        """One SDPA call with the additive bias; context (B, H, T, D)."""
        dropout_p = self.attention_dropout.p if self.training else 0.0
        args = dict(attn_mask=inputs.bias, dropout_p=dropout_p, scale=self.inv_norm_factor)
        if not query.requires_grad:
            return F.scaled_dot_product_attention(query, key, value, **args)
        # transformers' gradients: a query that sees no key (left padding) has constant scores
        # in the eager path, so no gradient reaches its q or the keys (zero the query); and the
        # fused CPU kernel's backward drops such a row's value gradient (the math kernel keeps it).
        query = query * ~inputs.blocked.all(dim=-1, keepdim=True)
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(query, key, value, **args)

    def _attend_eager(self, query, key, value, inputs, head_mask):
        """transformers' eager math on (B, H, *, D) inputs; returns context (B, H, T, D), probs."""
        B, H, T, D = query.shape
        S = key.shape[2]
        query = query.reshape(B * H, T, D)
        key = key.transpose(-1, -2).reshape(B * H, D, S)
        # scores = alibi + (q . k) / sqrt(D), softmax in float32 whatever the weights' dtype:
        # float16's smallest value (-65504) could not mask, and half-precision sums lose the tail.
        scores = inputs.alibi.baddbmm(query, key, beta=1.0, alpha=self.inv_norm_factor)
        scores = scores.view(B, H, T, S)
        if scores.dtype == torch.float16:
            scores = scores.float()
        scores = scores.masked_fill(inputs.blocked, torch.finfo(scores.dtype).min)
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
    def __init__(self, config: BloomConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_epsilon
        )
        self.mlp = BloomMLP(config)
        # Some BLOOM variants take the residual after the LayerNorm instead of before it.
        self.post_ln_residual = config.apply_residual_connection_post_layernorm

    def forward(
        self,
        hidden_states: torch.Tensor,
        inputs: AttentionInputs,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.input_layernorm(hidden_states)
        residual = normed if self.post_ln_residual else hidden_states
        attn_output, probs = self.self_attention(
            normed, residual, inputs, head_mask, output_attentions
        )
        normed = self.post_attention_layernorm(attn_output)
        residual = normed if self.post_ln_residual else attn_output
        return self.mlp(normed, residual), probs


# -- The base model --------------------------------------------------------------------------------


class BloomModel(BloomPreTrainedModel):
    """Embeddings, the decoder blocks and the final LayerNorm; returns the last hidden state."""

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.embed_dim = config.hidden_size
        self.num_heads = config.n_head  # the heads computed here: H / N under tensor parallelism
        self.alibi_slopes: torch.Tensor | None = None  # tensor parallelism: those heads' slopes
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_epsilon
        )
        self.h = nn.ModuleList([BloomBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.word_embeddings = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: tuple[LayerPast, ...] | KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **deprecated_arguments,
    ) -> BaseModelOutputWithPastAndCrossAttentions | tuple:
        """`past_key_values`: BLOOM's tuples (converted to a KVCache once here and back at the
        end), or a KVCache, written in place and returned as is."""
        self._pop_deprecated(deprecated_arguments)
        flags = self._resolve_flags(use_cache, output_attentions, output_hidden_states, return_dict)
        use_cache, output_attentions, output_hidden_states, return_dict = flags
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the recomputed blocks cannot hand back a cache
        hidden_states = self._embed(input_ids, inputs_embeds)
        cache, valid, write = call_cache(
            self.config, past_key_values, attention_mask, hidden_states, use_cache, self.num_heads
        )
        inputs = self._attention_inputs(hidden_states, valid, write, output_attentions, head_mask)
        hidden_states, all_hidden_states, all_attentions = self.run_blocks(
            hidden_states, inputs, head_mask, output_attentions, output_hidden_states
        )
        legacy = cache is not past_key_values  # a KVCache given is handed back as is
        presents = (cache.to_legacy() if legacy else cache) if use_cache else None
        output = BaseModelOutputWithPastAndCrossAttentions(
            hidden_states, presents, all_hidden_states, all_attentions
        )  # last_hidden_state, past_key_values, hidden_states, attentions
        return output if return_dict else output.to_tuple()

    def run_blocks(
        self,
        hidden_states: torch.Tensor,
        inputs: AttentionInputs,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """The blocks and ln_f: (last hidden state, every hidden state, every layer's attention
        probabilities), the last two None unless asked for."""
        all_attentions = () if output_attentions else None
        all_hidden_states = () if output_hidden_states else None
        recompute = self.gradient_checkpointing and self.training
        for block, layer_head_mask in zip(self.h, self._layer_head_masks(head_mask)):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            args = (hidden_states, inputs, layer_head_mask, output_attentions)
            if recompute:
                hidden_states, probs = checkpoint(block, *args, use_reentrant=False)
            else:
                hidden_states, probs = block(*args)
            if output_attentions:
                all_attentions += (probs,)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states, all_attentions

    def decode(
        self, input_ids: torch.Tensor, valid: torch.Tensor, write: CacheWrite,
        output_attentions: bool = False, output_hidden_states: bool = False,
        slopes: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:  # fmt: skip
        """The engine's cached pass, unchecked (its callers checked the ids once): `input_ids`
        [n, T] (or their `inputs_embeds` [n, T, C]) written through `write`, `valid` [n, S] the
        key columns; returns `run_blocks`'."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        states = self.word_embeddings_layernorm(inputs_embeds)
        inputs = self._attention_inputs(states, valid, write, output_attentions, None, slopes)
        return self.run_blocks(states, inputs, None, output_attentions, output_hidden_states)

    def _attention_inputs(
        self, hidden_states, valid, write, output_attentions, head_mask, slopes=None
    ):
        requested = getattr(self.config, "_attn_implementation", None)
        path = attention_implementation(requested, output_attentions, head_mask, self.training)
        slopes = self.alibi_slopes if slopes is None else slopes
        return AttentionInputs.build(valid, hidden_states.shape[1], self.num_heads,
                                     hidden_states.dtype, eager=path == "eager", write=write,
                                     slopes=slopes)  # fmt: skip

    def _embed(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """The checked inputs' embeddings after their LayerNorm."""
        checks.check_inputs(self.config, input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        return self.word_embeddings_layernorm(inputs_embeds)


# -- Heads -----------------------------------------------------------------------------------------


class BloomForCausalLM(GenerationConfigMixin, CausalLMAPI, _BloomHead):
    """Next-token logits from an LM head tied to the input embeddings; `generate` for text, and
    the decoding engine's model side (`make_decoder`, `decode`, `static_step`)."""

    _tied_weights_keys = ["lm_head.weight"]
    compile_decoding: bool | str = False  # make_decoder's default; from_pretrained(compile=...)

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
        past_key_values: tuple[LayerPast, ...] | KVCache | None = None,
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
        """Every decoding strategy of transformers 4.37's `generate` (`torch/generate.py`)."""
        from bloomlm.torch.generate import generate

        return generate(self, *args, **kwargs)

    # -- the decoding engine's model side (torch/engine.py drives these) -------------------------

    def make_decoder(
        self, rows: int, capacity: int, *, compile: bool | str | None = None
    ) -> Decoder:
        """A Decoder for `rows` sequences of at most `capacity` tokens each; `compile`: True or a
        torch.compile mode (default: `from_pretrained(compile=...)`)."""
        compile = self.compile_decoding if compile is None else compile
        return Decoder(self, rows, capacity, compile=compile)

    def decode(
        self, input_ids: torch.Tensor, write: CacheWrite, valid: torch.Tensor, *,
        num_logits: int = 1, hidden: bool = False, output_attentions: bool = False,
        output_hidden_states: bool = False, inputs_embeds: torch.Tensor | None = None,
    ) -> StepOutput:  # fmt: skip
        """`BloomModel.decode`, then logits of the last `num_logits` positions only: the LM head
        never sees the rest of a prompt."""
        last, all_hidden, attentions = self.transformer.decode(
            input_ids, valid, write, output_attentions, output_hidden_states,
            inputs_embeds=inputs_embeds,
        )  # fmt: skip
        last = last[:, -num_logits:]
        return StepOutput(self.lm_head(last), last if hidden else None, attentions, all_hidden)

    def static_step(
        self, input_ids: torch.Tensor, starts: torch.Tensor, valid: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, slopes: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The fixed-shape decode step the engine compiles: one token per row (`input_ids`
        [N, 1]) written at column starts[n] of the cache buffers (keys, values [L, N, H, S, D],
        valid [N, S], all updated in place), attending over the whole capacity; -> logits [N, V]."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        valid[rows, starts] = True
        write = CacheWrite(keys, values, slice(None), keys.shape[3], starts=starts)
        last, _, _ = self.transformer.decode(input_ids, valid, write, slopes=slopes)
        return self.lm_head(last[:, 0])

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
