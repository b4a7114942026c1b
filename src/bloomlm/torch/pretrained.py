"""BloomPreTrainedModel: what every PyTorch BLOOM class shares besides the math.

Loading and saving model folders (through `bloomlm.checkpoint`), weight initialisation, embedding
access and resizing, gradient checkpointing, and the forward-call plumbing (flag defaults, head
mask, deprecated arguments, and `_BloomHead`: the heads' trunk call and output), each written once
here instead of once per head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bloomlm import checkpoint, checkpoint_names, files, load_report
from bloomlm.config import CONFIG_NAME, BloomConfig, check_buildable, load_model_config
from bloomlm.errors import CheckpointError
from bloomlm.generation import GENERATION_CONFIG_NAME, attach_generation_config
from bloomlm.hub import HUB_KEYWORDS, resolve_model_dir
from bloomlm.outputs import BaseModelOutputWithPastAndCrossAttentions, ModelOutput
from bloomlm.torch import checks
from bloomlm.torch import quantize as quantization
from bloomlm.torch.hf_compat import PreTrainedModelAPI

# How the heads' parameter names start for the base model's weights ("transformer.").
BASE_PREFIX = checkpoint_names.BASE_PREFIX + "."

# transformers' from_pretrained keywords about placement and memory; accepted, never put in the
# config.
LOADING_KEYWORDS = frozenset(
    {"low_cpu_mem_usage", "offload_folder", "offload_state_dict", "max_memory", "load_in_8bit",
     "load_in_4bit", "quantization_config", "attn_implementation", "from_tf", "from_flax",
     "variant", "adapter_kwargs", "_fast_init", "use_flash_attention_2", "device_map"}
)  # fmt: skip

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

_warned_position_ids = False


class BloomPreTrainedModel(PreTrainedModelAPI, nn.Module):
    base_model_prefix = checkpoint_names.BASE_PREFIX
    _tied_weights_keys: list[str] = []

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.config = check_buildable(config, type(self).__name__)
        self.name_or_path = config.name_or_path
        self.gradient_checkpointing = False

    # -- construction ------------------------------------------------------------------------------

    def post_init(self) -> None:
        """Initialise every weight as transformers does, then tie the LM head to the embeddings.

        A model built on the `meta` device (to be filled from a checkpoint) has no values to
        initialise.
        """
        if not next(self.parameters()).is_meta:
            self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def tie_weights(self) -> None:
        """With `config.tie_word_embeddings`, the LM head uses the input embedding's matrix; after
        quantization that is the one quantized matrix and its per-row scales (`tie_quantized_`)."""
        head = self.get_output_embeddings()
        if head is None or not self.config.tie_word_embeddings:
            return
        if isinstance(head, quantization.QUANTIZED_LINEARS):
            quantization.tie_quantized_(self)
        else:
            head.weight = self.get_input_embeddings().weight

    # -- embeddings --------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.word_embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.base_model.word_embeddings = new_embeddings

    def get_output_embeddings(self) -> nn.Linear | None:
        return None

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None
    ) -> nn.Embedding:
        """Grow or shrink the vocabulary; new rows are initialised, the LM head stays tied."""
        old = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        if isinstance(old, quantization.QuantizedEmbedding):
            raise ValueError("resize_token_embeddings needs a float model; quantize after resizing")
        if getattr(self, "tensor_parallel_mesh", None) is not None:
            raise ValueError(
                "resize_token_embeddings needs a whole model, not one split by tp_plan= / "
                "device_mesh=: resize it in one process, save it, then load it split"
            )
        new_num_tokens = old.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        new = nn.Embedding(
            new_num_tokens, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype
        )
        self._init_weights(new)
        kept = min(old.num_embeddings, new_num_tokens)
        new.weight.data[:kept] = old.weight.data[:kept]
        self.set_input_embeddings(new)
        head = self.get_output_embeddings()
        if head is not None and not self.config.tie_word_embeddings:
            new_head = nn.Linear(old.embedding_dim, new_num_tokens, bias=False,
                                 device=head.weight.device, dtype=head.weight.dtype)  # fmt: skip
            self._init_weights(new_head)
            new_head.weight.data[:kept] = head.weight.data[:kept]
            self.set_output_embeddings(new_head)
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return new

    # -- properties --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Count parameters once each (a tied LM head is the embedding matrix, not a second one)."""
        embedding_ids = set()
        if exclude_embeddings:
            embedding_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel()
            for p in self.parameters()
            if (p.requires_grad or not only_trainable) and id(p) not in embedding_ids
        )

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None
    ) -> None:
        """Recompute each block in the backward pass instead of keeping its activations.

        Always torch's non-reentrant checkpointing: it needs no `enable_input_require_grads()`
        for a frozen trunk, so `use_reentrant` in `gradient_checkpointing_kwargs` is accepted and
        has no effect.
        """
        if gradient_checkpointing_kwargs is not None and not isinstance(
            gradient_checkpointing_kwargs, dict
        ):
            raise TypeError(
                "gradient_checkpointing_kwargs must be a dict or None, got "
                f"{type(gradient_checkpointing_kwargs).__name__}"
            )
        self.base_model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.base_model.gradient_checkpointing

    # -- forward plumbing --------------------------------------------------------------------------

    def _resolve_flags(
        self, use_cache, output_attentions, output_hidden_states, return_dict
    ) -> tuple:
        config = self.config
        return (
            config.use_cache if use_cache is None else use_cache,
            config.output_attentions if output_attentions is None else output_attentions,
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.use_return_dict if return_dict is None else return_dict,
        )

    def _pop_deprecated(self, deprecated_arguments: dict[str, Any]) -> None:
        if deprecated_arguments.pop("position_ids", None) is not None:
            warnings.warn(
                "`position_ids` have no effect in BLOOM "
                "(positions come from ALiBi and the attention mask); you can stop passing them",
                FutureWarning,
                stacklevel=3,
            )
        if deprecated_arguments:
            raise ValueError(
                f"{type(self).__name__}.forward got unexpected arguments "
                f"{sorted(deprecated_arguments)}; allowed: input_ids, past_key_values, "
                "attention_mask, head_mask, inputs_embeds, labels, use_cache, "
                "output_attentions, output_hidden_states, return_dict"
            )

    @staticmethod
    def _warn_position_ids() -> None:
        global _warned_position_ids
        if not _warned_position_ids:
            _warned_position_ids = True
            warnings.warn(
                "`position_ids` have no effect in BLOOM "
                "(positions come from ALiBi and the attention mask); this warning is shown once",
                FutureWarning,
                stacklevel=3,
            )

    def _layer_head_masks(self, head_mask: torch.Tensor | None) -> list[torch.Tensor | None]:
        """One (1, H, 1, 1) multiplier per layer, or None per layer when no head is masked."""
        n_layer, n_head = self.config.n_layer, self.config.n_head
        if head_mask is None:
            return [None] * n_layer
        checks.check_head_mask(head_mask, n_layer, n_head)
        head_mask = head_mask.to(device=self.device, dtype=self.dtype).expand(n_layer, n_head)
        heads = getattr(self, "tensor_parallel_heads", slice(None))  # a rank's heads under TP
        return [layer_mask[heads].view(1, -1, 1, 1) for layer_mask in head_mask]

    # -- saving ------------------------------------------------------------------------------------

    # Over 40 lines: transformers' signature and the one-commit save, read top to bottom.
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        max_shard_size: int | str = "5GB",
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write `config.json` and the weights as transformers 4.37 does (it reads what we write).

        One commit (`bloomlm.files.folder_save`): the folder holds the old model until everything
        new is written and synced, then the new one; the files a model does not write (a
        tokenizer's, your own) are kept.

        A quantized model writes `model.int8.safetensors` / `model.fp16.safetensors` and a
        `quantization` entry in config.json instead: transformers finds no weights it knows there
        (and says so), bloomlm loads them as they are.
        """
        quantized = quantization.quantized_format(self)
        if quantized and not safe_serialization:
            raise ValueError(
                f"a quantized model is saved as safetensors only ({_quantized_name(quantized)}); "
                "drop safe_serialization=False"
            )
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained needs a directory, but {folder} is a file")
        if not is_main_process:
            return
        state_dict = self._state_dict_to_save(state_dict)
        config = self._config_to_save(quantized)
        generation_config = getattr(self, "_generation_config", None)
        if not hasattr(generation_config, "save_pretrained"):
            generation_config = None
        owned = {CONFIG_NAME} | ({GENERATION_CONFIG_NAME} if generation_config else set())

        def owns(name: str) -> bool:
            return name in owned or checkpoint.is_weight_file_name(name)

        with files.folder_save(folder, owns) as staging:
            config.save_pretrained(staging)
            checkpoint.save_state_dict(
                state_dict,
                staging,
                safe_serialization=safe_serialization,
                max_shard_size=max_shard_size,
                weights_name=_quantized_name(quantized) if quantized else None,
            )
            if generation_config is not None:
                generation_config.save_pretrained(staging)

    def _state_dict_to_save(self, state_dict: dict[str, torch.Tensor] | None) -> dict:
        if state_dict is None and getattr(self, "tensor_parallel_mesh", None) is not None:
            raise ValueError(
                "this model is split over the ranks (tp_plan= / device_mesh=): gather it on "
                "every rank with bloomlm.torch.tensor_parallel.full_state_dict(model) and pass "
                "save_pretrained(..., state_dict=that, is_main_process=rank == 0)"
            )
        state_dict = self.state_dict() if state_dict is None else state_dict
        if self.config.tie_word_embeddings:
            # The tied head is the embedding matrix: store it once, as transformers does.
            for key in self._tied_weights_keys:
                state_dict.pop(key, None)
                state_dict.pop(key.removesuffix("weight") + "weight_scale", None)
        return state_dict

    def _config_to_save(self, quantized: str | None) -> BloomConfig:
        """The config as saved: this class as the architecture, the weights' dtype, and the
        quantized format when there is one."""
        config_dict = self.config.to_dict()
        config_dict.pop("quantization", None)
        if quantized:
            config_dict["quantization"] = {
                "format": quantized,
                "weights": _quantized_name(quantized),
            }
        config = BloomConfig.from_dict(config_dict)
        config.architectures = [type(self).__name__]
        config.torch_dtype = str(self.dtype).removeprefix("torch.")
        return config

    # -- loading -----------------------------------------------------------------------------------

    # Over 40 lines because it takes transformers' many loading keywords, each by name.
    @classmethod
    @files.consistent_load  # a save committing meanwhile makes it read the folder again
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs: Any
    ):
        """Load a model folder (or hub name) written by transformers or bloomlm.

        Built on the `meta` device, then the checkpoint's tensors are assigned to it: no random
        weights first, and memory-mapped safetensors stay mapped (one copy in memory). Keywords
        that name config fields override them (`num_labels=3`, `problem_type=...`).
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments")
        config, torch_dtype = kwargs.pop("config", None), kwargs.pop("torch_dtype", None)
        output_loading_info = kwargs.pop("output_loading_info", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        state_dict = kwargs.pop("state_dict", None)
        quantize = kwargs.pop("quantize", None)
        from_flax = kwargs.pop("from_flax", False)
        quantization.check_quantize(quantize)
        engine = _engine_options(kwargs)  # compile=, attn_implementation=
        device = _device_from_map(kwargs.get("device_map"))
        mesh = _tensor_parallel_mesh(kwargs, quantize, state_dict, device)  # tp_plan, device_mesh
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KEYWORDS}
        for key in LOADING_KEYWORDS:
            kwargs.pop(key, None)

        folder, state_dict = _locate_checkpoint(
            cls.__name__, pretrained_model_name_or_path, config, state_dict, from_flax, hub_kwargs
        )
        config = load_model_config(folder, config, kwargs, caller=f"{cls.__name__}.from_pretrained")
        dtype = _resolve_dtype(torch_dtype, config)
        saved = _saved_quantization(config, folder)
        mode = _load_mode(quantize, saved, device)

        with torch.device("meta"), _SkipInitOnMeta():
            model = cls(config)
        if mesh is not None:
            from bloomlm.torch import tensor_parallel  # torch.distributed only when asked for

            _check_split_load(folder, engine[0], saved if mode else None)
            info = tensor_parallel.load(model, folder, dtype, mesh, use_safetensors)
        else:
            source = str(pretrained_model_name_or_path)
            tensors = _checkpoint_tensors(
                folder,
                state_dict,
                use_safetensors,
                stream=_converts(mode, saved, dtype, config),
                weights_name=_quantized_name(saved) if saved else None,
            )
            info = model._load_weights(
                tensors, dtype, mode, device, ignore_mismatched_sizes, source
            )
        model.eval()
        _apply_engine_options(model, *engine)
        if folder is not None:
            attach_generation_config(model, folder)
        return (model, info) if output_loading_info else model

    def _load_weights(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        dtype: torch.dtype,
        mode: str | None,
        device: torch.device | None,
        ignore_mismatched_sizes: bool,
        source: str,
    ) -> dict[str, list]:
        """Fill this meta-device model from `tensors` in one process: quantized slots first when
        `mode` asks for them (each float weight is quantized as it is read), fbgemm's packing on
        CPU, then the move to `device`. The loading report, as transformers gives it."""
        if mode:
            quantization.quantize_(self, mode, dtype, pack=False)
        pack = bool(mode) and (device is None or device.type == "cpu")  # fbgemm's layout: CPU only
        info = self._assign_checkpoint(tensors, dtype, ignore_mismatched_sizes, pack, source=source)
        if pack:
            quantization.pack_quantized_(self)
        if device is not None:
            self.to(device)
        return info

    # Over 40 lines: transformers' loading report (missing, resized, unexpected) in its order.
    def _assign_checkpoint(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        dtype: torch.dtype,
        ignore_mismatched_sizes: bool,
        pack: bool = False,
        *,
        source: str = "the given state_dict",
    ) -> dict[str, list]:
        """Move checkpoint tensors into this meta-device model; initialise a missing task head
        (a missing trunk weight is an error, see `bloomlm.load_report`) and report as transformers.

        An int8 slot (a quantized model) takes a float tensor quantized on arrival, and an int8 one
        (a quantized checkpoint) as it is; with streamed `tensors` (checkpoint.iter_state_dict)
        that happens block by block, so memory never holds a whole float weight, and a dtype
        conversion likewise never holds the float checkpoint. With `pack`, each quantized layer is
        packed for fbgemm as soon as its weights are in (quantize.PackOnArrival).
        """
        expected = dict(nn.Module.state_dict(self, keep_vars=True))  # the tied head included
        is_head = self.base_model is not self
        assigned, packed, unexpected, mismatched = self._take_tensors(
            tensors, expected, dtype, ignore_mismatched_sizes, pack
        )
        tied = self._tied_keys(expected)
        mismatched_keys = [checkpoint_names.fit_base_prefix(m[0], is_head) for m in mismatched]
        # Re-initialised for their shape, not missing (transformers lists them apart).
        resized = {*mismatched_keys, *(k + "_scale" for k in mismatched_keys)}
        skipped = tied | resized | packed
        missing = [k for k in expected if k not in assigned and k not in skipped]
        missing_keys = [
            k
            for k in missing
            if not (k.endswith(".weight_scale") and k.removesuffix("_scale") in missing)
        ]
        name = type(self).__name__
        load_report.check_needed_weights(missing_keys, name, source)  # before any allocation
        self._materialise([k for k in missing if not k.endswith(".weight_scale")], dtype)
        self._materialise(mismatched_keys, dtype)
        self.tie_weights()
        is_saved_class = name in (self.config.architectures or [])
        shapes = [(key, torch.Size(got), torch.Size(want)) for key, got, want in mismatched]
        load_report.report_loading(
            name, source, missing_keys, unexpected, shapes, warn_unexpected=is_saved_class
        )
        return {
            "missing_keys": missing_keys,
            "unexpected_keys": unexpected,
            "mismatched_keys": mismatched,
            "error_msgs": [],
        }

    def _take_tensors(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        expected: dict[str, torch.Tensor],
        dtype: torch.dtype,
        ignore_mismatched_sizes: bool,
        pack: bool,
    ) -> tuple[dict[str, torch.Tensor], set[str], list[str], list[tuple]]:
        """Assign each checkpoint tensor that fits its slot (converted, quantized or packed on
        arrival); (assigned, packed, unexpected checkpoint keys, mismatched (key, got, want))."""
        quantized_slots = {
            f"{name}.{buffer}"
            for name, _ in quantization.quantized_modules(self)
            for buffer in ("weight", "weight_scale")
        }
        is_head = self.base_model is not self
        assigned: dict[str, torch.Tensor] = {}
        packed: set[str] = set()
        unexpected, mismatched = [], []  # leaving `with`: waits for the layers still packing
        with quantization.PackOnArrival(self) if pack else contextlib.nullcontext() as packer:
            for ckpt_key, tensor in tensors:
                key = checkpoint_names.fit_base_prefix(ckpt_key, is_head)
                if key not in expected:
                    unexpected.append(ckpt_key)
                elif tuple(tensor.shape) != tuple(expected[key].shape):
                    shapes = (tuple(tensor.shape), tuple(expected[key].shape))
                    if not ignore_mismatched_sizes:
                        raise _shape_error(ckpt_key, key, *shapes)
                    mismatched.append((ckpt_key, *shapes))
                else:
                    slot_dtype = expected[key].dtype
                    target = slot_dtype if key in quantized_slots else dtype
                    converted = _converted(ckpt_key, key, tensor, slot_dtype, target)
                    for name, value in converted.items():
                        if packer is not None and packer.take(name, value):
                            packed.add(name)
                        else:
                            assigned[name] = value
        self.load_state_dict(assigned, strict=False, assign=True)
        return assigned, packed, unexpected, mismatched

    def _tied_keys(self, expected: dict[str, torch.Tensor]) -> set[str]:
        if not self.config.tie_word_embeddings:
            return set()
        tied = set(self._tied_weights_keys)
        return tied | {k + "_scale" for k in tied if k + "_scale" in expected}

    def _materialise(self, names: list[str], dtype: torch.dtype) -> None:
        """Give each still-`meta` parameter real memory and transformers' initial values."""
        std = self.config.initializer_range
        for name in names:
            module_name, _, param_name = name.rpartition(".")
            module = self.get_submodule(module_name)
            old = getattr(module, param_name)
            tensor = torch.empty(old.shape, dtype=dtype)
            if param_name == "bias":
                tensor.zero_()
            elif isinstance(module, nn.LayerNorm):
                tensor.fill_(1.0)
            else:
                tensor.normal_(mean=0.0, std=std)
            if isinstance(module, _QUANTIZED) and param_name == "weight":
                quantization.materialise_(module, tensor)  # initialised in float, then quantized
            else:
                setattr(module, param_name, nn.Parameter(tensor, requires_grad=old.requires_grad))


class _BloomHead(BloomPreTrainedModel):
    """What the task heads of `model.py` share: the trunk (`self.transformer`, a BloomModel) run
    with the arguments in order, and the output built from it.

    Each head's `forward` keeps transformers' positional signature (users call it positionally) and
    says only what differs: its layer on the last hidden state, its loss, its output type.
    """

    def _run_trunk(
        self,
        input_ids: torch.Tensor | None,
        past_key_values: Any,
        attention_mask: torch.Tensor | None,
        head_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        use_cache: bool | None,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
        return_dict: bool | None,
        deprecated_arguments: dict[str, Any],
    ) -> tuple[BaseModelOutputWithPastAndCrossAttentions, bool]:
        """The trunk's output (always the dataclass) and whether the head returns one."""
        self._pop_deprecated(deprecated_arguments)
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        base = self.transformer(
            input_ids, past_key_values, attention_mask, head_mask, inputs_embeds,
            use_cache, output_attentions, output_hidden_states, return_dict=True,
        )  # fmt: skip
        return base, return_dict

    @staticmethod
    def _output(
        output_type: type[ModelOutput],
        base: BaseModelOutputWithPastAndCrossAttentions,
        return_dict: bool,
        **head_fields: Any,
    ) -> ModelOutput | tuple:
        """`output_type(**head_fields)` plus the trunk's cache, hidden states and attentions where
        the type has those fields; a tuple of the fields that are set unless `return_dict`."""
        names = {field.name for field in dataclasses.fields(output_type)}
        shared = ("past_key_values", "hidden_states", "attentions")
        output = output_type(**head_fields, **{k: getattr(base, k) for k in shared if k in names})
        return output if return_dict else output.to_tuple()


class _SkipInitOnMeta(TorchFunctionMode):
    """While active, in this thread only, `torch.nn.init`'s functions leave meta tensors untouched.

    A model built on the meta device to be filled from a checkpoint has no values to initialise, yet
    nn.init on a meta tensor still routes through torch's reference implementations, whose first use
    imports the compiler stack: ~1.5 s and ~70 MB of a cold load, for values never kept. torch keeps
    function modes per thread (as it does `with torch.device(...)`), so nothing global is patched:
    another thread initialising a model meanwhile gets its random weights.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT_FUNCTIONS:
            tensor = kwargs.get("tensor", args[0] if args else None)  # nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


_INIT_FUNCTIONS = frozenset(
    getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and name[0] != "_"
)


def _shape_error(ckpt_key: str, key: str, got: tuple, want: tuple) -> CheckpointError:
    return CheckpointError(
        f"checkpoint weight {ckpt_key} has shape {got} but the model built from config.json "
        f"expects {want} for {key}; check the config (vocab_size, hidden_size, n_head, "
        "num_labels) or pass ignore_mismatched_sizes=True"
    )


def _checkpoint_tensors(
    folder: Path,
    state_dict: dict[str, torch.Tensor] | None,
    use_safetensors: bool | None,
    stream: bool,
    weights_name: str | None = None,
) -> Iterable[tuple[str, torch.Tensor | checkpoint.StreamedTensor]]:
    """(name, tensor) pairs to load: the caller's `state_dict`, else the folder's checkpoint
    (`weights_name`: a quantized one). When the loader converts (quantizes or casts), `stream`
    reads it tensor by tensor, so the stored float tensors are never all in memory beside the
    result."""
    if state_dict is not None:
        return state_dict.items()
    names = {"use_safetensors": use_safetensors, "weights_name": weights_name}
    if stream:
        return checkpoint.iter_state_dict(folder, **names)
    return checkpoint.load_state_dict(folder, **names).items()


def _converts(mode: str | None, saved: str | None, dtype: torch.dtype, config: Any) -> bool:
    """Whether loading changes the stored tensors: a cast, quantizing, or packing for fbgemm.
    Such a load streams the file (`_checkpoint_tensors`); any other maps it and uses the mapped
    tensors as they are, but for int8 ones off 16-byte boundaries (`_converted`): a saved int8
    folder loaded weight-only takes 0.15 s instead of 0.45 s for the 560m, which is what lets
    `bloomlm generate` on it start as fast as on float32."""
    if dtype != _DTYPES.get(str(config.torch_dtype), torch.float32):
        return True
    if mode is None:
        return False
    packs = mode != "int8-weight-only" and quantization.fbgemm_available()
    return saved is None or saved != quantization.SAVED_FORMATS[mode] or packs


def _converted(
    ckpt_key: str,
    key: str,
    tensor: torch.Tensor | checkpoint.StreamedTensor,
    slot_dtype: torch.dtype,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """{model name: tensor} for one checkpoint tensor bound for a slot of `slot_dtype`: a float
    tensor quantized (weight and scale) into an int8 slot, else floats cast to `dtype`; streamed
    ones by blocks. An int8 tensor fits an int8 slot only."""
    if slot_dtype == torch.int8 and tensor.is_floating_point():
        weight, scale = _quantize_blocks(tensor)
        return {key: weight, key + "_scale": scale}
    if tensor.dtype == torch.int8 and slot_dtype != torch.int8:
        raise CheckpointError(
            f"checkpoint weight {ckpt_key} is int8 (a quantized checkpoint) but {key} is a "
            f"{slot_dtype} slot; load int8 checkpoints with quantize='int8' or 'int8-weight-only'"
        )
    target = dtype if tensor.is_floating_point() else tensor.dtype
    if isinstance(tensor, checkpoint.StreamedTensor):
        return {key: _read_blocks(tensor, target)}
    out = tensor.to(target)
    if out.dtype == torch.int8 and out.data_ptr() % 16:
        # Mapped from a file whose data offsets are 8-byte aligned at best; torch 2.13's AVX-512
        # int8 kernels crash below 16 bytes (measured: offsets 1 and 8 crash, 16/32/48 run).
        out = out.clone()
    return {key: out}


def _read_blocks(tensor: checkpoint.StreamedTensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(tensor.shape, dtype=dtype)
    for start, block in checkpoint.row_blocks(tensor):
        if out.dim() == 0:
            out.copy_(block)
        else:
            out[start : start + block.shape[0]] = block
    return out


def _quantize_blocks(
    tensor: torch.Tensor | checkpoint.StreamedTensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    quantized = torch.empty(tensor.shape, dtype=torch.int8)
    scale = torch.empty(tensor.shape[0], dtype=torch.float32)
    for start, block in checkpoint.row_blocks(tensor):
        rows = slice(start, start + len(block))
        quantized[rows], scale[rows] = quantization.quantize_rows(block)
    return quantized, scale


def _locate_checkpoint(
    class_name: str,
    name: str | os.PathLike | None,
    config: Any,
    state_dict: dict[str, torch.Tensor] | None,
    from_flax: bool,
    hub_kwargs: dict[str, Any],
) -> tuple[Path | None, dict[str, torch.Tensor] | None]:
    """(the model folder, the state dict to load instead of its files): `name` resolved (a hub
    name downloaded), None for transformers' `from_pretrained(None, config=, state_dict=)`, and a
    folder's Flax weights as a state dict for `from_flax=True`."""
    flax_files = checkpoint_names.FLAX_WEIGHT_FILES
    torch_files = checkpoint_names.PYTORCH_WEIGHT_FILES + checkpoint_names.QUANTIZED_WEIGHT_FILES
    wanted = [CONFIG_NAME, *(flax_files if from_flax else torch_files)]
    folder = None
    if name is not None:
        folder = resolve_model_dir(name, wanted, **hub_kwargs)
    elif config is None or state_dict is None:
        raise ValueError(f"{class_name}.from_pretrained(None) needs config= and state_dict=")
    if from_flax and state_dict is None:  # transformers' keyword: the folder's Flax weights
        from bloomlm.torch.from_flax import flax_state_dict

        state_dict = flax_state_dict(folder)
    return folder, state_dict


def _check_split_load(folder: Path | None, compile: bool | str, quantized: str | None) -> None:
    """What tensor parallelism cannot load: a compiled step, a quantized checkpoint."""
    if compile:
        raise ValueError("compile= cannot be combined with tp_plan= or device_mesh=")
    if quantized:  # quantize= itself is refused earlier; this is a quantized checkpoint
        raise ValueError(
            f"{folder} holds quantized weights ({quantized}); tensor parallelism splits float "
            "weights: load the float checkpoint with tp_plan= or device_mesh="
        )


def _tensor_parallel_mesh(
    kwargs: dict[str, Any], quantize: str | None, state_dict: Any, device: Any
) -> Any:
    """Pop `tp_plan` / `device_mesh`; the mesh to split the model over, or None (one process)."""
    tp_plan, device_mesh = kwargs.pop("tp_plan", None), kwargs.pop("device_mesh", None)
    if tp_plan is None and device_mesh is None:
        return None
    for name, value in (("quantize", quantize), ("state_dict", state_dict), ("device_map", device)):
        if value is not None:
            raise ValueError(f"{name}= cannot be combined with tp_plan= or device_mesh=")
    from bloomlm.torch.tensor_parallel import resolve_mesh

    return resolve_mesh(tp_plan, device_mesh)


def _engine_options(kwargs: dict[str, Any]) -> tuple[bool | str, str | None]:
    """Pop and check `compile` (the decode step compiled: True or a torch.compile mode) and
    `attn_implementation` ("eager" or "sdpa"; default: chosen per call, see model.py)."""
    compile = kwargs.pop("compile", False)
    if not isinstance(compile, (bool, str)):
        raise ValueError(f"compile must be True, False or a torch.compile mode, got {compile!r}")
    attn_implementation = kwargs.pop("attn_implementation", None)
    if attn_implementation not in (None, "eager", "sdpa"):
        raise ValueError(
            f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}"
        )
    return compile, attn_implementation


def _apply_engine_options(
    model: nn.Module, compile: bool | str, attn_implementation: str | None
) -> None:
    if attn_implementation is not None:
        model.config._attn_implementation = attn_implementation  # read per call, never saved
    if compile:
        model.compile_decoding = compile  # BloomForCausalLM.make_decoder's default


def _device_from_map(device_map: Any) -> torch.device | None:
    """transformers' `device_map` reduced to one device: there is only one model shard to place."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"device_map must place the whole model on one device, got {device_map}"
            )
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _resolve_dtype(torch_dtype: Any, config: BloomConfig) -> torch.dtype:
    """None means float32 (transformers' default); "auto" means the config's dtype, else float32."""
    if torch_dtype is None:
        return torch.float32
    if torch_dtype == "auto":
        name = config.torch_dtype or getattr(config, "dtype", None)  # old hub files say "dtype"
        return _DTYPES.get(str(name), torch.float32) if name else torch.float32
    if isinstance(torch_dtype, str):
        if torch_dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(
                f"torch_dtype must be one of {sorted(_DTYPES)} or 'auto', got {torch_dtype!r}"
            )
        return _DTYPES[torch_dtype.removeprefix("torch.")]
    if isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point:
        return torch_dtype
    raise ValueError(
        f"torch_dtype must be a floating torch.dtype, a dtype name or 'auto', got {torch_dtype!r}"
    )


_QUANTIZED = (*quantization.QUANTIZED_LINEARS, quantization.QuantizedEmbedding)


def _quantized_name(saved_format: str) -> str:
    return checkpoint_names.QUANTIZED_WEIGHTS_NAMES[saved_format]


def _saved_quantization(config: BloomConfig, folder: Path) -> str | None:
    """The weight format of a quantized checkpoint ("int8", "fp16") from config.json's
    `quantization` entry (written by save_pretrained); None for a float checkpoint."""
    entry = getattr(config, "quantization", None)
    if entry is None:
        return None
    saved = entry.get("format") if isinstance(entry, dict) else None
    if saved not in checkpoint_names.QUANTIZED_WEIGHTS_NAMES:
        allowed = sorted(checkpoint_names.QUANTIZED_WEIGHTS_NAMES)
        raise CheckpointError(
            f"{folder / CONFIG_NAME} has a 'quantization' entry {entry!r} that bloomlm did not "
            f"write; its 'format' must be one of {allowed}"
        )
    return saved


def _load_mode(quantize: str | None, saved: str | None, device: torch.device | None) -> str | None:
    """The quantize mode to build: the caller's, else the saved checkpoint's; on a device or a
    CPU where fbgemm cannot run "int8", its weight-only kernel."""
    if saved == "int8" and quantize is not None and quantization.SAVED_FORMATS[quantize] != "int8":
        raise ValueError(
            f"this checkpoint holds int8 weights ({_quantized_name(saved)}), which cannot be "
            f"loaded as quantize={quantize!r}; use quantize='int8' or 'int8-weight-only', or "
            "quantize the float checkpoint it came from"
        )
    mode = quantize or (quantization.DEFAULT_MODE[saved] if saved else None)
    return quantization.kernel_mode(mode, device) if mode else None
