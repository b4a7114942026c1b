"""The tensor-parallel plan of a BLOOM model, framework-free: which parameter is split over the
ranks, along which axis, and what each rank holds. torch (`bloomlm.torch.tensor_parallel`) and JAX
(`bloomlm.flax.sharding`) both follow it, and `bloomlm info --tensor-parallel N` prints it.

Megatron's split, as BLOOM was trained and served (N ranks, H heads, C hidden, V vocabulary;
weights in torch's [out, in] layout):

    word_embeddings [V, C]        vocab     rows split: each rank looks up its V/N ids; all-reduce
    query_key_value [3C, C], bias column    whole heads: the output axis is laid out [H, 3, D], so
                                            rank r's rows r*3C/N .. are its H/N heads' q, k and v
    dense [C, C]                  row       input axis split by the same heads; one all-reduce
    dense_h_to_4h [4C, C], bias   column    the 4C axis split
    dense_4h_to_h [C, 4C]         row       input axis split; one all-reduce
    lm_head [V, C] (tied)         vocab     logits of V/N ids per rank, gathered
    LayerNorms, the biases of the row-parallel layers, score / classifier / qa_outputs: replicated
    (a row-parallel bias is added once, after the all-reduce; the heads are a few KiB)

A vocabulary that N does not divide is replicated instead (JAX shards only evenly; the hub's
250,880 rows divide by every power of two up to 256). The KV cache holds each rank's H/N heads.
Names and shapes come from the config alone, so the plan of the 176B model costs nothing.
"""

from __future__ import annotations

import dataclasses
import math
import re

from bloomlm.checkpoint_names import strip_base_prefix
from bloomlm.config import BloomConfig

TENSOR_PARALLEL_AXIS = "model"  # the mesh axis tensor parallelism runs over (torch and JAX)
DATA_AXIS = "data"  # JAX: the batch axis of a 2-D mesh

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"

# (pattern on the base model's parameter name, kind, axis split in torch's [out, in] layout).
# Every parameter no pattern matches is replicated.
SPLIT_RULES: tuple[tuple[str, str, int], ...] = (
    (r"word_embeddings\.weight", VOCAB, 0),
    (r"h\.\d+\.self_attention\.query_key_value\.(weight|bias)", COLUMN, 0),
    (r"h\.\d+\.self_attention\.dense\.weight", ROW, 1),
    (r"h\.\d+\.mlp\.dense_h_to_4h\.(weight|bias)", COLUMN, 0),
    (r"h\.\d+\.mlp\.dense_4h_to_h\.weight", ROW, 1),
    (r"lm_head\.weight", VOCAB, 0),
)

# The parameters of each class, as (name, shape) templates of the config; `{}` is the layer.
_BODY = (
    ("word_embeddings.weight", ("V", "C")),
    ("word_embeddings_layernorm.weight", ("C",)),
    ("word_embeddings_layernorm.bias", ("C",)),
    ("h.{}.input_layernorm.weight", ("C",)),
    ("h.{}.input_layernorm.bias", ("C",)),
    ("h.{}.self_attention.query_key_value.weight", ("3C", "C")),
    ("h.{}.self_attention.query_key_value.bias", ("3C",)),
    ("h.{}.self_attention.dense.weight", ("C", "C")),
    ("h.{}.self_attention.dense.bias", ("C",)),
    ("h.{}.post_attention_layernorm.weight", ("C",)),
    ("h.{}.post_attention_layernorm.bias", ("C",)),
    ("h.{}.mlp.dense_h_to_4h.weight", ("4C", "C")),
    ("h.{}.mlp.dense_h_to_4h.bias", ("4C",)),
    ("h.{}.mlp.dense_4h_to_h.weight", ("C", "4C")),
    ("h.{}.mlp.dense_4h_to_h.bias", ("C",)),
    ("ln_f.weight", ("C",)),
    ("ln_f.bias", ("C",)),
)
_HEADS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "BloomModel": (),
    "BloomForCausalLM": (("lm_head.weight", ("V", "C")),),
    "BloomForSequenceClassification": (("score.weight", ("labels", "C")),),
    "BloomForTokenClassification": (
        ("classifier.weight", ("labels", "C")),
        ("classifier.bias", ("labels",)),
    ),
    "BloomForQuestionAnswering": (("qa_outputs.weight", ("2", "C")), ("qa_outputs.bias", ("2",))),
}


@dataclasses.dataclass(frozen=True)
class ParamShard:
    """One parameter under an N-way split: `shape` is the whole tensor, `dim` the axis split
    (None when replicated), in torch's layout."""

    name: str
    shape: tuple[int, ...]
    kind: str
    dim: int | None
    ways: int

    @property
    def local_shape(self) -> tuple[int, ...]:
        """What one rank holds."""
        if self.dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.dim] //= self.ways
        return tuple(shape)

    def local_slices(self, rank: int) -> tuple[slice, ...]:
        """Rank `rank`'s part of the whole tensor, one slice per axis."""
        if not 0 <= rank < self.ways:
            raise ValueError(f"rank must be in [0, {self.ways}), got {rank}")
        slices = [slice(None)] * len(self.shape)
        if self.dim is not None:
            size = self.local_shape[self.dim]
            slices[self.dim] = slice(rank * size, (rank + 1) * size)
        return tuple(slices)

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tensor_parallel(n_head: int, ways: int) -> None:
    """ValueError unless `ways` ranks can each hold whole attention heads."""
    if isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
        raise ValueError(f"the tensor-parallel size must be a positive int, got {ways!r}")
    allowed = ", ".join(map(str, divisors(n_head)))
    if ways > n_head:
        raise ValueError(
            f"tensor-parallel size {ways} is larger than n_head {n_head}: each rank computes at "
            f"least one whole attention head; use a size that divides {n_head}: {allowed}"
        )
    if n_head % ways:
        raise ValueError(
            f"tensor-parallel size {ways} does not divide n_head {n_head}: each rank computes "
            f"whole attention heads, so {ways} must divide {n_head} (allowed: {allowed})"
        )


def parameter_shapes(
    config: BloomConfig, architecture: str = "BloomForCausalLM"
) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of `architecture` (transformers' names; a tied LM head is listed,
    as in `named_parameters()` of the torch heads it is one tensor with the embeddings)."""
    if architecture not in _HEADS:
        raise ValueError(f"architecture must be one of {sorted(_HEADS)}, got {architecture!r}")
    C, V = config.hidden_size, config.vocab_size
    sizes = {"C": C, "3C": 3 * C, "4C": 4 * C, "V": V, "labels": config.num_labels, "2": 2}
    prefix = "" if architecture == "BloomModel" else "transformer."
    shapes = {}
    for template, dims in _BODY:
        layers = range(config.n_layer) if "{}" in template else [None]
        for layer in layers:
            name = template if layer is None else template.format(layer)
            shapes[prefix + name] = tuple(sizes[d] for d in dims)
    for name, dims in _HEADS[architecture]:
        shapes[name] = tuple(sizes[d] for d in dims)
    return shapes


def split_rule(name: str, vocab_size: int, ways: int) -> tuple[str, int | None]:
    """(kind, axis) for a parameter name (with or without the `transformer.` prefix)."""
    base_name = strip_base_prefix(name)
    for pattern, kind, dim in SPLIT_RULES:
        if re.fullmatch(pattern, base_name):
            if kind == VOCAB and vocab_size % ways:
                break  # uneven vocabulary: replicated (see the module docstring)
            return kind, dim
    return REPLICATED, None


def tensor_parallel_plan(
    config: BloomConfig, ways: int, architecture: str = "BloomForCausalLM"
) -> list[ParamShard]:
    """Every parameter of `architecture` under a `ways`-way split; ValueError for a bad size."""
    check_tensor_parallel(config.n_head, ways)
    plan = []
    for name, shape in parameter_shapes(config, architecture).items():
        kind, dim = split_rule(name, config.vocab_size, ways)
        plan.append(ParamShard(name, shape, kind, dim, ways))
    return plan


def kv_cache_bytes(
    config: BloomConfig, ways: int, batch: int, length: int, bytes_per_value: int
) -> int:
    """Keys and values of every layer for the rank's H/N heads: 2 * L * B * H/N * S * D values."""
    local_heads = config.n_head // ways
    return 2 * config.n_layer * batch * local_heads * length * config.head_dim * bytes_per_value


def communication_per_token(
    config: BloomConfig, ways: int, batch: int, bytes_per_value: int
) -> dict[str, int]:
    """Bytes one rank sends per decoded token (a ring all-reduce of n bytes sends 2 (N-1)/N * n,
    an all-gather (N-1)/N * n): two all-reduces of [B, C] per block (attention output, MLP
    output), one for the vocab-parallel embedding, and the all-gather of the logits [B, V]."""
    if ways == 1:
        return {"all_reduce": 0, "all_gather": 0, "collectives": 0, "total": 0}
    activation = batch * config.hidden_size * bytes_per_value
    all_reduces = 2 * config.n_layer + (1 if config.vocab_size % ways == 0 else 0)
    all_reduce = all_reduces * 2 * (ways - 1) * activation // ways
    gathered = config.vocab_size % ways == 0
    all_gather = (ways - 1) * batch * config.vocab_size * bytes_per_value // ways if gathered else 0
    collectives = all_reduces + (1 if gathered else 0)
    total = all_reduce + all_gather
    return {"all_reduce": all_reduce, "all_gather": all_gather, "collectives": collectives,
            "total": total}  # fmt: skip


def plan_summary(
    config: BloomConfig,
    ways: int,
    bytes_per_value: int,
    batch: int = 1,
    length: int = 2048,
    architecture: str = "BloomForCausalLM",
) -> dict:
    """What `bloomlm info --tensor-parallel N` shows, as JSON-ready data: one row per parameter
    (layers folded into `h.{i}`), and the bytes each device holds."""
    plan = tensor_parallel_plan(config, ways, architecture)
    rows: dict[str, dict] = {}
    for shard in plan:
        template = re.sub(r"(^|\.)h\.\d+\.", r"\1h.{i}.", shard.name)
        row = rows.setdefault(template, {
            "name": template, "kind": shard.kind, "split_axis": shard.dim,
            "shape": list(shard.shape), "local_shape": list(shard.local_shape), "count": 0,
        })  # fmt: skip
        row["count"] += 1
    # A tied LM head is the embedding matrix: it takes no memory of its own.
    tied = config.tie_word_embeddings and architecture == "BloomForCausalLM"
    if tied:
        rows["lm_head.weight"]["tied"] = True
    counted = [s for s in plan if not (tied and s.name == "lm_head.weight")]
    local = sum(s.local_numel for s in counted)
    replicated = sum(s.local_numel for s in counted if s.dim is None)
    weights = local * bytes_per_value
    cache = kv_cache_bytes(config, ways, batch, length, bytes_per_value)
    return {
        "tensor_parallel": ways,
        "local_heads": config.n_head // ways,
        "parameters_per_device": local,
        "replicated_parameters": replicated,
        "rows": list(rows.values()),
        "bytes_per_device": {"weights": weights, "kv_cache": cache, "total": weights + cache},
        "communication_per_token": communication_per_token(config, ways, batch, bytes_per_value),
    }
