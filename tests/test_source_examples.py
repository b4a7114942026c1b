"""The code examples of the source document (transformers 4.37's BLOOM page), run unchanged except
`from transformers import` -> `from bloomlm import`, against a local folder named like the hub model.

Each example also runs with transformers on the same folder, and the values it ends with must agree.
"""

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

FIXTURE_TOKENIZER = Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"

SEQ_CLS_EXAMPLE = """
import torch
from transformers import AutoTokenizer, BloomForSequenceClassification
tokenizer = AutoTokenizer.from_pretrained("bigscience/bloom-560m")
model = BloomForSequenceClassification.from_pretrained("bigscience/bloom-560m")
inputs = tokenizer("Hello, my dog is cute", return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
predicted_class_id = logits.argmax().item()
# To train a model on `num_labels` classes, you can pass `num_labels=num_labels` to `.from_pretrained(...)`
num_labels = len(model.config.id2label)
model = BloomForSequenceClassification.from_pretrained("bigscience/bloom-560m", num_labels=num_labels)
labels = torch.tensor([1])
loss = model(**inputs, labels=labels).loss
"""

MULTI_LABEL_EXAMPLE = """
import torch
from transformers import AutoTokenizer, BloomForSequenceClassification
tokenizer = AutoTokenizer.from_pretrained("bigscience/bloom-560m")
model = BloomForSequenceClassification.from_pretrained("bigscience/bloom-560m", problem_type="multi_label_classification")
inputs = tokenizer("Hello, my dog is cute", return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
predicted_class_ids = torch.arange(0, logits.shape[-1])[torch.sigmoid(logits).squeeze(dim=0) > 0.5]
# To train a model on `num_labels` classes, you can pass `num_labels=num_labels` to `.from_pretrained(...)`
num_labels = len(model.config.id2label)
model = BloomForSequenceClassification.from_pretrained(
    "bigscience/bloom-560m", num_labels=num_labels, problem_type="multi_label_classification"
)
labels = torch.sum(
    torch.nn.functional.one_hot(predicted_class_ids[None, :].clone(), num_classes=num_labels), dim=1
).to(torch.float)
loss = model(**inputs, labels=labels).loss
"""

TOKEN_CLS_EXAMPLE = """
from transformers import AutoTokenizer, BloomForTokenClassification
import torch
tokenizer = AutoTokenizer.from_pretrained("bigscience/bloom-560m")
model = BloomForTokenClassification.from_pretrained("bigscience/bloom-560m")
inputs = tokenizer(
    "HuggingFace is a company based in Paris and New York", add_special_tokens=False, return_tensors="pt"
)
with torch.no_grad():
    logits = model(**inputs).logits
predicted_token_class_ids = logits.argmax(-1)
# Note that tokens are classified rather then input words which means that
# there might be more predicted token classes than words.
# Multiple token classes might account for the same word
predicted_tokens_classes = [model.config.id2label[t.item()] for t in predicted_token_class_ids[0]]
labels = predicted_token_class_ids
loss = model(**inputs, labels=labels).loss
"""


@pytest.fixture(scope="module")
def hub_like_folder(tmp_path_factory):
    """`<tmp>/bigscience/bloom-560m`: a tiny random BLOOM with every head's weights and the fixture tokenizer."""
    root = tmp_path_factory.mktemp("examples")
    folder = root / "bigscience" / "bloom-560m"
    torch.manual_seed(0)
    config = transformers.BloomConfig(
        vocab_size=1024, hidden_size=32, n_layer=2, n_head=4, pad_token_id=3
    )
    base = transformers.BloomModel(config)
    state = {f"transformer.{k}": torch.randn_like(v) * 0.2 for k, v in base.state_dict().items()}
    state["score.weight"] = torch.randn(2, 32)
    state["classifier.weight"] = torch.randn(2, 32)
    state["classifier.bias"] = torch.randn(2)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    for item in FIXTURE_TOKENIZER.iterdir():
        shutil.copy(item, folder / item.name)
    return root


def _run(example: str, library: str) -> dict:
    namespace: dict = {}
    exec(example.replace("from transformers import", f"from {library} import"), namespace)
    return namespace


@pytest.mark.parametrize(
    ("example", "compared"),
    [
        (SEQ_CLS_EXAMPLE, ["logits", "loss"]),
        (MULTI_LABEL_EXAMPLE, ["logits", "labels", "loss"]),
        (TOKEN_CLS_EXAMPLE, ["logits", "loss", "predicted_tokens_classes"]),
    ],
    ids=["sequence-classification", "multi-label", "token-classification"],
)
def test_example_runs_unchanged_and_agrees(example, compared, hub_like_folder, monkeypatch):
    monkeypatch.chdir(hub_like_folder)  # "bigscience/bloom-560m" is now a relative local folder
    ours = _run(example, "bloomlm")
    theirs = _run(example, "transformers")
    assert type(ours["model"]).__module__.startswith("bloomlm")
    assert type(ours["tokenizer"]).__name__ == "BloomTokenizerFast"
    for name in compared:
        a, b = ours[name], theirs[name]
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, b.abs().max().item()))
        else:
            assert a == b, name
