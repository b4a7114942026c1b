"""The logits processors of Flax `generate`: transformers 4.37's Flax set, plus n-gram blocking.

Each is a pure function of (sequences [N, L], scores [N, V], cur_len) under jit, where `cur_len`
is the number of tokens so far (the next token's position), as in transformers' Flax loops:

- min_length: eos ids banned while cur_len <= min_length (transformers' Flax rule, which counts
  one token more than its PyTorch rule `cur_len < min_length`);
- forced_bos_token_id at cur_len == 1, forced_eos_token_id at cur_len == max_length - 1;
- suppress_tokens always, begin_suppress_tokens at the first generated position;
- forced_decoder_ids: [index, token] pairs forcing `token` at cur_len == prompt length + index - 1;
- no_repeat_ngram_size (not in transformers 4.37's Flax): PyTorch's rule, a token that would
  repeat an n-gram of the sequence so far is banned.

`LogitsProcessors` holds the settings as a hashable value: they are static arguments of the
compiled loop (token lists fix shapes), so changing them compiles a new loop.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -jnp.inf


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)


class LogitsProcessors(NamedTuple):
    """The processor settings of one generate call (hashable: a static jit argument)."""

    no_repeat_ngram_size: int = 0
    min_length: int = 0
    eos: tuple[int, ...] = ()
    forced_bos: int | None = None
    forced_eos: tuple[int, ...] = ()
    max_length: int = 0
    suppress: tuple[int, ...] = ()
    begin_suppress: tuple[int, ...] = ()
    begin_index: int = 0
    forced: tuple[tuple[int, int], ...] = ()  # (cur_len, token)

    @classmethod
    def from_config(cls, config: Any, prompt_length: int, max_length: int) -> LogitsProcessors:
        """The settings of `config` (a GenerationConfig) for a prompt of `prompt_length` tokens,
        with transformers' Flax begin index and forced-position rules."""
        begin_index = prompt_length
        if prompt_length == 1 and config.forced_bos_token_id is not None:
            begin_index += 1
        forced_pairs = config.forced_decoder_ids or []
        if forced_pairs:
            begin_index += forced_pairs[-1][0]
        return cls(
            no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
            min_length=int(config.min_length or 0),
            eos=_ids(config.eos_token_id),
            forced_bos=config.forced_bos_token_id,
            forced_eos=_ids(config.forced_eos_token_id),
            max_length=max_length,
            suppress=_ids(config.suppress_tokens),
            begin_suppress=_ids(config.begin_suppress_tokens),
            begin_index=begin_index,
            forced=tuple(
                (prompt_length + int(index) - 1, int(token))
                for index, token in forced_pairs
                if token is not None
            ),
        )

    def __call__(self, sequences: jax.Array, scores: jax.Array, cur_len: jax.Array) -> jax.Array:
        """Apply every active processor, n-gram blocking first (PyTorch's order, so a forced
        token wins over a ban), then transformers' Flax order."""
        if self.no_repeat_ngram_size > 0:
            scores = ban_repeated_ngrams(sequences, scores, cur_len, self.no_repeat_ngram_size)
        if self.eos and self.min_length > 0:
            scores = _ban_where(cur_len <= self.min_length, scores, self.eos)
        if self.forced_bos is not None:
            scores = _force_where(cur_len == 1, scores, (self.forced_bos,))
        if self.forced_eos:
            scores = _force_where(cur_len == self.max_length - 1, scores, self.forced_eos)
        if self.suppress:
            scores = _ban_where(True, scores, self.suppress)
        if self.begin_suppress:
            scores = _ban_where(cur_len == self.begin_index, scores, self.begin_suppress)
        for position, token in self.forced:
            scores = _force_where(cur_len == position, scores, (token,))
        return scores


def _ban_where(condition: Any, scores: jax.Array, token_ids: tuple[int, ...]) -> jax.Array:
    """-inf for `token_ids` where `condition` holds; ids outside the vocabulary are ignored."""
    ids = jnp.asarray([t for t in token_ids if 0 <= t < scores.shape[-1]], jnp.int32)
    return jnp.where(condition, scores.at[..., ids].set(NEG_INF), scores)


def _force_where(condition: Any, scores: jax.Array, token_ids: tuple[int, ...]) -> jax.Array:
    """Where `condition` holds: 0 for `token_ids`, -inf for every other token."""
    forced = jnp.full_like(scores, NEG_INF).at[..., jnp.asarray(token_ids, jnp.int32)].set(0.0)
    return jnp.where(condition, forced, scores)


def ban_repeated_ngrams(
    sequences: jax.Array, scores: jax.Array, cur_len: jax.Array, ngram_size: int
) -> jax.Array:
    """-inf for each token that would complete an n-gram already in `sequences[:, :cur_len]`
    (transformers' PyTorch NoRepeatNGramLogitsProcessor), with fixed shapes for jit."""
    rows, length = sequences.shape
    n = ngram_size
    if length < n:
        return scores
    starts = jnp.arange(length - n + 1)  # every n-gram start position
    windows = sequences[:, starts[:, None] + jnp.arange(n)]  # [N, W, n]
    prefix_start = jnp.maximum(cur_len - (n - 1), 0)
    current = lax.dynamic_slice(sequences, (0, prefix_start), (rows, n - 1))  # [N, n - 1]
    matches = (windows[:, :, :-1] == current[:, None, :]).all(axis=-1)  # [N, W]
    matches = matches & (starts + n <= cur_len)[None, :]  # whole n-grams of the tokens so far
    banned = jnp.zeros(scores.shape, bool)
    banned = banned.at[jnp.arange(rows)[:, None], windows[:, :, -1]].max(matches)
    return jnp.where(banned, NEG_INF, scores)
