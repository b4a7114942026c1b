"""Folders bloomlm writes load in transformers 4.37.2 (issue 12, item 2).

The writers (`save_pretrained`, `bloomlm convert`, `bloomlm finetune`) run in a second environment
with the newest `tokenizers` and no transformers (scripts/write_folders.py): that is where the
BPE-merges format broke, and this environment pins the old `tokenizers` transformers 4.37.2 needs,
which writes the old format anyway. Here every folder written is loaded with transformers'
AutoTokenizer and AutoModel* and compared with bloomlm: same ids, same logits.

Where the folders come from: `$BLOOMLM_WRITTEN_FOLDERS` (.ci/run writes them and sets it). When it
is unset outside CI, this test builds a light writers environment in `.venv-writers` (a venv
holding only the newest `tokenizers`, reusing this environment's other packages through a .pth
file) and runs the script itself; in CI (`$CI` set) a missing variable is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest
import torch
import transformers

import bloomlm
from conftest import FP32_TOL

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "write_folders.py"
WRITERS_VENV = ROOT / ".venv-writers"
FOLDERS_ENV = "BLOOMLM_WRITTEN_FOLDERS"
AUTO_CLASSES = {
    "BloomForCausalLM": transformers.AutoModelForCausalLM,
    "BloomForSequenceClassification": transformers.AutoModelForSequenceClassification,
    "BloomForTokenClassification": transformers.AutoModelForTokenClassification,
    "BloomForQuestionAnswering": transformers.AutoModelForQuestionAnswering,
}
# transformers' QA head passes position_ids=None to its body, which then warns on every call.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`position_ids` have no functionality in BLOOM:FutureWarning"
)
TEXTS = ["Hello, my dog is cute", "  Ünïcödé and   spaces\tand tabs", "def f(x):\n    return x"]


def _writers_python() -> pathlib.Path:
    """The Python of the writers' environment, made (light) when there is none yet."""
    python = WRITERS_VENV / "bin" / "python"
    if python.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(WRITERS_VENV)], check=True)
    install = [str(python), "-m", "pip", "install", "-q", "--upgrade", "tokenizers"]
    if subprocess.run(install).returncode != 0:
        pytest.fail(f"could not install the newest tokenizers into {WRITERS_VENV} (offline?)")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # After the venv's own packages: torch, safetensors, numpy, tqdm from this environment.
    (pathlib.Path(site) / "zz_main_environment.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    return python


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> pathlib.Path:
    given = os.environ.get(FOLDERS_ENV)
    if given:
        return pathlib.Path(given)
    if os.environ.get("CI"):
        pytest.fail(
            f"${FOLDERS_ENV} is not set: .ci/run writes the folders with the newest tokenizers "
            "(scripts/write_folders.py in a second venv) and sets it"
        )
    out = tmp_path_factory.mktemp("written")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(_writers_python()), str(SCRIPT), str(out)], env=env, check=True)
    return out


def _logits(output) -> torch.Tensor:
    if hasattr(output, "start_logits"):
        return torch.stack([output.start_logits, output.end_logits])
    return output.logits


def test_every_written_folder_loads_in_transformers_with_the_same_ids_and_logits(written):
    manifest = json.loads((written / "manifest.json").read_text())
    major, minor = (int(p) for p in manifest["tokenizers"].split(".")[:2])
    assert (major, minor) >= (0, 20), "written with a tokenizers that still writes the old format"
    source = bloomlm.AutoTokenizer.from_pretrained("bloomlm-tiny")
    writers = set()
    for entry in manifest["folders"]:
        folder = written / entry["folder"]
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        ours = bloomlm.AutoTokenizer.from_pretrained(folder)
        for text in TEXTS:
            expected = ours(text)["input_ids"]
            assert theirs(text)["input_ids"] == expected and len(expected) > 3, folder
            if not ours.add_prefix_space:  # token-cls tokenizers add a space before the text
                assert expected == source(text)["input_ids"], folder
        ids = torch.tensor([source(TEXTS[0])["input_ids"]])
        with torch.no_grad():
            their_model = AUTO_CLASSES[entry["class"]].from_pretrained(folder)
            our_model = getattr(bloomlm, entry["class"]).from_pretrained(folder)
            assert type(their_model).__name__ == entry["class"]
            expected_logits = _logits(their_model(ids))
            torch.testing.assert_close(
                _logits(our_model(ids)), expected_logits, atol=FP32_TOL, rtol=FP32_TOL
            )
        writers.add(entry["folder"].split("-")[0])
    assert writers == {"save_pretrained", "convert", "finetune"}
