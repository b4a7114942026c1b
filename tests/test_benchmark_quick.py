"""The benchmark scripts' quick modes run end to end, so the scripts cannot rot (no timing is
asserted): every row and task of benchmarks/bench.py is in its JSON, measured under the OpenMP
settings the table states."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
SYSTEMS = ["bloomlm-fp32", "bloomlm-fp32-compiled", "bloomlm-fp16", "bloomlm-int8",
           "bloomlm-int8-weight-only", "bloomlm-bf16", "transformers-fp32", "ctranslate2-fp32",
           "ctranslate2-int8", "flax-fp32"]  # fmt: skip
TASKS = ["load", "prefill-1x128", "prefill-8x128", "ttft-1x128", "decode-1", "decode-8"]
OPENMP = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE",
          "OMP_PROC_BIND": "false"}  # fmt: skip


def _bench(tmp_path: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--quick", "--work-dir", str(tmp_path / "work"),
           "--out-dir", str(tmp_path / "out"), *extra]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "out" / "RESULTS.json").read_text())


def test_benchmark_quick_mode(tmp_path):
    data = _bench(tmp_path)
    by_key = {(r["system"], r["task"]): r for r in data["records"]}
    for system in SYSTEMS:
        for task in TASKS:
            record = by_key.get((system, task))
            assert record is not None, f"{system} {task} missing: {sorted(by_key)}"
            assert record["omp"] == OPENMP, (system, task, record["omp"])
            if (system, task) == ("flax-fp32", "ttft-1x128"):  # Flax's generate has no streamer
                assert "skipped" in record
                continue
            assert record["seconds"] > 0 and record["peak_rss_mb"] > 0, record
            if task != "load":  # the warm-up call is kept apart from the timed one
                assert record["warmup_seconds"] > 0 and len(record["all"]) == 1, record
    compiled = by_key["bloomlm-fp32-compiled", "decode-1"]
    if "compile_failed" not in compiled:  # where inductor works, the compiled step really ran
        assert compiled["compiled_graphs"] >= 1 and compiled["compile_seconds"] > 0, compiled
    (run,) = data["runs"].values()
    assert run["openmp"] == OPENMP and len(run["loadavg_start"]) == 3
    assert run["cpu"]["torch_capability"] and run["cpu"]["kind"]

    report = (tmp_path / "out" / "RESULTS.md").read_text()
    for target in ("int8-decode-b1", "fp32-compiled-decode-b8-vs-ct2", "ttft-1x128", "rss-int8"):
        row = next(line for line in report.splitlines() if line.startswith(f"| `{target}`"))
        assert "| met |" in row or "| **missed** |" in row, row
    assert "OMP_WAIT_POLICY=PASSIVE" in report and "load average at start" in report

    # A partial rerun replaces only its own (system, task) records and says the rows mix runs;
    # a hand-written why-not note survives the rewrite and lands in the targets table.
    notes = report.replace("<!-- why-not:start -->", "<!-- why-not:start -->\n- `rss-fp16`: N1")
    (tmp_path / "out" / "RESULTS.md").write_text(notes)
    again = _bench(tmp_path, "--only", "bloomlm-fp32", "--tasks", "load")
    assert len(again["runs"]) == 2 and len(again["records"]) == len(data["records"])
    rerun = [r for r in again["records"] if r["run"] != run["started"]]
    assert [(r["system"], r["task"]) for r in rerun] == [("bloomlm-fp32", "load")]
    report = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "Rows from more than one run" in report and "- `rss-fp16`: N1" in report
    rss_row = next(line for line in report.splitlines() if line.startswith("| `rss-fp16`"))
    assert "| met |" in rss_row or rss_row.endswith("| N1 |"), rss_row


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

    # Hand-written notes after the notes mark survive a rewrite of the file (the table is new).
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import serve_bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
    md = tmp_path / "quick" / "SERVING.md"
    md.write_text("stale table\n" + serve_bench.NOTES_MARK + "\nN1: why a target is missed\n")
    serve_bench.write(report, tmp_path / "quick", "SERVING")
    text = md.read_text()
    assert "stale table" not in text and "| int8 | 4 | 8 |" in text
    assert text.endswith(serve_bench.NOTES_MARK + "\nN1: why a target is missed\n")


def test_cli_int8_bench_quick_mode_times_every_command(tmp_path):
    """benchmarks/cli_int8.py --quick: the real `bloomlm generate` on a tiny float32 folder and on
    its `convert --quantize int8` copy, every command of the table; the int8 folder's kernel is the
    one the CLI says it picked (weight-only for 8 tokens, W8A8 for 8 x 40)."""
    cmd = [sys.executable, str(SCRIPT.parent / "cli_int8.py"), "--quick",
           "--work-dir", str(tmp_path), "--out-dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = json.loads((tmp_path / "CLI_INT8-quick.json").read_text())["records"]
    commands = ["fp32", "int8", "int8 --quantize int8", "int8 weight-only", "fp32 --quantize int8"]
    for run in ("1 x 8", "8 x 40"):
        timed = {r["command"]: r for r in records if r["run"] == run}
        assert sorted(timed) == sorted(commands), timed
        assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in timed.values())
    notes = {r["run"]: r["kernel_note"] for r in records if r["command"] == "int8"}
    assert "run weight-only (up to 8 new tokens" in notes["1 x 8"], notes
    assert "run W8A8 (up to 320 new tokens" in notes["8 x 40"], notes
    assert "| 8 x 40 | " in (tmp_path / "CLI_INT8-quick.md").read_text()
