"""Misuse at the PyTorch API boundary: each case raises ValueError/TypeError naming the problem."""

import pytest
import torch

from bloomlm import (
    BloomConfig,
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
    BloomModel,
)
from bloomlm.errors import CheckpointError, CheckpointNotFoundError

CONFIG = dict(vocab_size=50, hidden_size=16, n_layer=2, n_head=4, pad_token_id=3)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(**CONFIG)).eval()


def _ids(batch=2, length=5):
    return torch.randint(4, 50, (batch, length))


def _cache(lm, ids):
    return lm(ids, use_cache=True).past_key_values


FORWARD_CASES = {
    "id above vocab": (dict(input_ids=torch.tensor([[1, 50]])), ValueError, r"50 .*\[0, 50\)"),
    "negative id": (dict(input_ids=torch.tensor([[-1, 2]])), ValueError, r"-1 .*vocabulary"),
    "float ids": (dict(input_ids=torch.ones(1, 3)), TypeError, "integers"),
    "1-d ids": (dict(input_ids=torch.tensor([1, 2])), ValueError, r"\(batch, seq_len\)"),
    "both ids and embeds": (
        dict(input_ids=_ids(), inputs_embeds=torch.randn(2, 5, 16)),
        ValueError,
        "not both",
    ),
    "neither ids nor embeds": (dict(), ValueError, "input_ids .* or inputs_embeds"),
    "embeds of wrong width": (
        dict(inputs_embeds=torch.randn(2, 5, 8)),
        ValueError,
        r"\(batch, seq_len, 16\)",
    ),
    "mask too short": (
        dict(input_ids=_ids(), attention_mask=torch.ones(2, 4)),
        ValueError,
        r"\(2, 5\)",
    ),
    "mask wrong batch": (
        dict(input_ids=_ids(), attention_mask=torch.ones(3, 5)),
        ValueError,
        "attention_mask",
    ),
    "head mask shape": (
        dict(input_ids=_ids(), head_mask=torch.ones(3)),
        ValueError,
        r"head_mask .*\(4,\)",
    ),
    "unknown keyword": (dict(input_ids=_ids(), foo=1), ValueError, "foo"),
    "labels wrong shape": (
        dict(input_ids=_ids(), labels=_ids(2, 4)),
        ValueError,
        r"labels .*\(2, 5\)",
    ),
    "labels wrong dtype": (
        dict(input_ids=_ids(), labels=torch.zeros(2, 5)),
        TypeError,
        "labels .*integer",
    ),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_misuse(lm, case):
    kwargs, error, pattern = FORWARD_CASES[case]
    with pytest.raises(error, match=pattern):
        lm(**kwargs)


def test_cache_with_fewer_layers(lm):
    ids = _ids()
    past = _cache(lm, ids)
    with pytest.raises(ValueError, match="1 layers.*n_layer=2"):
        lm(ids[:, :1], past_key_values=past[:1])


def test_cache_for_another_batch_size(lm):
    past = _cache(lm, _ids(batch=3))
    with pytest.raises(ValueError, match="batch size 2"):
        lm(_ids(batch=2, length=1), past_key_values=past)


def test_cache_with_wrong_head_dim(lm):
    past = _cache(lm, _ids())
    bad = tuple((k[:, :2], v[..., :2]) for k, v in past)
    with pytest.raises(ValueError, match="head_dim = 4"):
        lm(_ids(length=1), past_key_values=bad)


def test_mask_must_cover_past_and_new(lm):
    ids = _ids()
    past = _cache(lm, ids)
    with pytest.raises(ValueError, match=r"past 5 \+ new 1"):
        lm(ids[:, :1], past_key_values=past, attention_mask=torch.ones(2, 1))


def test_sequence_classification_labels():
    torch.manual_seed(0)
    model = BloomForSequenceClassification(BloomConfig(**CONFIG, num_labels=3)).eval()
    with pytest.raises(ValueError, match=r"\(batch,\) = \(2,\)"):
        model(_ids(), labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"num_labels=3"):
        model(_ids(), labels=torch.zeros(2, 2))
    model.config.problem_type = "single_label_classification"
    with pytest.raises(TypeError, match="integer labels"):
        model(_ids(), labels=torch.zeros(2))


def test_sequence_classification_without_pad_token():
    model = BloomForSequenceClassification(BloomConfig(**{**CONFIG, "pad_token_id": None})).eval()
    with pytest.raises(ValueError, match="pad_token_id"):
        model(_ids())
    assert model(_ids(batch=1)).logits.shape == (1, 2)


def test_token_classification_labels():
    model = BloomForTokenClassification(BloomConfig(**CONFIG)).eval()
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        model(_ids(), labels=torch.zeros(2, 3, dtype=torch.long))


def test_question_answering_positions():
    model = BloomForQuestionAnswering(BloomConfig(**CONFIG)).eval()
    with pytest.raises(ValueError, match=r"start_positions .*\(2,\)"):
        model(_ids(), start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="end_positions"):
        model(_ids(), start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([1.0, 2.0]))


def test_model_needs_a_bloom_config():
    with pytest.raises(TypeError, match="BloomConfig"):
        BloomModel({"hidden_size": 16})


# -- checkpoints -----------------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path, lm):
    lm.save_pretrained(tmp_path)
    return tmp_path


def test_missing_folder_names_what_was_looked_for(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        BloomModel.from_pretrained(tmp_path / "nope")


def test_folder_without_weights(tmp_path):
    BloomConfig(**CONFIG).save_pretrained(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        BloomModel.from_pretrained(tmp_path)


def test_truncated_weights(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        BloomForCausalLM.from_pretrained(saved)


def test_corrupt_weights(saved):
    (saved / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        BloomForCausalLM.from_pretrained(saved)


def test_weights_that_do_not_fit_the_config(saved):
    config = BloomConfig.from_pretrained(saved)
    config.vocab_size = 60
    config.save_pretrained(saved)
    with pytest.raises(CheckpointError, match=r"word_embeddings.weight.*\(50, 16\).*\(60, 16\)"):
        BloomForCausalLM.from_pretrained(saved)


def test_unknown_from_pretrained_keyword(saved):
    with pytest.raises(TypeError, match="not_a_field"):
        BloomForCausalLM.from_pretrained(saved, not_a_field=1)


def test_bad_torch_dtype(saved):
    with pytest.raises(ValueError, match="torch_dtype"):
        BloomForCausalLM.from_pretrained(saved, torch_dtype="int8")


def test_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        BloomForCausalLM.from_pretrained("bigscience/definitely-not-here")
