"""The benchmark scripts' quick modes run end to end, so they cannot rot (no timing is asserted)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_benchmark_quick_mode(tmp_path):
    systems = ["bloomlm:fp32", "bloomlm:int8", "transformers:fp32"]
    if importlib.util.find_spec("ctranslate2") is not None:
        systems.append("ctranslate2:int8")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--work-dir",
        str(tmp_path),
        "--systems",
        ",".join(systems),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [
        line
        for line in out.stdout.splitlines()
        if line.startswith("| bloomlm") or line.startswith("| trans")
    ]
    assert len(table) == 3, out.stdout
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "—" not in cells, f"a task failed: {row}\n{out.stderr[-3000:]}"


def test_assisted_bench_runs_and_checks_ids(tmp_path):
    """benchmarks/assisted_bench.py at its smallest: the table, the JSON, and acceptance counts;
    it fails by itself when an assisted output differs from plain greedy search's."""
    script = SCRIPT.parent / "assisted_bench.py"
    cmd = [sys.executable, str(script), "--extra-layers", "2", "--epsilons", "0.3", "--new", "6",
           "--rounds", "1", "--json", str(tmp_path / "a.json")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert len(rows) == 4 * 6  # prompts x (2 libraries x 3 modes)
    assisted = [r for r in rows if (r["library"], r["mode"]) == ("bloomlm", "assisted")]
    assert all(0 <= r["kept"] <= r["drafted"] and r["target_passes"] >= 1 for r in assisted)


def test_serve_bench_quick_mode_runs_end_to_end(tmp_path):
    """benchmarks/serve_bench.py --quick: two real servers (float32, --quantize int8) on a tiny
    shape, streaming clients at 1 and 4, the static batch and prefill references; every request
    streamed the tokens it asked for (the script raises otherwise). README.md is left alone."""
    readme = SCRIPT.parents[1] / "README.md"
    before = readme.read_text()
    cmd = [sys.executable, str(SCRIPT.parent / "serve_bench.py"), "--quick", "--threads", "1",
           "--work-dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "quick" / "SERVING.json").read_text())
    assert [r["dtype"] for r in report["results"]] == ["float32", "int8"]
    for result in report["results"]:
        assert [row["clients"] for row in result["levels"]] == [1, 4]
        for row in result["levels"]:
            assert row["requests"] == max(4, 2 * row["clients"]) and row["tokens_per_s"] > 0
            assert 8 * row["requests"] <= row["tokens"] <= 16 * row["requests"]
        assert result["static_batch"]["rows"] == 4 and "concurrent sequences" in result[
            "memory_plan"]  # fmt: skip
        assert result["targets"]["ttft_over_prefill_p99"] > 0
    assert "| int8 | 4 | 8 |" in (tmp_path / "quick" / "SERVING.md").read_text()
    assert readme.read_text() == before
