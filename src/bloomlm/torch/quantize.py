"""Quantized drop-ins for nn.Linear and nn.Embedding, and the `quantize=` modes that use them.

Applied to a finished model from outside (the model file knows nothing about it), as gpt-fast does:
the model calls `layer(x)` and gets a float tensor back, whatever the layer holds.

    mode               weights                      matmul (CPU with fbgemm)    module
    "int8"             int8, float32 scale per row  int8 x int8 (W8A8), fbgemm  Int8Linear
    "int8-weight-only" the same int8 + scales       activations stay float      Int8WeightOnlyLinear
    "fp16"             float16                      float32 compute, fbgemm     Fp16Linear

Decoding on a CPU reads every weight once per token, so bytes per weight set the speed. W8A8 also
runs the multiply-adds in integers: measured 1.5-4x the weight-only kernel on the 560m shapes.
"int8" falls back to weight-only where fbgemm is missing (ARM, non-x86 builds) and on CUDA.

Weights, both int8 modes (symmetric, per output channel; the scale factors out of each row's dot
product, so rows of very different magnitude keep their own precision):

    w[i, :] ~= weight_scale[i] * q[i, :],  q int8 in [-127, 127],  weight_scale[i] = max|w[i]| / 127

Activations ("int8"): each row of the input is divided by its own absolute maximum before fbgemm
quantizes it with one fixed scale, and the product is multiplied back by the same maximum:

    y[r] = absmax(x[r]) * (quantize(x[r] / absmax(x[r])) @ q.T) * weight_scale + bias

fbgemm's own dynamic linear picks ONE scale for the whole input, so a row's result would depend on
the other rows of the batch; here it never does (`tests/test_quantize.py` checks it bit for bit).
Without AVX512-VNNI fbgemm multiplies uint8 x int8 pairs into a saturating int16, which full 8-bit
activations (255 * 127 * 2) overflow; there the activations use 7 bits (`activation_bits()`).

The tied embedding / LM head (the largest matrix of every BLOOM, 46% of bloom-560m's weights) is
one quantized matrix: the embedding looks rows up in it and scales them back to float; the LM head
packs it for fbgemm. No float copy is kept.

Saved checkpoints (`save_pretrained`) hold `weight` (int8 or float16) and `weight_scale` (float32,
int8 only) per quantized layer, never fbgemm's packed layout, which depends on the CPU. So "int8"
and "fp16" pack at every load: in pieces of rows (fbgemm packs a large matrix far faster in blocks)
on worker threads (`Packer`); measured on the 560m shape, 2 cores: a saved int8 folder loads in
3.8-4.3 s (9.2 s packing whole matrices on one thread), against 0.15 s for "int8-weight-only", which
packs nothing. `bloomlm generate` therefore runs a saved int8 folder weight-only for short runs.
"""

from __future__ import annotations

import collections
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bloomlm.checkpoint_names import QUANTIZE_MODES
from bloomlm.checkpoint_names import QUANTIZED_FORMATS as SAVED_FORMATS

# The mode a saved format loads as when the caller names none.
DEFAULT_MODE = {"int8": "int8", "fp16": "fp16"}


def check_quantize(quantize: str | None) -> None:
    """Raise ValueError unless `quantize` is None or one of QUANTIZE_MODES."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        allowed = ", ".join(repr(m) for m in QUANTIZE_MODES)
        raise ValueError(f"quantize must be None or one of {allowed}; got {quantize!r}")


# -- what the CPU can do ------------------------------------------------------------------------


def fbgemm_available() -> bool:
    """Whether this torch build has fbgemm's quantized linear kernels (x86 builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def activation_bits() -> int:
    """8 where fbgemm's int8 kernel accumulates in int32 (AVX512-VNNI), else 7 (no int16 overflow).

    fbgemm picks its kernel from the CPU's flags unless FBGEMM_ENABLE_INSTRUCTIONS forces one; only
    AVX512-VNNI matters (fbgemm has no AVX-VNNI kernels), so that is what is checked.
    """
    forced = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
    if forced in ("AVX2", "AVX512", "AVX512_256"):
        return 7
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return 8 if capabilities().get("avx512_vnni", False) else 7
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return 8 if "avx512_vnni" in cpuinfo.read().split() else 7
    except OSError:
        return 7


def kernel_mode(quantize: str, device: torch.device | None) -> str:
    """The mode actually run: "int8" becomes "int8-weight-only" where fbgemm cannot serve it."""
    on_cpu = device is None or device.type == "cpu"
    if quantize == "int8" and not (on_cpu and fbgemm_available()):
        return "int8-weight-only"
    return quantize


# -- weights ----------------------------------------------------------------------------------


def quantize_rows(
    weight: torch.Tensor, rows_per_block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 weight, float32 scale per row).

    Done in blocks of rows so the float temporaries stay small: a whole-matrix expression would
    allocate several float copies of the largest matrix, which the allocator then keeps.
    """
    quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    if weight.is_meta:  # a model being prepared for loading: only the shapes matter
        return quantized, scale
    for start in range(0, weight.shape[0], rows_per_block):
        block = weight[start : start + rows_per_block].to(torch.float32, copy=True)  # never edit
        block_scale = block.abs().amax(dim=1).clamp_(min=1e-12) / 127.0
        scale[start : start + rows_per_block] = block_scale
        quantized[start : start + rows_per_block] = (
            block.div_(block_scale[:, None]).round_().clamp_(-127, 127)
        )
    return quantized, scale


def _per_channel_quantized(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 matrix as the quantized tensor fbgemm's prepack takes (zero points 0).

    Made on the caller's thread: `warnings.catch_warnings` changes process-wide state, so it must
    never run on the packing threads (`Packer`).
    """
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 deprecates creating quantized tensors; fbgemm's prepack takes nothing else.
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor", category=UserWarning)
        return torch._make_per_channel_quantized_tensor(
            weight.contiguous(), scale.double(), zero_points, 0
        )


def _unpack_int8(packed: torch.ScriptObject) -> tuple[torch.Tensor, torch.Tensor]:
    qweight, _ = torch.ops.quantized.linear_unpack(packed)
    return qweight.int_repr(), qweight.q_per_channel_scales().float()


def _rows_per_piece(in_features: int, elements: int) -> int:
    """Rows in a piece of at most `elements` values (at least one row)."""
    return max(1, elements // in_features)


# -- layers ------------------------------------------------------------------------------------


class _QuantizedLinear(nn.Module):
    """What the quantized linears share: shapes, a frozen float bias, and packing for fbgemm.

    `weight` (and `weight_scale`) are buffers, so state_dict/load_state_dict/`to` see them. A
    packed layer hands its weight to fbgemm and drops its own copy, unless the tensor is shared
    (the tied LM head: the embedding keeps it anyway); state_dict then unpacks it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._packed: Any = None  # fbgemm's packed weight(s), once packed

    # The buffers a packed layer hands to fbgemm.
    packed_buffers: tuple[str, ...] = ("weight",)

    @property
    def is_packed(self) -> bool:
        return self._packed is not None

    @property
    def packs(self) -> bool:
        """Whether this layer runs on fbgemm-packed weights (on this machine, on the CPU)."""
        return fbgemm_available()

    @property
    def packable(self) -> bool:
        """Whether there is something to pack now: a layer that packs, its weight loaded on the
        CPU (a model on the meta device, or moved elsewhere, packs nothing)."""
        weight = self.weight
        return self.packs and weight is not None and not weight.is_meta and weight.is_cpu

    def pack_(self, keep_weight: bool = False, scratch: Scratch | None = None) -> None:
        """Prepack the weight for fbgemm; drop this module's reference unless `keep_weight`.
        `scratch` lends float32 memory for the conversion (reused across a model's layers).
        `Packer` does the same for many layers at once, on threads."""
        if self.weight is None or self.weight.is_meta:
            return
        scratch = scratch or Scratch()
        self.install_packed_([self.pack_piece(p, scratch) for p in self.pieces()], keep_weight)

    def pieces(self) -> list[tuple[torch.Tensor, ...]]:
        """The weight in blocks of rows, each packed on its own (`pack_piece`); the outputs of
        the pieces, side by side, are the layer's."""
        raise NotImplementedError

    @staticmethod
    def pack_piece(piece: tuple[torch.Tensor, ...], scratch: Scratch) -> Any:
        """fbgemm's packed form of one piece; touches no module (runs on `Packer`'s threads)."""
        raise NotImplementedError

    def install_packed_(self, packed: list[Any], keep_weight: bool = False) -> None:
        """Take the packed pieces; drop this module's weight reference unless `keep_weight`."""
        self._packed = packed
        if not keep_weight:
            self._drop_weight()

    def _unpacked(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _drop_weight(self) -> None:
        for name in self.packed_buffers:
            setattr(self, name, None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.weight is None and self._packed is not None:
            for name, tensor in self._unpacked().items():
                destination[prefix + name] = tensor
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A packed layer given new weights takes them as tensors, then packs them again.
        names = [prefix + name for name in self.packed_buffers]
        reload = self._packed is not None and any(name in state_dict for name in names)
        keep = self.weight is not None
        if reload and not keep:
            for name, tensor in self._unpacked().items():
                setattr(self, name, tensor)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if reload:
            self._packed = None
            self.pack_(keep_weight=keep)

    def _apply(self, fn, recurse=True):
        if self._packed is not None:
            probe = fn(torch.empty(0))
            if probe.device.type != "cpu":
                raise RuntimeError(
                    f"{type(self).__name__} holds fbgemm-packed weights, which run on the CPU "
                    "only; load the model with device_map='cuda' instead of moving it (int8 then "
                    "runs weight-only)"
                )
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(_QuantizedLinear):
    """nn.Linear as W8A8 through fbgemm: int8 weights, activations quantized per row (see top)."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int | None = None,
    ):
        super().__init__(weight, bias)
        self.register_buffer("weight_scale", weight_scale)
        self.packed_buffers = ("weight", "weight_scale")
        self.bits = activation_bits() if bits is None else bits

    @property
    def bits(self) -> int:
        """Activation bits: 8, or 7 where fbgemm's kernel would overflow (`activation_bits`)."""
        return self._bits

    @bits.setter
    def bits(self, bits: int) -> None:
        if bits not in (7, 8):
            raise ValueError(f"activation bits must be 7 or 8, got {bits!r}")
        # Rows enter in [-1, 1]; this scale maps them onto 1..2**bits - 1 around the zero point.
        levels = 2 ** (bits - 1) - 1
        self._bits, self._input_scale, self._zero_point = bits, 1.0 / levels, levels + 1

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight, scale = quantize_rows(linear.weight.detach())
        return cls(weight, scale, None if linear.bias is None else linear.bias.detach())

    def pieces(self) -> list[tuple[torch.Tensor, ...]]:
        # fbgemm packs a matrix several times faster in blocks than whole (measured on the 560m LM
        # head, 250880 x 1024: 5.1 s whole, 2.0 s in 4 blocks on 2 threads), and each block costs
        # one more kernel call per forward (+0.4 ms per token there). Layers are one block.
        rows = _rows_per_piece(self.in_features, _INT8_PIECE_ELEMENTS)
        return [
            (_per_channel_quantized(weight, scale),)
            for weight, scale in zip(self.weight.split(rows), self.weight_scale.split(rows))
        ]

    @staticmethod
    def pack_piece(piece: tuple[torch.Tensor, ...], scratch: Scratch) -> torch.ScriptObject:
        return torch.ops.quantized.linear_prepack(piece[0], None)

    def _unpacked(self) -> dict[str, torch.Tensor]:
        weights, scales = zip(*(_unpack_int8(piece) for piece in self._packed))
        return {"weight": torch.cat(weights), "weight_scale": torch.cat(scales)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self.pack_()
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        # One scale per row: the row's absolute maximum (1e-30 keeps an all-zero row at zero).
        absmax = flat.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)  # abs+amax: 1 us < norm
        scaled = flat / absmax
        pieces = [
            torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                scaled, self._input_scale, self._zero_point, packed
            )
            for packed in self._packed
        ]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        out = out.mul_(absmax) if self.bias is None else torch.addcmul(self.bias, out, absmax)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 weights, {self.bits}-bit activations per row"


class Int8WeightOnlyLinear(_QuantizedLinear):
    """nn.Linear with an int8 weight and per-row scale; activations stay float (`int8_linear`)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        self.register_buffer("weight_scale", weight_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        weight, scale = quantize_rows(linear.weight.detach())
        return cls(weight, scale, None if linear.bias is None else linear.bias.detach())

    packs = False  # the kernel reads the int8 matrix as it is

    def pack_(self, keep_weight: bool = False, scratch: Scratch | None = None) -> None:
        """Nothing to pack."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_linear(x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 weights, float activations"


class Fp16Linear(_QuantizedLinear):
    """nn.Linear with float16 weights and float32 compute (fbgemm; a float16 matmul without it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp16Linear:
        weight = linear.weight.detach().to(torch.float16)
        return cls(weight, None if linear.bias is None else linear.bias.detach())

    def pack_(self, keep_weight: bool = False, scratch: Scratch | None = None) -> None:
        if self.packable:
            super().pack_(keep_weight, scratch)

    def pieces(self) -> list[tuple[torch.Tensor, ...]]:
        # fbgemm packs from float32: in pieces of rows, each converted in the scratch buffer, so
        # the float32 copy of a large matrix (the 560m LM head: 1 GB) never exists whole and
        # layer after layer reuses the same memory. The bias is added after the matmul.
        rows = _rows_per_piece(self.in_features, _FP16_PIECE_ELEMENTS)
        return [(piece,) for piece in self.weight.split(rows)]

    @staticmethod
    def pack_piece(piece: tuple[torch.Tensor, ...], scratch: Scratch) -> torch.ScriptObject:
        return torch.ops.quantized.linear_prepack_fp16(scratch.float32(piece[0]), None)

    def _unpacked(self) -> dict[str, torch.Tensor]:
        pieces = [torch.ops.quantized.linear_unpack_fp16(p)[0] for p in self._packed]
        return {"weight": torch.cat(pieces).to(torch.float16)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            bias = None if self.bias is None else self.bias.to(self.weight.dtype)
            return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)
        flat = x.reshape(-1, self.in_features).float()
        pieces = [torch.ops.quantized.linear_dynamic_fp16(flat, p) for p in self._packed]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, float16 weights, float32 compute"


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (scale * weight).T for int8 `weight`, returned in x's dtype (the weight-only kernel).

    Few rows (decoding): torch's fused int8-weight kernel, which reads the int8 matrix directly. Its
    bfloat16 variant is the fast one on CPUs (measured ~13x faster than its float32 variant, and ~2x
    faster than a float32 matmul at batch 1), so float32 activations go through it rounded to
    bfloat16, an error well below the int8 weights' own. Many rows (prefill): that kernel is slow
    there (measured 7x slower than a bfloat16 matmul at 128 rows), so the weight is converted to
    bfloat16 once for the call and a regular matmul runs; the scale factors out of each column.
    """
    flat = x.reshape(-1, x.shape[-1])
    on_cpu = flat.device.type == "cpu"
    compute_dtype = torch.bfloat16 if flat.dtype == torch.float32 and on_cpu else flat.dtype
    flat = flat.to(compute_dtype)
    if flat.shape[0] <= _FUSED_KERNEL_MAX_ROWS and on_cpu:  # the fused kernel is CPU's
        out = torch._weight_int8pack_mm(flat.contiguous(), weight, scale.to(compute_dtype))
    else:
        out = F.linear(flat, weight.to(compute_dtype)) * scale.to(compute_dtype)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


_FUSED_KERNEL_MAX_ROWS = 8  # measured crossover: 8 rows favour the fused kernel, 128 the matmul
_FP16_PIECE_ELEMENTS = 2**22  # per fbgemm float16 piece: every bloom-560m layer is one piece
_INT8_PIECE_ELEMENTS = 2**26  # per fbgemm int8 piece: the 560m LM head is 4 (see Int8Linear.pieces)


class Scratch:
    """One float32 buffer, grown as needed, that packing converts weights in."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0)

    def float32(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as float32, in this buffer (valid until the next call)."""
        if self._buffer.numel() < tensor.numel():
            self._buffer = torch.empty(tensor.numel())
        return self._buffer[: tensor.numel()].view(tensor.shape).copy_(tensor)


class QuantizedEmbedding(nn.Module):
    """nn.Embedding over int8 rows with a per-row scale, or float16 rows; looked-up rows come back
    in the model's float dtype. Its matrix doubles as the tied LM head's."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.output_dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(self.output_dtype)
        if self.weight_scale is None:
            return rows
        return rows * self.weight_scale[ids].to(self.output_dtype)[..., None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {str(self.weight.dtype)[6:]} rows"


Int8Embedding = QuantizedEmbedding  # its name before float16 rows existed

QUANTIZED_LINEARS = (Int8Linear, Int8WeightOnlyLinear, Fp16Linear)
_LINEAR_CLASSES = {"int8": Int8Linear, "int8-weight-only": Int8WeightOnlyLinear, "fp16": Fp16Linear}


# -- whole models ------------------------------------------------------------------------------


def quantize_(
    model: nn.Module, mode: str, dtype: torch.dtype | None = None, pack: bool = True
) -> nn.Module:
    """Replace every nn.Linear (and the tied embedding / LM head) with `mode`'s layer, in place.

    `dtype` is the float type the model computes in (default: that of its parameters now). On the
    meta device (a model being prepared for loading) only the shapes are set; `pack_quantized_`
    then packs the loaded weights. The LM head stays tied to the embedding's quantized matrix.
    """
    check_quantize(mode)
    if mode is None:
        raise ValueError("quantize_ needs a mode")
    parameter = next(model.parameters())
    if not parameter.is_meta:
        mode = kernel_mode(mode, parameter.device)
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    _check_quantizable(model)
    embedding = model.get_input_embeddings()
    weight, scale = _quantized_weight(embedding.weight.detach(), mode)
    model.set_input_embeddings(QuantizedEmbedding(weight, scale, dtype))
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and model.get_output_embeddings() is not None:
        model.set_output_embeddings(_make_linear(mode, weight, scale, None))  # the same matrix
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, _LINEAR_CLASSES[mode].from_linear(child))
    if pack and not parameter.is_meta and parameter.device.type == "cpu":
        pack_quantized_(model)
    else:
        tie_quantized_(model)
    return model


def quantize_int8_(
    model: nn.Module, dtype: torch.dtype | None = None, include_embeddings: bool = True
) -> nn.Module:
    """`quantize_(model, "int8", dtype)`; kept for callers of the earlier name."""
    return quantize_(model, "int8", dtype)


def _check_quantizable(model: nn.Module) -> None:
    config = model.config
    if getattr(model, "tensor_parallel_mesh", None) is not None:
        raise ValueError(
            "quantize cannot be combined with tensor parallelism (tp_plan= / device_mesh=): the "
            "split layers are DTensors; load the model in one process to quantize it"
        )
    if config.slow_but_exact and config.pretraining_tp > 1:
        raise ValueError(
            "quantize cannot be combined with slow_but_exact=True and pretraining_tp > 1 (that "
            "path slices float weights); load with slow_but_exact=False to quantize"
        )


def _quantized_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if SAVED_FORMATS[mode] == "fp16":
        return weight.to(torch.float16), None
    return quantize_rows(weight)


def _make_linear(
    mode: str, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> _QuantizedLinear:
    if mode == "fp16":
        return Fp16Linear(weight, bias)
    return _LINEAR_CLASSES[mode](weight, scale, bias)


def pack_quantized_(model: nn.Module) -> None:
    """Tie the LM head to the embedding's quantized matrix, then prepack every layer for fbgemm.

    The tied head keeps its reference to the shared matrix (the embedding needs it anyway), so
    saving it unpacks nothing; every other layer drops its unpacked copy.
    """
    tie_quantized_(model)
    tied_head = _tied_head(model)
    with Packer() as packer:
        for module in model.modules():
            if isinstance(module, _QuantizedLinear) and not module.is_packed:
                packer.submit(module, keep_weight=module is tied_head)


class Packer:
    """Packs quantized layers for fbgemm on worker threads, one task per piece of rows.

    fbgemm's prepack runs on one core and releases the GIL, so packing a model's layers on
    `threads` workers (default: torch's intra-op threads) takes about 1/threads of the time. The
    packed pieces are installed into their module on the caller's thread, oldest first, and at
    most `threads` layers wait unpacked, so memory stays bounded while a load streams on.
    Use it as a context manager: leaving the block installs everything still pending.
    """

    def __init__(self, threads: int | None = None):
        self._threads = max(1, threads or torch.get_num_threads())
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="bloomlm-pack")
        self._scratch = threading.local()  # one float32 conversion buffer per worker
        self._pending: collections.deque[tuple[_QuantizedLinear, bool, list[Future]]]
        self._pending = collections.deque()

    def submit(self, module: _QuantizedLinear, keep_weight: bool = False) -> None:
        """Queue `module`'s weight for packing (nothing to do unless `module.packable`)."""
        if not module.packable:
            return
        futures = [self._pool.submit(self._pack, module, piece) for piece in module.pieces()]
        self._pending.append((module, keep_weight, futures))
        while len(self._pending) > self._threads:
            self._install_oldest()

    def _pack(self, module: _QuantizedLinear, piece: tuple[torch.Tensor, ...]) -> Any:
        if not hasattr(self._scratch, "buffer"):
            self._scratch.buffer = Scratch()
        return module.pack_piece(piece, self._scratch.buffer)

    def _install_oldest(self) -> None:
        module, keep_weight, futures = self._pending.popleft()
        module.install_packed_([future.result() for future in futures], keep_weight)

    def finish(self) -> None:
        """Install every layer still pending; re-raises the first packing error."""
        try:
            while self._pending:
                self._install_oldest()
        finally:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> Packer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()


class PackOnArrival:
    """Packs each quantized layer of a model being loaded as soon as its weights have arrived.

    Packing after the whole load would hold every unpacked weight beside the packed ones and leave
    their freed memory scattered over the heap (measured: +110 MB of peak on a 100M-weight model);
    one layer at a time, the next layer's weights reuse the memory the last one freed. The packing
    runs on a `Packer`'s threads while the load goes on; `finish` waits for it. The tied LM head is
    left to `pack_quantized_`: its weight is the embedding's.
    """

    def __init__(self, model: nn.Module):
        tied = _tied_head(model)
        self._packer = Packer()
        self._slots: dict[str, _QuantizedLinear] = {}
        for name, module in model.named_modules():
            if isinstance(module, _QuantizedLinear) and module is not tied and module.packs:
                for buffer in module.packed_buffers:
                    self._slots[f"{name}.{buffer}"] = module

    def take(self, key: str, tensor: torch.Tensor) -> bool:
        """Put `tensor` into its layer, packed once complete; False if it is no slot here."""
        module = self._slots.pop(key, None)
        if module is None:
            return False
        setattr(module, key.rpartition(".")[2], tensor)
        if not any(getattr(module, name).is_meta for name in module.packed_buffers):
            self._packer.submit(module)
        return True

    def finish(self) -> None:
        """Wait for the layers still packing and install them (`Packer.finish`)."""
        self._packer.finish()

    def __enter__(self) -> PackOnArrival:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()


def _tied_head(model: nn.Module) -> nn.Module | None:
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    head = model.get_output_embeddings()
    return head if isinstance(head, _QuantizedLinear) else None


def tie_quantized_(model: nn.Module) -> None:
    """Point a tied quantized LM head at the quantized embedding's buffers (after loading).

    `BloomPreTrainedModel.tie_weights` calls this when its LM head is quantized. A head already
    packed from the embedding's matrix stays as it is.
    """
    head, embedding = _tied_head(model), model.get_input_embeddings()
    if head is None or head.is_packed or not isinstance(embedding, QuantizedEmbedding):
        return
    head.weight = embedding.weight
    if hasattr(head, "weight_scale"):
        head.weight_scale = embedding.weight_scale


tie_int8_ = tie_quantized_  # its name before float16 existed


def quantized_format(model: nn.Module) -> str | None:
    """The weight format a quantized model saves ("int8", "fp16"); None for a float model."""
    formats = {
        "fp16" if isinstance(m, Fp16Linear) else "int8"
        for m in model.modules()
        if isinstance(m, _QuantizedLinear)
    }
    if len(formats) > 1:
        raise ValueError(f"the model mixes quantized formats {sorted(formats)}; save needs one")
    return formats.pop() if formats else None


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of each quantized layer and quantized embedding."""
    for name, module in model.named_modules():
        if isinstance(module, (_QuantizedLinear, QuantizedEmbedding)):
            yield name, module


def materialise_(module: nn.Module, tensor: torch.Tensor) -> None:
    """Fill a quantized layer whose checkpoint weight was missing from the float `tensor`."""
    if module.weight.dtype == torch.int8:
        module.weight, module.weight_scale = quantize_rows(tensor)
    else:
        module.weight = tensor.to(module.weight.dtype)
