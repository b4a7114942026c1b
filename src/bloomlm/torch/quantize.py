"""Weight-only int8: each weight row stored as int8 with one float scale, activations stay float.

Applied to a finished model from outside (the model file knows nothing about it), as gpt-fast does.
Batch-1 decoding on a CPU is bound by how many weight bytes it reads per token, so a quarter of the
bytes of float32 is most of the speed-up; the scale is per output channel (row), which keeps the error
of a row independent of the other rows' magnitudes.

    w[i, :] ~= scale[i] * q[i, :],   q int8 in [-127, 127],   scale[i] = max |w[i, :]| / 127
    y = x @ w.T ~= (x @ q.T) * scale           (the scale factors out of the row's dot product)

The tied embedding / LM head matrix is quantized too (one int8 matrix serves both): it is the largest
matrix of every BLOOM, 46% of bloom-560m's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_rows(
    weight: torch.Tensor, rows_per_block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 weight, float32 scale per row).

    Done in blocks of rows so the float temporaries stay small: a whole-matrix expression would allocate
    several float copies of the largest matrix, which the allocator then keeps (peak memory of a load).
    """
    quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    if weight.is_meta:  # a model being prepared for loading: only the shapes matter
        return quantized, scale
    for start in range(0, weight.shape[0], rows_per_block):
        block = weight[start : start + rows_per_block].to(
            torch.float32, copy=True
        )  # never edit the source
        block_scale = block.abs().amax(dim=1).clamp_(min=1e-12) / 127.0
        scale[start : start + rows_per_block] = block_scale
        quantized[start : start + rows_per_block] = (
            block.div_(block_scale[:, None]).round_().clamp_(-127, 127)
        )
    return quantized, scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (scale * weight).T for int8 `weight`, returned in x's dtype.

    Few rows (decoding): torch's fused int8-weight kernel, which reads the int8 matrix directly. Its
    bfloat16 variant is the fast one on CPUs (measured ~13x faster than its float32 variant, and ~2x
    faster than a float32 matmul at batch 1), so float32 activations go through it rounded to bfloat16,
    an error well below the int8 weights' own. Many rows (prefill): that kernel is slow there (measured
    7x slower than a bfloat16 matmul at 128 rows), so the weight is converted to bfloat16 once for the
    call and a regular matmul runs; the scale factors out of each output column.
    """
    flat = x.reshape(-1, x.shape[-1])
    compute_dtype = (
        torch.bfloat16 if flat.dtype == torch.float32 and flat.device.type == "cpu" else flat.dtype
    )
    flat = flat.to(compute_dtype)
    if (
        flat.shape[0] <= _FUSED_KERNEL_MAX_ROWS and flat.device.type == "cpu"
    ):  # the fused kernel is CPU's
        out = torch._weight_int8pack_mm(flat.contiguous(), weight, scale.to(compute_dtype))
    else:
        out = F.linear(flat, weight.to(compute_dtype)) * scale.to(compute_dtype)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


_FUSED_KERNEL_MAX_ROWS = 8  # measured crossover: 8 rows favour the fused kernel, 128 the matmul


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with an int8 weight buffer and a per-row scale."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight, scale = quantize_rows(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_linear(x, self.weight, self.scale)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """nn.Embedding over int8 rows; looked-up rows are scaled back to the model's float dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.output_dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(self.output_dtype)
        return rows * self.scale[ids].to(self.output_dtype)[..., None]


def quantize_int8_(
    model: nn.Module, dtype: torch.dtype | None = None, include_embeddings: bool = True
) -> nn.Module:
    """Replace every nn.Linear (and the tied embedding / LM head) with its int8 version, in place.

    `dtype` is the float type the model computes in (default: that of its parameters now). The
    model's own `tie_weights()` keeps the int8 pair tied afterwards: it sees the Int8Linear head and
    calls `tie_int8_`, so nothing on the instance is replaced.
    """
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    tied = include_embeddings and getattr(model.config, "tie_word_embeddings", False)
    if include_embeddings:
        embedding = model.get_input_embeddings()
        weight, scale = quantize_rows(embedding.weight.detach())
        model.set_input_embeddings(Int8Embedding(weight, scale, dtype))
        if tied and model.get_output_embeddings() is not None:
            model.set_output_embeddings(
                Int8Linear(weight, scale, None)
            )  # the same int8 matrix, stored once
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear.from_linear(child))
    return model


def tie_int8_(model: nn.Module) -> None:
    """Point a tied int8 LM head at the int8 embedding's buffers (after they were loaded).

    `BloomPreTrainedModel.tie_weights` calls this when its LM head is an Int8Linear.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(head, Int8Linear):
        if isinstance(embedding, Int8Embedding):
            head.weight, head.scale = embedding.weight, embedding.scale
