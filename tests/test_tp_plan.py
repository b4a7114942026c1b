"""The tensor-parallel plan (bloomlm.sharding_plan): a pure function of the config, checked here
on the hub's 176B config (tests/fixtures/bloom-176b, a copy of bigscience/bloomz's config.json:
the same architecture as bigscience/bloom) for 8 and 16 ways, and `bloomlm info --tensor-parallel`.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch

from bloomlm import BloomConfig
from bloomlm.cli import main
from bloomlm.sharding_plan import (
    COLUMN,
    REPLICATED,
    ROW,
    VOCAB,
    check_tensor_parallel,
    communication_per_token,
    kv_cache_bytes,
    parameter_shapes,
    plan_summary,
    tensor_parallel_plan,
)
from conftest import ARCHS, TINY_CONFIGS

BLOOM_176B = pathlib.Path(__file__).parent / "fixtures" / "bloom-176b"


@pytest.fixture(scope="module")
def bloom() -> BloomConfig:
    return BloomConfig.from_pretrained(BLOOM_176B)


def test_fixture_is_the_176b_shape(bloom):
    shape = (bloom.n_layer, bloom.n_head, bloom.hidden_size, bloom.vocab_size)
    assert shape == (70, 112, 14336, 250880)


@pytest.mark.parametrize("ways", [8, 16])
def test_176b_plan_local_shapes(bloom, ways):
    C, V, H = 14336, 250880, 112
    plan = {shard.name: shard for shard in tensor_parallel_plan(bloom, ways)}
    expected = {
        "transformer.word_embeddings.weight": (VOCAB, (V // ways, C)),
        "transformer.h.69.self_attention.query_key_value.weight": (COLUMN, (3 * C // ways, C)),
        "transformer.h.0.self_attention.query_key_value.bias": (COLUMN, (3 * C // ways,)),
        "transformer.h.3.self_attention.dense.weight": (ROW, (C, C // ways)),
        "transformer.h.3.self_attention.dense.bias": (REPLICATED, (C,)),
        "transformer.h.7.mlp.dense_h_to_4h.weight": (COLUMN, (4 * C // ways, C)),
        "transformer.h.7.mlp.dense_h_to_4h.bias": (COLUMN, (4 * C // ways,)),
        "transformer.h.7.mlp.dense_4h_to_h.weight": (ROW, (C, 4 * C // ways)),
        "transformer.h.7.mlp.dense_4h_to_h.bias": (REPLICATED, (C,)),
        "transformer.h.5.input_layernorm.weight": (REPLICATED, (C,)),
        "transformer.ln_f.bias": (REPLICATED, (C,)),
        "lm_head.weight": (VOCAB, (V // ways, C)),
    }
    for name, (kind, local_shape) in expected.items():
        assert (plan[name].kind, plan[name].local_shape) == (kind, local_shape), name
    # Each split tensor's local part, N times, is the whole; the heads are whole on every rank.
    for shard in plan.values():
        if shard.dim is not None:
            assert shard.local_numel * ways == int(np.prod(shard.shape)), shard.name
    assert 3 * C // ways == (H // ways) * 3 * (C // H)


@pytest.mark.parametrize("ways", [8, 16])
def test_176b_bytes_per_device(bloom, ways):
    C, V, L = 14336, 250880, 70
    split_per_layer = 3 * C * C + 3 * C + C * C + 4 * C * C + 4 * C + 4 * C * C
    replicated = 2 * C + 2 * C + L * 6 * C  # 2 outer LayerNorms; per layer: 2 LayerNorms, 2 biases
    split = V * C + L * split_per_layer
    assert split + replicated == 176_247_271_424  # bigscience/bloom's parameter count
    summary = plan_summary(bloom, ways, bytes_per_value=2, batch=1, length=2048)
    assert summary["replicated_parameters"] == replicated
    assert summary["parameters_per_device"] == split // ways + replicated
    per_device = summary["bytes_per_device"]
    assert per_device["weights"] == 2 * (split // ways + replicated)
    assert per_device["weights"] < 352.5e9 / ways * 1.001  # ~1/N of the bf16 weights
    assert per_device["kv_cache"] == 2 * L * 1 * (112 // ways) * 2048 * 128 * 2
    assert per_device["total"] == per_device["weights"] + per_device["kv_cache"]
    assert summary["local_heads"] == 112 // ways


def test_qkv_split_is_by_whole_heads():
    """The fused QKV's output axis is [H, 3, D]: each rank's contiguous rows are q, k and v of
    exactly its own heads, and the row-parallel `dense` takes the same heads' context columns."""
    config = BloomConfig(hidden_size=48, n_head=6, n_layer=1, vocab_size=64)
    H, D, ways = 6, 8, 3
    plan = {s.name: s for s in tensor_parallel_plan(config, ways, "BloomModel")}
    head_of_row = np.arange(H)[:, None, None].repeat(3, 1).repeat(D, 2).reshape(-1)  # [H*3*D]
    head_of_context = np.arange(H).repeat(D)  # the attention output is laid out [H, D]
    part_of_row = np.tile(np.arange(3).repeat(D), H)  # 0 = query, 1 = key, 2 = value
    for rank in range(ways):
        rows = plan["h.0.self_attention.query_key_value.weight"].local_slices(rank)[0]
        columns = plan["h.0.self_attention.dense.weight"].local_slices(rank)[1]
        own_heads = set(range(rank * H // ways, (rank + 1) * H // ways))
        assert set(head_of_row[rows]) == own_heads
        assert set(head_of_context[columns]) == own_heads
        assert sorted(np.bincount(part_of_row[rows])) == [D * H // ways] * 3


@pytest.mark.parametrize("architecture", ARCHS)
def test_parameter_shapes_match_the_torch_model(architecture):
    import bloomlm

    for settings in (TINY_CONFIGS["untied"], TINY_CONFIGS["odd_heads"]):
        config = BloomConfig(**settings, num_labels=3)
        with torch.device("meta"):
            model = getattr(bloomlm, architecture)(config)
        want = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
        assert parameter_shapes(config, architecture) == want


def test_uneven_vocabulary_is_replicated():
    config = BloomConfig(hidden_size=32, n_head=4, n_layer=1, vocab_size=130)
    plan = {s.name: s for s in tensor_parallel_plan(config, 4)}
    assert plan["transformer.word_embeddings.weight"].kind == REPLICATED
    assert plan["transformer.word_embeddings.weight"].local_shape == (130, 32)
    assert plan["lm_head.weight"].kind == REPLICATED
    assert {s.name: s for s in tensor_parallel_plan(config, 2)}["lm_head.weight"].kind == VOCAB


@pytest.mark.parametrize(
    "n_head, ways, message",
    [
        (6, 4, "tensor-parallel size 4 does not divide n_head 6"),
        (16, 32, "tensor-parallel size 32 is larger than n_head 16"),
        (16, 0, "must be a positive int"),
        (16, True, "must be a positive int"),
    ],
)
def test_bad_sizes_say_what_divides_what(n_head, ways, message):
    with pytest.raises(ValueError, match=message) as caught:
        check_tensor_parallel(n_head, ways)
    if ways == 4:
        assert "allowed: 1, 2, 3, 6" in str(caught.value)


@pytest.mark.parametrize("n_head, ways", [(16, 2), (16, 4), (6, 2), (28, 2), (28, 4), (6, 6)])
def test_good_sizes_pass(n_head, ways):
    check_tensor_parallel(n_head, ways)


def test_communication_per_token(bloom):
    one = communication_per_token(bloom, 1, 1, 2)
    assert one["total"] == 0
    eight = communication_per_token(bloom, 8, 1, 2)
    assert eight["collectives"] == 2 * 70 + 1 + 1  # per block 2 all-reduces; embedding; logits
    assert eight["all_reduce"] == (2 * 70 + 1) * 2 * 7 * 14336 * 2 // 8
    assert eight["all_gather"] == 7 * 250880 * 2 // 8
    assert kv_cache_bytes(bloom, 8, 4, 100, 2) == 4 * kv_cache_bytes(bloom, 8, 1, 100, 2)


def test_info_prints_the_plan(capsys, bloom):
    status = main(["info", str(BLOOM_176B), "--tensor-parallel", "8", "--dtype", "bfloat16"])
    text = capsys.readouterr().out
    assert status == 0
    assert "tensor parallel over 8 devices (14 heads each)" in text
    assert "[43008, 14336] -> [5376, 14336] x70" in text
    assert "(tied: the embedding)" in text
    status = main(["info", str(BLOOM_176B), "--tensor-parallel", "16", "--json", "--batch", "2"])
    info = json.loads(capsys.readouterr().out)
    plan = info["tensor_parallel"]["bfloat16"]
    assert status == 0 and plan["tensor_parallel"] == 16
    expected = plan_summary(bloom, 16, 2, batch=2, length=2048)["bytes_per_device"]
    assert plan["bytes_per_device"] == expected
    assert set(info["tensor_parallel"]) == {"float32", "float16", "bfloat16"}


def test_info_refuses_a_size_that_splits_heads(capsys):
    assert main(["info", "--tensor-parallel", "4"]) == 1  # the embedded model has 6 heads
    assert "does not divide n_head 6" in capsys.readouterr().err


# -- the README's numbers --------------------------------------------------------------------------

ROOT = pathlib.Path(__file__).parents[1]
UNITS = {"GiB": 2**30, "MiB": 2**20, "MB": 1e6}


def readme_tables() -> list[list[list[str]]]:
    """The tables of the README's "Larger than one device" section, as rows of cells."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Larger than one device", 1)[1].split("\n## ", 1)[0]
    tables, rows = [], []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def printed_bytes(cell: str) -> tuple[float, float]:
    """("41.0 GiB") -> (bytes, half of the last printed digit in bytes)."""
    if cell == "0":
        return 0.0, 0.0
    number, unit = cell.split()
    decimals = len(number.partition(".")[2])
    return float(number) * UNITS[unit], 0.5 * 10**-decimals * UNITS[unit]


def test_readme_176b_memory_plan_is_the_plans(bloom):
    """Every number of the README's 176B table is plan_summary's, as printed (bf16, 1 x 2048)."""
    table = next(t for t in readme_tables() if t[0][0].startswith("bf16, batch 1 x 2048"))
    assert table[0][1:] == ["1 device", "8 devices", "16 devices"]
    rows = {row[0]: row[1:] for row in table[2:]}
    checked = 0
    for column, ways in enumerate((1, 8, 16)):
        plan = plan_summary(bloom, ways, bytes_per_value=2, batch=1, length=2048)
        exact = {
            "weights per device": plan["bytes_per_device"]["weights"],
            "KV cache per device": plan["bytes_per_device"]["kv_cache"],
            "bytes each device sends per token (all-reduces + logits)": plan[
                "communication_per_token"
            ]["total"],
        }
        for label, value in exact.items():
            shown, rounding = printed_bytes(rows[label][column])
            assert abs(shown - value) <= rounding, (label, ways)
            checked += 1
        qkv = next(r for r in plan["rows"] if r["name"].endswith("query_key_value.weight"))
        cell = rows["`query_key_value` per layer and device"][column]
        assert cell.startswith(str(qkv["local_shape"])), cell
        if ways > 1:
            assert f"({plan['local_heads']} heads)" in cell
    assert checked == 9


def load_tp_bench():
    spec = importlib.util.spec_from_file_location("tp_bench", ROOT / "benchmarks" / "tp_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tables_are_the_committed_run():
    """benchmarks/TP.md is tp_bench's table of the raw numbers in TP.json, its 176B rows are what
    the plan computes today, and the README's benchmark tables are TP.md's rows."""
    tp_bench = load_tp_bench()
    results = json.loads((ROOT / "benchmarks" / "TP.json").read_text())
    committed = (ROOT / "benchmarks" / "TP.md").read_text()
    assert committed == "# Tensor parallelism benchmark\n\n" + tp_bench.table(results)
    assert results["computed_176b"] == tp_bench.computed_176b()
    benchmark_tables = [t for t in readme_tables() if "decode (ms/token)" in t[0]]
    benchmark_tables += [t for t in readme_tables() if t[0][0] == "setup"]
    assert len(benchmark_tables) == 3  # torch processes, JAX devices, 176B computed
    for table in benchmark_tables:
        for row in table:
            assert "| " + " | ".join(row) + " |" in committed, row


def test_benchmark_gpu_row_runs_and_is_tabled():
    """`tp_bench.py --cuda`'s measurement, run here on the CPU at the tiny shape (the GPU run is
    the 7b1 shape), and its row in the table, which then drops the "no GPU" note."""
    tp_bench = load_tp_bench()
    tp_bench.NEW_TOKENS = 2  # (generate(3) - generate(1)) / 2: enough to run every line
    row = tp_bench.single_device_row("tiny", "cpu")
    assert row["shape"] == "tiny" and row["dtype"] == "bfloat16"
    assert np.isfinite(row["ms_per_token"])  # timing noise may dominate 2 tokens: no sign check
    assert torch.get_default_dtype() == torch.float32  # restored after making the bf16 model
    results = json.loads((ROOT / "benchmarks" / "TP.json").read_text())
    results["gpu"] = dict(row, device="NVIDIA H200", ms_per_token=21.25, peak_gb=15.02)
    text = tp_bench.table(results)
    assert "(NVIDIA H200), the tiny shape in bfloat16, batch 1, greedy: 21.2 ms/token" in text
    assert "peak GPU memory 15.0 GB" in text
    assert "no measured GPU row" not in text and "no measured GPU row" in tp_bench.table(
        json.loads((ROOT / "benchmarks" / "TP.json").read_text())
    )
