"""PyTorch state dict <-> Flax parameter tree for BLOOM, as a table.

Each row maps a PyTorch name (transformers' spelling, relative to the base model; `{}` is the layer
number) to a Flax path and says whether the array is transposed: torch `Linear.weight` is [out, in],
flax `Dense.kernel` is [in, out]. Heads put the base model under `transformer` in both frameworks,
and a base-model checkpoint (no prefix) loads into a head and the other way round, as in PyTorch.

With `scan_layers=True` the layer subtrees `h/0/...`, `h/1/...` are stacked into one `h/...` with a
leading layer axis; `stack_layers`/`unstack_layers` convert (they serve parameters and caches
alike).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bloomlm.checkpoint_names import BASE_PREFIX, add_base_prefix, fit_base_prefix
from bloomlm.config import BloomConfig

# (torch name, flax path, transpose)
_BODY = (
    ("word_embeddings.weight", "word_embeddings/embedding", False),
    ("word_embeddings_layernorm.weight", "word_embeddings_layernorm/scale", False),
    ("word_embeddings_layernorm.bias", "word_embeddings_layernorm/bias", False),
    ("h.{}.input_layernorm.weight", "h/{}/input_layernorm/scale", False),
    ("h.{}.input_layernorm.bias", "h/{}/input_layernorm/bias", False),
    (
        "h.{}.self_attention.query_key_value.weight",
        "h/{}/self_attention/query_key_value/kernel",
        True,
    ),
    ("h.{}.self_attention.query_key_value.bias", "h/{}/self_attention/query_key_value/bias", False),
    ("h.{}.self_attention.dense.weight", "h/{}/self_attention/dense/kernel", True),
    ("h.{}.self_attention.dense.bias", "h/{}/self_attention/dense/bias", False),
    ("h.{}.post_attention_layernorm.weight", "h/{}/post_attention_layernorm/scale", False),
    ("h.{}.post_attention_layernorm.bias", "h/{}/post_attention_layernorm/bias", False),
    ("h.{}.mlp.dense_h_to_4h.weight", "h/{}/mlp/dense_h_to_4h/kernel", True),
    ("h.{}.mlp.dense_h_to_4h.bias", "h/{}/mlp/dense_h_to_4h/bias", False),
    ("h.{}.mlp.dense_4h_to_h.weight", "h/{}/mlp/dense_4h_to_h/kernel", True),
    ("h.{}.mlp.dense_4h_to_h.bias", "h/{}/mlp/dense_4h_to_h/bias", False),
    ("ln_f.weight", "ln_f/scale", False),
    ("ln_f.bias", "ln_f/bias", False),
)

# Head weights sit beside `transformer`, with the same names in both frameworks.
_HEADS = (
    ("lm_head.weight", "lm_head/kernel", True),
    ("score.weight", "score/kernel", True),
    ("classifier.weight", "classifier/kernel", True),
    ("classifier.bias", "classifier/bias", False),
    ("qa_outputs.weight", "qa_outputs/kernel", True),
    ("qa_outputs.bias", "qa_outputs/bias", False),
)


def name_table(config: BloomConfig, with_prefix: bool) -> list[tuple[str, tuple[str, ...], bool]]:
    """Every (torch name, flax path tuple, transpose) row for this config,
    layer templates expanded."""
    rows = []
    for torch_name, flax_path, transpose in _BODY:
        layers = range(config.n_layer) if "{}" in torch_name else [None]
        for layer in layers:
            name, path = (
                (torch_name, flax_path)
                if layer is None
                else (torch_name.format(layer), flax_path.format(layer))
            )
            if with_prefix:
                name, path = add_base_prefix(name), add_base_prefix(path, sep="/")
            rows.append((name, tuple(path.split("/")), transpose))
    if with_prefix:
        rows += [(name, tuple(path.split("/")), transpose) for name, path, transpose in _HEADS]
    return rows


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray], config: BloomConfig, expected: set[tuple[str, ...]]
) -> tuple[dict[tuple[str, ...], np.ndarray], list[str]]:
    """(flat Flax params {path: array}, unused torch names) for a model whose paths are `expected`.

    The `transformer.` prefix is added or stripped to suit the model, so base and head checkpoints
    load into either; a tied `lm_head.weight` has no Flax path (the embeddings serve) and counts as
    unused only when the model has its own `lm_head`.
    """
    with_prefix = any(path[0] == BASE_PREFIX for path in expected)
    by_name = {name: (path, transpose) for name, path, transpose in name_table(config, with_prefix)}
    params, unused = {}, []
    for name, array in state_dict.items():
        key = fit_base_prefix(name, with_prefix)
        if key not in by_name or by_name[key][0] not in expected:
            if not (key == "lm_head.weight" and config.tie_word_embeddings):
                unused.append(name)
            continue
        path, transpose = by_name[key]
        params[path] = np.ascontiguousarray(np.asarray(array).T) if transpose else np.asarray(array)
    return params, unused


def flax_to_torch(
    params: Mapping[tuple[str, ...], np.ndarray], config: BloomConfig
) -> dict[str, np.ndarray]:
    """transformers' PyTorch state dict (NumPy arrays) for flat Flax params in transformers' layout.

    A tied causal LM gets `lm_head.weight` = the embeddings, as its PyTorch `state_dict()` has it.
    """
    with_prefix = any(path[0] == BASE_PREFIX for path in params)
    state_dict = {}
    for name, path, transpose in name_table(config, with_prefix):
        if path in params:
            array = np.asarray(params[path])
            state_dict[name] = np.ascontiguousarray(array.T) if transpose else array
    unknown = set(params) - {path for _, path, _ in name_table(config, with_prefix)}
    if unknown:
        raise ValueError(
            f"Flax parameters with no PyTorch name: {sorted('/'.join(p) for p in unknown)}"
        )
    return state_dict


def tied_lm_head(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the tied `lm_head.weight` (= embeddings) that transformers' PyTorch causal LM state dict
    holds."""
    return {**state_dict, "lm_head.weight": state_dict[add_base_prefix("word_embeddings.weight")]}


# -- scanned layers --------------------------------------------------------------------------------


def stack_layers(tree: Mapping, n_layer: int, stack=np.stack) -> dict:
    """`{..., "h": {"0": t0, "1": t1, ...}}` -> `{..., "h": stacked}` (leading L axis), at any
    depth.

    `stack(list of arrays)` builds each stacked leaf (`np.stack`, or `jnp.stack` under jit).
    """
    if "h" in tree and isinstance(tree["h"], Mapping) and "0" in tree["h"]:
        layers = [tree["h"][str(i)] for i in range(n_layer)]
        return {**tree, "h": _map_leaves(lambda *xs: stack(list(xs)), layers)}
    return {
        k: stack_layers(v, n_layer, stack) if isinstance(v, Mapping) else v for k, v in tree.items()
    }


def unstack_layers(tree: Mapping, n_layer: int, take=lambda x, i: x[i]) -> dict:
    """The inverse of `stack_layers`; `take(array, i)` picks layer i (NumPy or jax arrays)."""
    if "h" in tree and isinstance(tree["h"], Mapping) and "0" not in tree["h"]:
        stacked = tree["h"]
        return {
            **tree,
            "h": {
                str(i): _map_leaves(lambda x, i=i: take(x, i), [stacked]) for i in range(n_layer)
            },
        }
    return {
        k: unstack_layers(v, n_layer, take) if isinstance(v, Mapping) else v
        for k, v in tree.items()
    }


def is_stacked(tree: Mapping) -> bool:
    """Whether the `h` subtree (at any depth) holds stacked layers rather than "0", "1", ..."""
    if "h" in tree and isinstance(tree["h"], Mapping):
        return "0" not in tree["h"]
    return any(is_stacked(v) for v in tree.values() if isinstance(v, Mapping))


def _map_leaves(fn, trees: list):
    first = trees[0]
    if isinstance(first, Mapping):
        return {k: _map_leaves(fn, [t[k] for t in trees]) for k in first}
    return fn(*trees)
