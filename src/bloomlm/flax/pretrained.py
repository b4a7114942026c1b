"""The user-facing Flax classes: parameters, the checked forward call, caches, dtype casts, model
folders.

`FlaxBloomModel(config)` holds a linen module from `bloomlm.flax.model` and its parameters
(`params`, in transformers' Flax tree), and mirrors transformers 4.37's Flax API:
`__call__(input_ids, attention_mask, past_key_values, params, dropout_rng, train, output_attentions,
output_hidden_states, return_dict)`, `init_cache`, `to_bf16`/`to_fp16`/`to_fp32`,
`from_pretrained`/`save_pretrained`.

Arguments are checked here, at the boundary (`bloomlm.flax.checks`), and raise `ValueError` saying
what is allowed. Shapes are always checked; values (token ids in the vocabulary, 0/1 masks, room
left in the cache) only when the arrays are concrete. Under a user's own `jax.jit` they are tracers
and cannot be read; then an id outside the vocabulary turns its row's outputs into NaN (never a
silent wrong number, other rows are untouched), and a cache too short for the new tokens turns every
output into NaN. Mask values other than 0/1 are not detected under jit.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from bloomlm import files as bloomlm_files
from bloomlm import load_report
from bloomlm.checkpoint_names import BASE_PREFIX, FLAX_WEIGHT_FILES, PYTORCH_WEIGHT_FILES
from bloomlm.config import CONFIG_NAME, BloomConfig, check_buildable, load_model_config
from bloomlm.errors import CheckpointError
from bloomlm.flax import checks, files, sharding, weights
from bloomlm.flax import model as modules
from bloomlm.flax.hf_compat import FlaxPreTrainedModelAPI
from bloomlm.flax.model import make_cache  # noqa: F401 (re-exported: it lived here before)
from bloomlm.generation import GenerationConfigMixin, attach_generation_config

logger = logging.getLogger(__name__)

# transformers' loading keywords that mean nothing here; accepted so calls written for it keep
# working.
_IGNORED_LOADING_KEYWORDS = frozenset(
    {"from_flax", "low_cpu_mem_usage", "_fast_init", "device_map", "torch_dtype"}
)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class FlaxBloomPreTrainedModel(FlaxPreTrainedModelAPI):
    """Parameters + module + the checked call;
    the five public classes differ only in their module."""

    module_class: type = None
    base_model_prefix = BASE_PREFIX

    def __init__(
        self,
        config: BloomConfig,
        input_shape: tuple[int, int] = (1, 1),
        seed: int = 0,
        dtype: Any = jnp.float32,
        _do_init: bool = True,
        *,
        param_dtype: Any = jnp.float32,
        scan_layers: bool = False,
    ) -> None:
        self.config = check_buildable(config, type(self).__name__)
        self.dtype = _as_dtype(dtype, "dtype")
        self.param_dtype = _as_dtype(param_dtype, "param_dtype")
        self.scan_layers = bool(scan_layers)
        self.input_shape = tuple(input_shape)
        self.seed = seed
        self.key = jax.random.PRNGKey(seed)
        self.module = self.module_class(config, self.dtype, self.param_dtype, self.scan_layers)
        ids = jax.ShapeDtypeStruct(self.input_shape, jnp.int32)
        self._shape_tree = jax.eval_shape(
            lambda i: self.module.init(jax.random.PRNGKey(0), i, i)["params"], ids
        )
        self.mesh = None  # a jax.sharding.Mesh once from_pretrained(..., mesh=) placed the model
        self._params = self.init_weights(self.key, self.input_shape) if _do_init else None

    # -- parameters --------------------------------------------------------------------------------

    @property
    def is_head(self) -> bool:
        return self.base_model_prefix in self._shape_tree

    @property
    def params_shape_tree(self) -> dict:
        """The tree of `jax.ShapeDtypeStruct`s `params` must match (stacked layers with
        scan_layers)."""
        return self._shape_tree

    @property
    def params(self) -> dict:
        if self._params is None:
            raise ValueError(
                "this model was made with _do_init=False and holds no parameters: "
                "pass params= to each call, or set model.params"
            )
        return self._params

    @params.setter
    def params(self, params: Mapping) -> None:
        params = self._checked_params(params)
        self._params = params if self.mesh is None else sharding.place(params, self.mesh)

    def _checked_params(self, params: Mapping) -> dict:
        """`params` as this model's layout (stacking transformers' layer tree if scan_layers);
        shapes checked."""
        params = _to_dict(params)
        if self.scan_layers and not weights.is_stacked(params):
            params = weights.stack_layers(params, self.config.n_layer, jnp.stack)
        elif not self.scan_layers and weights.is_stacked(params):
            params = weights.unstack_layers(params, self.config.n_layer)
        got, want = flatten_dict(params, sep="/"), flatten_dict(self._shape_tree, sep="/")
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            raise ValueError(
                f"params do not fit {type(self).__name__}: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for path, array in got.items():
            if tuple(array.shape) != tuple(want[path].shape):
                raise ValueError(
                    f"parameter {path} has shape {tuple(array.shape)}, expected {want[path].shape}"
                )
        return params

    def init_weights(
        self, rng: jax.Array, input_shape: tuple[int, int], params: Mapping | None = None
    ) -> dict:
        """Fresh parameters as transformers initialises them (normal(initializer_range) kernels and
        embeddings, zero biases, unit LayerNorm scales); with `params`, only its missing leaves are
        new."""
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
        fresh = _initial_params(self._shape_tree, self.config.initializer_range, seed)
        if params is None:
            return fresh
        merged = {**flatten_dict(fresh), **flatten_dict(_to_dict(params))}
        return self._checked_params(unflatten_dict(merged))

    def _cast(self, params: Mapping | None, dtype: Any, mask: Any = None) -> dict:
        params = self.params if params is None else params
        mask = jax.tree_util.tree_map(lambda _: True, params) if mask is None else mask

        def cast(leaf, keep):
            return leaf.astype(dtype) if keep and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

        return jax.tree_util.tree_map(cast, _to_dict(params), _to_dict(mask))

    def to_bf16(self, params: Mapping | None = None, mask: Any = None) -> dict:
        """A copy of `params` (default: `self.params`) in bfloat16;
        assign it to `model.params` to keep it."""
        return self._cast(params, jnp.bfloat16, mask)

    def to_fp16(self, params: Mapping | None = None, mask: Any = None) -> dict:
        """A copy of `params` (default: `self.params`) in float16."""
        return self._cast(params, jnp.float16, mask)

    def to_fp32(self, params: Mapping | None = None, mask: Any = None) -> dict:
        """A copy of `params` (default: `self.params`) in float32."""
        return self._cast(params, jnp.float32, mask)

    # -- cache -------------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty cache for `batch_size` rows of up to `max_length` positions (prompt + new
        tokens).

        transformers' tree (`h/<i>/self_attention/{cached_key, cached_value, cache_index}`, keys and
        values [B, max_length, H, D] in the computation dtype); with scan_layers the layers come
        stacked in one `h/self_attention`. Built from the config alone: no forward pass.
        """
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"init_cache: {name} must be a positive int, got {value!r}")
        layout = (self.dtype, self.scan_layers, self.is_head)
        cache = modules.make_cache(self.config, batch_size, max_length, *layout)
        if self.mesh is None:
            return cache
        return sharding.place(cache, self.mesh, sharding.CACHE_RULES)

    # -- forward -----------------------------------------------------------------------------------

    # Over 40 lines: transformers' Flax __call__ signature; the body maps its arguments to apply().
    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        past_key_values: Mapping | None = None,
        params: Mapping | None = None,
        dropout_rng: jax.Array | None = None,
        train: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ):
        config = self.config
        output_attentions = (
            config.output_attentions if output_attentions is None else output_attentions
        )
        output_hidden_states = (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = config.return_dict if return_dict is None else return_dict

        input_ids = checks.check_input_ids(input_ids, config.vocab_size)
        batch_size, length = input_ids.shape
        cache, cache_info = None, None
        if past_key_values is not None:
            prefix = self.base_model_prefix if self.is_head else None
            cache = _to_dict(past_key_values)
            cache_info = checks.check_cache(cache, config, prefix, batch_size, length)
            if cache_info.stacked != self.scan_layers:
                cache = _restack(cache, config.n_layer, self.scan_layers)
        attention_mask = checks.check_attention_mask(attention_mask, batch_size, length, cache_info)
        if self.mesh is not None:  # rows over the mesh's "data" axis
            rows = sharding.batch_sharding(self.mesh, batch_size)
            input_ids, attention_mask = jax.device_put((input_ids, attention_mask), rows)
        rngs = {}
        if train and dropout_rng is None and _has_dropout(config):
            raise ValueError(
                "train=True applies dropout and needs dropout_rng=jax.random.PRNGKey(...)"
            )
        if dropout_rng is not None:
            rngs["dropout"] = dropout_rng

        flags = (not train, bool(output_attentions), bool(output_hidden_states))
        outputs = self._forward(
            self._checked_call_params(params), cache, input_ids, attention_mask, rngs, *flags
        )
        if (
            cache_info is not None and cache_info.stacked != self.scan_layers
        ):  # give it back as it came
            new_cache = _restack(outputs.past_key_values, config.n_layer, cache_info.stacked)
            outputs = outputs.replace(past_key_values=new_cache)
        return outputs if return_dict else outputs.to_tuple()

    @property
    def _forward(self):
        """The module's apply under jax.jit, shared by every model with the same module settings."""
        return _jitted_forward(modules.module_key(self.module), self.mesh)

    def _checked_call_params(self, params: Mapping | None) -> Mapping:
        if params is None:
            return self.params
        params = _to_dict(params)
        if self.scan_layers != weights.is_stacked(params):
            return self._checked_params(params)  # the other layer layout: converted (with a copy)
        return params

    # -- files -------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        params: Mapping | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write `config.json` and `flax_model.msgpack` (or shards + index) as transformers' Flax
        does.

        The tree is always transformers' (scanned layers are unstacked), so transformers can read
        it. One commit (`bloomlm.files.folder_save`): the folder holds the old model until every new
        file is written and synced, then the new one; files the model does not write are kept.
        """
        from bloomlm.files import parse_size

        if push_to_hub:
            raise ValueError(
                "push_to_hub is not supported; save to a folder and upload it with huggingface_hub"
            )
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained needs a directory, but {folder} is a file")
        params = jax.device_get(_to_dict(self.params if params is None else params))
        if weights.is_stacked(params):
            params = weights.unstack_layers(params, self.config.n_layer)
        flat = {path: np.asarray(array) for path, array in flatten_dict(params, sep="/").items()}
        config = BloomConfig.from_dict(self.config.to_dict())
        config.architectures = [type(self).__name__.removeprefix("Flax")]
        extra = {CONFIG_NAME: config.to_json_string().encode()}
        files.write_msgpack(folder, flat, parse_size(max_shard_size), extra)

    # Over 40 lines because its signature names each of transformers' Flax loading keywords.
    @classmethod
    @bloomlm_files.consistent_load  # a save committing meanwhile makes it read the folder again
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: BloomConfig | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        from_pt: bool = False,
        _do_init: bool = True,
        scan_layers: bool = False,
        input_shape: tuple[int, int] = (1, 1),
        seed: int = 0,
        ignore_mismatched_sizes: bool = False,
        output_loading_info: bool = False,
        mesh: jax.sharding.Mesh | None = None,
        **kwargs: Any,
    ):
        """Load a model folder (or hub name): `flax_model.msgpack` (or its shards), else PyTorch
        weights.

        PyTorch weights (`model.safetensors`, `pytorch_model.bin`, sharded or not) are converted in
        memory; a folder with no msgpack converts them as `from_pt=True` would, and says so once in
        the log. Parameters keep the checkpoint's dtype unless `param_dtype` is given; `dtype` is
        the computation dtype. Keywords naming config fields (`num_labels=3`, ...) override
        config.json. With `_do_init=False` returns `(model, params)`, as transformers does. With a
        `mesh` (axes "data" and "model"), parameters are sharded by `bloomlm.flax.sharding`'s rules,
        each device's part read alone from safetensors files.
        """
        from bloomlm.hub import HUB_KEYWORDS, resolve_model_dir

        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments")
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KEYWORDS}
        use_safetensors = kwargs.pop("use_safetensors", None)
        for key in _IGNORED_LOADING_KEYWORDS:
            kwargs.pop(key, None)
        wanted = [CONFIG_NAME, *FLAX_WEIGHT_FILES, *PYTORCH_WEIGHT_FILES]
        folder = resolve_model_dir(pretrained_model_name_or_path, wanted, **hub_kwargs)
        config = load_model_config(folder, config, kwargs, caller=f"{cls.__name__}.from_pretrained")
        layout = dict(param_dtype=param_dtype or jnp.float32, scan_layers=scan_layers)
        model = cls(config, input_shape, seed, dtype, _do_init=False, **layout)
        if mesh is not None:
            sharding.check_mesh(mesh, config)
            model.mesh = mesh
        state = model._checkpoint_state(folder, from_pt, use_safetensors)
        params, info = model._fit_checkpoint(
            state, ignore_mismatched_sizes, str(pretrained_model_name_or_path)
        )
        params = model._as_model_params(params, param_dtype)
        attach_generation_config(model, folder)
        if not _do_init:
            return (model, params, info) if output_loading_info else (model, params)
        model._params = params
        return (model, info) if output_loading_info else model

    def _checkpoint_state(self, folder: Path, from_pt: bool, use_safetensors: bool | None) -> dict:
        """The checkpoint's leaves by (unstacked) path: arrays, or on a mesh, when the weights are
        PyTorch safetensors, `sharding.CheckpointSlice`s each device reads its part of."""
        expected = set(self._flat_expected_shapes())
        has_flax = any((folder / name).is_file() for name in FLAX_WEIGHT_FILES)
        if self.mesh is None or (has_flax and not from_pt):
            return files.read_weights(folder, self.config, expected, from_pt, use_safetensors)
        return sharding.read_weight_slices(
            folder, self.config, expected, use_safetensors, files.UNUSED_PYTORCH
        )

    def _as_model_params(self, params: dict, param_dtype: Any) -> dict:
        """Checkpoint arrays (transformers' layout, NumPy) as this model's parameters: cast to
        `param_dtype` when given, layers stacked for scan_layers, on the device (the mesh)."""
        if self.mesh is not None:
            n_layer, flat = self.config.n_layer, flatten_dict(params)
            return sharding.make_sharded_params(
                flat, self.mesh, n_layer, self.scan_layers, param_dtype
            )
        if param_dtype is not None:
            params = jax.tree_util.tree_map(
                lambda a: a.astype(param_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                params,
            )
        if self.scan_layers:
            params = weights.stack_layers(params, self.config.n_layer)
        return jax.tree_util.tree_map(jnp.asarray, params)

    def _flat_expected_shapes(self) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
        """{path: shape} in transformers' (unstacked) layout."""
        tree = self._shape_tree
        if self.scan_layers:
            tree = weights.unstack_layers(
                tree, self.config.n_layer, lambda x, i: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
            )
        return flatten_dict(tree)

    def _fit_checkpoint(
        self, state: dict, ignore_mismatched_sizes: bool, source: str
    ) -> tuple[dict, dict]:
        """Checkpoint leaves -> this model's tree; a missing task head and (with
        `ignore_mismatched_sizes`) leaves of another shape are initialised, unused leaves dropped;
        a missing trunk leaf is an error. Reported as transformers does (`bloomlm.load_report`)."""
        expected = self._flat_expected_shapes()
        name = type(self).__name__
        missing = [p for p in expected if p not in state]
        load_report.check_needed_weights(_joined(missing), name, source, sep="/")
        unexpected = [p for p in state if p not in expected]
        mismatched = []
        for path in [p for p in state if p in expected]:
            got, want = tuple(state[path].shape), tuple(expected[path].shape)
            if got != want:
                if not ignore_mismatched_sizes:
                    raise CheckpointError(
                        f"checkpoint weight {'/'.join(path)} has shape {got} but the model built "
                        f"from config.json expects {want}; check the config (vocab_size, "
                        "hidden_size, n_head, num_labels) or pass ignore_mismatched_sizes=True"
                    )
                mismatched.append(("/".join(path), got, want))
        load_report.report_loading(name, source, _joined(missing), _joined(unexpected), mismatched)
        missing += [tuple(key.split("/")) for key, _, _ in mismatched]
        params = {p: a for p, a in state.items() if p in expected and p not in missing}
        if missing:
            seed = int(jax.random.randint(self.key, (), 0, 2**31 - 1))
            shapes = unflatten_dict({p: expected[p] for p in missing})
            fresh = _initial_params(shapes, self.config.initializer_range, seed)
            params.update(flatten_dict(fresh))
        info = {"missing_keys": _joined(missing), "unexpected_keys": _joined(unexpected)}
        info["mismatched_keys"] = mismatched
        return unflatten_dict(params), info


class FlaxBloomModel(FlaxBloomPreTrainedModel):
    """The bare BLOOM body: `last_hidden_state` [B, T, C] (after `ln_f`)."""

    module_class = modules.FlaxBloomModule


class FlaxBloomForCausalLM(GenerationConfigMixin, FlaxBloomPreTrainedModel):
    """BLOOM with its language-model head (tied to the input embeddings): `logits` [B, T, V]."""

    module_class = modules.FlaxBloomForCausalLMModule

    def prepare_inputs_for_generation(
        self, input_ids, max_length: int, attention_mask=None
    ) -> dict:
        """transformers' hook: an empty cache and the full `max_length` mask (ones after the
        prompt)."""
        batch_size, length = input_ids.shape
        mask = jnp.ones((batch_size, max_length), jnp.int32)
        if attention_mask is not None:
            mask = mask.at[:, :length].set(jnp.asarray(attention_mask, jnp.int32))
        return {"past_key_values": self.init_cache(batch_size, max_length), "attention_mask": mask}

    def update_inputs_for_generation(self, model_outputs, model_kwargs: dict) -> dict:
        model_kwargs["past_key_values"] = model_outputs.past_key_values
        return model_kwargs

    def generate(self, input_ids, attention_mask=None, **kwargs: Any):
        """Greedy, sampling or beam search, compiled with jax.jit end to end;
        see bloomlm.flax.generate."""
        from bloomlm.flax.generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)


class FlaxBloomForSequenceClassification(FlaxBloomPreTrainedModel):
    """`score` on the last non-padding token of each row: `logits` [B, num_labels]."""

    module_class = modules.FlaxBloomForSequenceClassificationModule


class FlaxBloomForTokenClassification(FlaxBloomPreTrainedModel):
    """Dropout + `classifier` on every token: `logits` [B, T, num_labels]."""

    module_class = modules.FlaxBloomForTokenClassificationModule


class FlaxBloomForQuestionAnswering(FlaxBloomPreTrainedModel):
    """`qa_outputs` on every token: `start_logits`, `end_logits` [B, T]."""

    module_class = modules.FlaxBloomForQuestionAnsweringModule


# -- helpers ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _jitted_forward(key: tuple, mesh: jax.sharding.Mesh | None = None):
    """The module's apply under jax.jit, one per `module_key` (its module shared with generate)
    and mesh (the returned cache keeps the mesh's head and row split)."""
    module = modules.module_for_key(key)

    def forward(
        params,
        cache,
        input_ids,
        attention_mask,
        rngs,
        deterministic,
        output_attentions,
        hidden_states,
    ):
        variables = {"params": params}
        args = (input_ids, attention_mask, deterministic, output_attentions, hidden_states)
        if cache is None:
            return module.apply(variables, *args, rngs=rngs)
        outputs, mutated = module.apply(
            {**variables, "cache": cache}, *args, rngs=rngs, mutable=["cache"]
        )
        cache = sharding.constrain_cache(_to_dict(mutated["cache"]), mesh)
        return outputs.replace(past_key_values=cache)

    # Eager calls would compile op by op; under a user's own jit this inner jit is simply inlined.
    return jax.jit(forward, static_argnums=(5, 6, 7))


def _as_dtype(dtype: Any, name: str) -> Any:
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.removeprefix("jnp."), dtype)
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved not in {jnp.dtype(d) for d in _DTYPES.values()}:
        raise ValueError(
            f"{name} must be one of jnp.float32, jnp.bfloat16, jnp.float16, got {dtype!r}"
        )
    return resolved.type


def _to_dict(tree: Any) -> Any:
    """Plain nested dicts (FrozenDicts and other mappings unfrozen), leaves untouched."""
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _joined(paths: list[tuple[str, ...]]) -> list[str]:
    return sorted("/".join(path) for path in paths)


def _has_dropout(config: BloomConfig) -> bool:
    rates = (config.hidden_dropout, config.attention_dropout, config.classifier_dropout or 0.0)
    return any(rate > 0 for rate in rates)


def _restack(tree: dict, n_layer: int, to_stacked: bool) -> dict:
    if to_stacked:
        return weights.stack_layers(tree, n_layer, jnp.stack)
    return weights.unstack_layers(tree, n_layer)


def _initial_params(shape_tree: Any, std: float, seed: int) -> dict:
    """transformers' initial values for a tree of shapes: normal(std) for kernels and embeddings,
    zero biases, unit LayerNorm scales. Drawn with NumPy: no per-shape compilation."""
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = path[-1].key
        if name in ("kernel", "embedding"):
            value = rng.standard_normal(leaf.shape, dtype=np.float32) * np.float32(std)
        elif name == "scale":
            value = np.ones(leaf.shape, np.float32)
        else:
            value = np.zeros(leaf.shape, np.float32)
        return jnp.asarray(value, leaf.dtype)

    return _to_dict(jax.tree_util.tree_map_with_path(make, shape_tree))
