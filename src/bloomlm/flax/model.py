"""BLOOM as flax.linen modules, mirroring `bloomlm/torch/model.py` name for name. No I/O here.

Module and parameter names are transformers' Flax BLOOM names, so `model.params` is its tree
(`transformer/h/0/self_attention/query_key_value/kernel`, ...) and its `flax_model.msgpack` loads as
is.

Notation: B batch, T new tokens, S keys (T without a cache, the cache length with one), H heads,
D head dim, C hidden, L layers, V vocabulary.

One block (pre-LN; with `apply_residual_connection_post_layernorm` the residuals are the LN
outputs):

    x ──┬─ input_layernorm ─ self_attention ─ dropout ─(+)─▶ h
        └────────────────── residual ───────────────────┘
    h ──┬─ post_attention_layernorm ─ mlp ─ dropout ─(+)─▶ out
        └───────────────── residual ──────────────────┘

Cache (linen collection "cache", per layer, transformers' layout so caches can be exchanged):
    cached_key, cached_value  [B, S, H, D]   keys/values of every position written so far
    cache_index               int32 []       how many positions are written (the next write offset)
With `scan_layers=True` the same leaves sit once under `h/self_attention/` with a leading L axis.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from bloomlm.alibi import alibi_slopes
from bloomlm.checkpoint_names import BASE_PREFIX
from bloomlm.config import BloomConfig
from bloomlm.flax.outputs import (
    FlaxBaseModelOutput,
    FlaxCausalLMOutput,
    FlaxQuestionAnsweringModelOutput,
    FlaxSequenceClassifierOutput,
    FlaxTokenClassifierOutput,
)

Dtype = jnp.dtype


def build_attention_bias(attention_mask: jax.Array, query_offset, query_length: int, n_head: int):
    """ALiBi bias [B, H, 1, S] (float32) and the keys each query may see [B, 1, T, S] (bool).

    `attention_mask` [B, S]: 1 keep, 0 pad. Positions count kept tokens only (see bloomlm.alibi), so
    left padding changes nothing for a row. Query t sits at absolute position `query_offset + t` and
    sees kept keys at positions up to its own: padded slots and unwritten cache slots stay hidden.
    """
    mask = attention_mask.astype(jnp.int32)
    positions = (jnp.cumsum(mask, axis=-1) - 1) * mask  # [B, S]
    slopes = jnp.asarray(alibi_slopes(n_head))
    alibi = slopes[None, :, None, None] * positions[:, None, None, :].astype(jnp.float32)
    query_positions = query_offset + jnp.arange(query_length)  # [T]
    causal = jnp.arange(mask.shape[-1])[None, :] <= query_positions[:, None]  # [T, S]
    visible = causal[None, None] & (mask[:, None, None, :] > 0)
    return alibi, visible


def bloom_gelu(x: jax.Array) -> jax.Array:
    """The tanh approximation of GELU with BLOOM's constants (its checkpoints were trained with
    it)."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def make_cache(
    config: BloomConfig,
    batch_size: int,
    max_length: int,
    dtype: Any,
    scan_layers: bool,
    is_head: bool,
) -> dict:
    """An empty "cache" collection in the layout the module docstring draws; usable under jit.

    Per layer `h/<i>/self_attention/{cached_key, cached_value, cache_index}` (or all layers stacked
    under `h/self_attention` with scan_layers), under `transformer` for a head model.
    """
    shape = (batch_size, max_length, config.n_head, config.head_dim)  # [B, S, H, D]

    def layer(prefix: tuple = ()) -> dict:
        return {
            "cached_key": jnp.zeros(prefix + shape, dtype),
            "cached_value": jnp.zeros(prefix + shape, dtype),
            "cache_index": jnp.zeros(prefix, jnp.int32),
        }

    if scan_layers:
        cache = {"h": {"self_attention": layer((config.n_layer,))}}
    else:
        cache = {"h": {str(i): {"self_attention": layer()} for i in range(config.n_layer)}}
    return {BASE_PREFIX: cache} if is_head else cache


def _dense(
    features: int, module: nn.Module, name: str | None = None, use_bias: bool = True
) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=nn.initializers.normal(module.config.initializer_range),
        name=name,
    )


def _layer_norm(module: nn.Module, name: str | None = None) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it (the one-pass form loses digits when |mean| >> std).
    return nn.LayerNorm(
        epsilon=module.config.layer_norm_epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        use_fast_variance=False,
        name=name,
    )


class FlaxBloomAttention(nn.Module):
    config: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _update_cache(self, key: jax.Array, value: jax.Array):
        """Write this step's keys/values at `cache_index`;
        return the whole cache and the write offset."""
        cached_key = self.variable("cache", "cached_key")
        cached_value = self.variable("cache", "cached_value")
        cache_index = self.variable("cache", "cache_index")
        offset = cache_index.value
        start = (0, offset, 0, 0)
        cached_key.value = lax.dynamic_update_slice(
            cached_key.value, key.astype(cached_key.value.dtype), start
        )
        cached_value.value = lax.dynamic_update_slice(
            cached_value.value, value.astype(cached_value.value.dtype), start
        )
        cache_index.value = offset + key.shape[1]
        return cached_key.value, cached_value.value, offset

    # Over 40 lines: the trunk top to bottom (embed, blocks or scan, final norm, outputs).
    @nn.compact
    def __call__(self, hidden_states, residual, attention_mask, deterministic: bool = True):
        batch, length, hidden = hidden_states.shape
        n_head = self.config.n_head
        head_dim = hidden // n_head
        # The fused projection is laid out per head as [H, 3, D] (Megatron's order), not [3, H, D].
        fused_qkv = _dense(3 * hidden, self, "query_key_value")(hidden_states).reshape(
            batch, length, n_head, 3, head_dim
        )
        query, key, value = (
            fused_qkv[..., 0, :],
            fused_qkv[..., 1, :],
            fused_qkv[..., 2, :],
        )  # [B, T, H, D]

        query_offset = 0
        if self.has_variable("cache", "cached_key"):
            key, value, query_offset = self._update_cache(key, value)  # [B, S, H, D]
        num_keys = key.shape[1]
        if attention_mask.shape[-1] > num_keys:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} positions but there are only "
                f"{num_keys} keys (the new tokens, or the cache length when decoding with a cache)"
            )
        # A past + new mask is shorter than the cache: the unwritten slots after it are hidden
        # anyway.
        attention_mask = jnp.pad(attention_mask, ((0, 0), (0, num_keys - attention_mask.shape[-1])))
        alibi, visible = build_attention_bias(attention_mask, query_offset, length, n_head)

        scores = jnp.einsum("BTHD,BSHD->BHTS", query, key)
        # Softmax in float32 whatever the dtype: fp16's smallest value (-65504) cannot mask
        # reliably.
        scores = scores.astype(jnp.float32) * (1.0 / np.sqrt(head_dim)) + alibi
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, H, T, S]
        probs = nn.Dropout(self.config.attention_dropout)(probs, deterministic=deterministic)

        context = jnp.einsum("BHTS,BSHD->BTHD", probs, value.astype(self.dtype)).reshape(
            batch, length, hidden
        )
        output = _dense(hidden, self, "dense")(context)
        output = (
            nn.Dropout(self.config.hidden_dropout)(output, deterministic=deterministic) + residual
        )
        if self.has_variable("cache", "cached_key"):
            # Under jit an overfull cache cannot raise: the write was clamped, so poison the output
            # instead.
            output = jnp.where(query_offset + length > num_keys, jnp.nan, output).astype(
                output.dtype
            )
        return output, probs


class FlaxBloomMLP(nn.Module):
    config: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, residual, deterministic: bool = True):
        hidden_states = bloom_gelu(
            _dense(4 * self.config.hidden_size, self, "dense_h_to_4h")(hidden_states)
        )
        hidden_states = _dense(self.config.hidden_size, self, "dense_4h_to_h")(hidden_states)
        return (
            nn.Dropout(self.config.hidden_dropout)(hidden_states, deterministic=deterministic)
            + residual
        )


class FlaxBloomBlock(nn.Module):
    config: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden_states,
        attention_mask,
        deterministic: bool = True,
        output_attentions: bool = False,
    ):
        """[B, T, C] -> ([B, T, C], attention probabilities [B, H, T, S] or None)."""
        post_ln = self.config.apply_residual_connection_post_layernorm
        kwargs = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        layernorm_output = _layer_norm(self, "input_layernorm")(hidden_states)
        residual = layernorm_output if post_ln else hidden_states
        attention_output, probs = FlaxBloomAttention(**kwargs, name="self_attention")(
            layernorm_output, residual, attention_mask, deterministic
        )
        layernorm_output = _layer_norm(self, "post_attention_layernorm")(attention_output)
        residual = layernorm_output if post_ln else attention_output
        output = FlaxBloomMLP(**kwargs, name="mlp")(layernorm_output, residual, deterministic)
        return output, (probs if output_attentions else None)


class _FlaxBloomScanStep(FlaxBloomBlock):
    """A block in the (carry, per-layer output) form `nn.scan` needs;
    the output is (input, attentions)."""

    def __call__(
        self, hidden_states, attention_mask, deterministic, output_attentions, output_hidden_states
    ):
        output, probs = super().__call__(
            hidden_states, attention_mask, deterministic, output_attentions
        )
        return output, (hidden_states if output_hidden_states else None, probs)


class FlaxBloomBlockCollection(nn.Module):
    """The L blocks, named "0", "1", ... as in transformers' tree."""

    config: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self, hidden_states, attention_mask, deterministic, output_attentions, output_hidden_states
    ):
        all_hidden_states, all_attentions = [], []
        # Checkpointed blocks recompute activations in the backward pass (flags static; self is 0).
        block_class = (
            nn.remat(FlaxBloomBlock, static_argnums=(3, 4))
            if self.gradient_checkpointing
            else FlaxBloomBlock
        )
        for index in range(self.config.n_layer):
            all_hidden_states.append(hidden_states)
            block = block_class(self.config, self.dtype, self.param_dtype, name=str(index))
            hidden_states, probs = block(
                hidden_states, attention_mask, deterministic, output_attentions
            )
            all_attentions.append(probs)
        return (
            hidden_states,
            _tuple_if(output_hidden_states, all_hidden_states),
            _tuple_if(output_attentions, all_attentions),
        )


def _tuple_if(flag: bool, values) -> tuple | None:
    return tuple(values) if flag else None


def _scanned_blocks(config: BloomConfig, gradient_checkpointing: bool) -> type[nn.Module]:
    """All blocks as one `nn.scan` over stacked parameters (and caches): one block to compile."""
    step = _FlaxBloomScanStep
    if gradient_checkpointing:
        step = nn.remat(step, static_argnums=(3, 4, 5), prevent_cse=False)
    return nn.scan(
        step,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * 4,
        length=config.n_layer,
    )


class FlaxBloomModule(nn.Module):
    """embeddings -> word_embeddings_layernorm -> L blocks -> ln_f,
    returning a FlaxBaseModelOutput."""

    config: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    gradient_checkpointing: bool = False

    def setup(self) -> None:
        self.word_embeddings = nn.Embed(
            self.config.vocab_size,
            self.config.hidden_size,
            embedding_init=nn.initializers.normal(self.config.initializer_range),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.word_embeddings_layernorm = _layer_norm(self)
        remat = self.gradient_checkpointing
        if self.scan_layers:
            self.h = _scanned_blocks(self.config, remat)(self.config, self.dtype, self.param_dtype)
        else:
            self.h = FlaxBloomBlockCollection(self.config, self.dtype, self.param_dtype, remat)
        self.ln_f = _layer_norm(self)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        # Ids outside [0, V) give NaN embeddings (negative ids too), so they cannot pass unnoticed
        # under jit; the API boundary raises a ValueError for them whenever the ids are concrete.
        input_ids = jnp.where(input_ids < 0, self.config.vocab_size, input_ids)
        embeddings = jnp.take(
            self.word_embeddings.embedding, input_ids, axis=0, mode="fill", fill_value=jnp.nan
        )
        return embeddings.astype(self.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> FlaxBaseModelOutput:
        hidden_states = self.word_embeddings_layernorm(self.embed(input_ids))
        flags = (deterministic, output_attentions, output_hidden_states)
        if self.scan_layers:
            hidden_states, (all_hidden_states, all_attentions) = self.h(
                hidden_states, attention_mask, *flags
            )
            all_hidden_states = _unstack_if(output_hidden_states, all_hidden_states)
            all_attentions = _unstack_if(output_attentions, all_attentions)
        else:
            hidden_states, all_hidden_states, all_attentions = self.h(
                hidden_states, attention_mask, *flags
            )
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        return FlaxBaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


def _unstack_if(flag: bool, stacked: jax.Array | None) -> tuple | None:
    return tuple(stacked[i] for i in range(stacked.shape[0])) if flag else None


class _FlaxBloomHeadModule(nn.Module):
    """Shared fields of the heads: the base model sits under `transformer`,
    as in the PyTorch heads."""

    config: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    gradient_checkpointing: bool = False

    def _body(self) -> FlaxBloomModule:
        settings = (self.config, self.dtype, self.param_dtype, self.scan_layers)
        return FlaxBloomModule(*settings, self.gradient_checkpointing, name=BASE_PREFIX)


class FlaxBloomForCausalLMModule(_FlaxBloomHeadModule):
    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ):
        transformer = self._body()
        outputs = transformer(
            input_ids, attention_mask, deterministic, output_attentions, output_hidden_states
        )
        if self.config.tie_word_embeddings:
            # No lm_head parameter: the logits reuse the input embeddings, as in transformers' tree.
            embedding = transformer.variables["params"]["word_embeddings"]["embedding"].astype(
                self.dtype
            )
            logits = jnp.einsum("BTC,VC->BTV", outputs.last_hidden_state, embedding)
        else:
            logits = _dense(self.config.vocab_size, self, "lm_head", use_bias=False)(
                outputs.last_hidden_state
            )
        return FlaxCausalLMOutput(
            logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class FlaxBloomForSequenceClassificationModule(_FlaxBloomHeadModule):
    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ):
        outputs = self._body()(
            input_ids, attention_mask, deterministic, output_attentions, output_hidden_states
        )
        logits = _dense(self.config.num_labels, self, "score", use_bias=False)(
            outputs.last_hidden_state
        )
        pooled = logits[
            jnp.arange(logits.shape[0]), last_non_pad_index(input_ids, self.config.pad_token_id)
        ]
        return FlaxSequenceClassifierOutput(
            logits=pooled, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def last_non_pad_index(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """Index [B] of the last token that is not `pad_token_id` in each row (the last one if all
    are)."""
    batch, length = input_ids.shape
    if pad_token_id is None:
        if batch != 1:
            raise ValueError(
                "sequence classification pools the last non-padding token, but "
                "config.pad_token_id is None: set it, or pass one row at a time "
                f"(got batch size {batch})"
            )
        return jnp.full((batch,), length - 1)
    from_end = jnp.argmax((input_ids != pad_token_id)[:, ::-1], axis=-1)
    return length - 1 - from_end


class FlaxBloomForTokenClassificationModule(_FlaxBloomHeadModule):
    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ):
        outputs = self._body()(
            input_ids, attention_mask, deterministic, output_attentions, output_hidden_states
        )
        rate = self.config.classifier_dropout
        rate = self.config.hidden_dropout if rate is None else rate
        hidden_states = nn.Dropout(rate)(outputs.last_hidden_state, deterministic=deterministic)
        logits = _dense(self.config.num_labels, self, "classifier")(hidden_states)
        return FlaxTokenClassifierOutput(
            logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class FlaxBloomForQuestionAnsweringModule(_FlaxBloomHeadModule):
    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ):
        outputs = self._body()(
            input_ids, attention_mask, deterministic, output_attentions, output_hidden_states
        )
        logits = _dense(2, self, "qa_outputs")(outputs.last_hidden_state)  # [B, T, 2]
        return FlaxQuestionAnsweringModelOutput(
            start_logits=logits[..., 0],
            end_logits=logits[..., 1],
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# -- one module per settings, for the compiled functions -----------------------------------------


def module_key(module: nn.Module) -> tuple:
    """What fixes a module's computation, hashable (a BloomConfig is not, so its JSON stands in):
    (module class, config JSON, dtype, param_dtype, scan_layers, gradient_checkpointing)."""
    config = BloomConfig.from_dict(module.config.to_dict(), name_or_path="")  # where: no matter
    settings = (module.dtype, module.param_dtype, module.scan_layers, module.gradient_checkpointing)
    return (type(module), config.to_json_string(), *settings)


@functools.lru_cache(maxsize=32)
def module_for_key(key: tuple) -> nn.Module:
    """The one module for `module_key(...)`, shared by the jitted forward and the jitted generate.

    Built from the key's JSON, not from a caller's module: a config changed after a model was made
    cannot reach a function compiled for the old one.
    """
    module_class, config_json, *settings = key
    return module_class(BloomConfig.from_json_string(config_json), *settings)
