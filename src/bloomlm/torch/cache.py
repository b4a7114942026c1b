"""The key/value cache of the PyTorch model: BLOOM's tuple layout at the API, one buffer inside.

transformers' BLOOM cache, the layout the public API takes and returns, is a tuple with one
`(key (B * H, D, S), value (B * H, S, D))` pair per layer (`LayerPast`). `StaticCache` is the
preallocated buffer the fast path (generation) writes in place instead; it converts to and from the
tuple layout at the API boundary. Notation as in `model.py`.
"""

from __future__ import annotations

import torch

from bloomlm.config import BloomConfig

LayerPast = tuple[torch.Tensor, torch.Tensor]


class StaticCache:
    """Keys and values of every layer, preallocated to `max_length` and written in place.

    transformers grows BLOOM's cache with a `torch.cat` of the whole cache per layer per step; here
    a step writes only its new positions. Layout (n_layer, B, H, max_length, D); positions
    `:length` are filled. `to_legacy()` / `from_legacy()` convert to and from BLOOM's tuple layout
    at the API boundary.
    """

    def __init__(
        self,
        config: BloomConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype,
        device=None,
        n_head: int | None = None,  # a rank's heads under tensor parallelism
    ):
        n_head = config.n_head if n_head is None else n_head
        shape = (config.n_layer, batch_size, n_head, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, H, T, D) keys/values after the filled part; return views of all
        positions so far."""
        end = self.length + key.shape[2]
        self.keys[layer, :, :, self.length : end] = key
        self.values[layer, :, :, self.length : end] = value
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    def reorder_(self, batch_index: torch.LongTensor) -> None:
        """Keep rows `batch_index` (beam search), in place."""
        self.keys = self.keys.index_select(1, batch_index.to(self.keys.device))
        self.values = self.values.index_select(1, batch_index.to(self.values.device))

    def to_legacy(self) -> tuple[LayerPast, ...]:
        n_layer, B, H, _, D = self.keys.shape
        S = self.length
        return tuple(
            (
                self.keys[i, :, :, :S].transpose(-1, -2).reshape(B * H, D, S),
                self.values[i, :, :, :S].reshape(B * H, S, D),
            )
            for i in range(n_layer)
        )

    @classmethod
    def from_legacy(
        cls, config: BloomConfig, past: tuple[LayerPast, ...], max_length: int
    ) -> StaticCache:
        rows, D, S = past[0][0].shape
        cache = cls(config, rows // config.n_head, max_length, past[0][0].dtype, past[0][0].device)
        for i, (key, value) in enumerate(past):
            cache.keys[i, :, :, :S] = key.view(-1, config.n_head, D, S).transpose(-1, -2)
            cache.values[i, :, :, :S] = value.view(-1, config.n_head, S, D)
        cache.length = S
        return cache


def reorder_legacy_cache(
    past: tuple[LayerPast, ...], beam_idx: torch.LongTensor
) -> tuple[LayerPast, ...]:
    """Row i of the result is batch row beam_idx[i] of `past` (beam search), in BLOOM's layout:
    a batch row is H consecutive rows of the leading B * H dimension."""
    batch_size = beam_idx.numel()

    def select(tensor: torch.Tensor) -> torch.Tensor:
        rows = tensor.view(batch_size, -1, *tensor.shape[1:])  # (B * H, ...) -> (B, H, ...)
        return rows.index_select(0, beam_idx.to(tensor.device)).view(tensor.shape)

    return tuple((select(key), select(value)) for key, value in past)
