"""Training and housekeeping features: gradient checkpointing, embeddings, dropout, dtypes,
loading keywords."""

import json

import pytest
import torch
from safetensors import safe_open

from bloomlm import BloomConfig, BloomForCausalLM, BloomForSequenceClassification, BloomModel

CONFIG = dict(vocab_size=64, hidden_size=16, n_layer=2, n_head=4, pad_token_id=3)


def _model(cls=BloomForCausalLM, **overrides):
    torch.manual_seed(0)
    model = cls(BloomConfig(**{**CONFIG, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_gradient_checkpointing_recomputes_and_gives_equal_gradients():
    ids = torch.randint(0, 64, (2, 6))
    grads, calls = [], []
    for enabled in (False, True):
        model = _model().train()
        if enabled:
            model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing == enabled
        counter = []
        # a pre-hook: recomputation may stop early, right after the last activation the backward
        # needs
        model.transformer.h[0].input_layernorm.register_forward_pre_hook(
            lambda *_, c=counter: c.append(1)
        )
        loss = model(ids, labels=ids).loss
        forward_calls = len(counter)
        loss.backward()
        calls.append((forward_calls, len(counter)))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls[0] == (1, 1)  # no recomputation without checkpointing
    assert calls[1] == (1, 2)  # the block ran again in the backward pass
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_checkpointing_turns_the_cache_off_in_training():
    model = _model().train()
    model.gradient_checkpointing_enable()
    assert model(torch.randint(0, 64, (1, 4)), use_cache=True).past_key_values is None


def test_resize_token_embeddings_keeps_the_tie(tmp_path):
    model = _model()
    old = model.get_input_embeddings().weight.detach().clone()
    new = model.resize_token_embeddings(70)
    assert new.num_embeddings == 70 and model.config.vocab_size == 70
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    torch.testing.assert_close(new.weight[:64].detach(), old)
    assert model.resize_token_embeddings(65, pad_to_multiple_of=8).num_embeddings == 72
    assert model(torch.tensor([[71]])).logits.shape == (1, 1, 72)
    model.save_pretrained(tmp_path)
    assert BloomForCausalLM.from_pretrained(tmp_path).config.vocab_size == 72


def test_resize_untied_head_grows_too():
    model = _model(tie_word_embeddings=False)
    model.resize_token_embeddings(80)
    assert model.get_output_embeddings().weight.shape == (80, 16)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_set_input_and_output_embeddings():
    model = _model(tie_word_embeddings=False)
    emb = torch.nn.Embedding(64, 16)
    model.set_input_embeddings(emb)
    assert model.get_input_embeddings() is emb and model.transformer.word_embeddings is emb
    head = torch.nn.Linear(16, 64, bias=False)
    model.set_output_embeddings(head)
    assert model.get_output_embeddings() is head
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is emb.weight


def test_dropout_only_in_training():
    model = _model(hidden_dropout=0.3, attention_dropout=0.3)
    ids = torch.randint(0, 64, (2, 6))
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_tied_head_stored_once_and_loading_keywords_not_in_config(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "lm_head.weight" not in keys and "transformer.word_embeddings.weight" in keys
    # written atomically, yet with the permissions of a plain file (safetensors alone makes them
    # 0600)
    assert (tmp_path / "model.safetensors").stat().st_mode == (
        tmp_path / "config.json"
    ).stat().st_mode
    loaded = BloomForCausalLM.from_pretrained(
        tmp_path, low_cpu_mem_usage=True, device_map="cpu", local_files_only=True,
        use_safetensors=True, revision="main", cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight
    assert not loaded.training
    written = json.loads((tmp_path / "config.json").read_text())
    loaded.save_pretrained(tmp_path / "again")
    rewritten = json.loads((tmp_path / "again" / "config.json").read_text())
    for key in (
        "low_cpu_mem_usage",
        "device_map",
        "local_files_only",
        "use_safetensors",
        "revision",
        "cache_dir",
    ):
        assert key not in written and key not in rewritten and not hasattr(loaded.config, key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_dtype_explicit_and_auto(tmp_path, dtype):
    model = _model()
    model.to(dtype).save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "config.json").read_text())["torch_dtype"]
        == str(dtype).split(".")[1]
    )
    assert (
        BloomForCausalLM.from_pretrained(tmp_path).dtype == torch.float32
    )  # transformers' default
    auto = BloomForCausalLM.from_pretrained(tmp_path, torch_dtype="auto")
    assert auto.dtype == dtype and all(p.dtype == dtype for p in auto.parameters())
    out = auto(torch.randint(0, 64, (1, 5)), output_attentions=True)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert (
        BloomForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).dtype == torch.float32
    )


def test_auto_dtype_without_config_dtype_is_float32(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("torch_dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert BloomForCausalLM.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.float32


def test_num_parameters_options():
    model = _model(BloomModel)
    total = model.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == total - 64 * 16
    model.word_embeddings.weight.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == total - 64 * 16


def test_problem_type_decided_per_call_and_config_untouched():
    model = _model(BloomForSequenceClassification, num_labels=3).eval()
    ids = torch.randint(4, 64, (2, 5))
    int_loss = model(ids, labels=torch.tensor([0, 2])).loss
    assert model.config.problem_type is None
    float_loss = model(ids, labels=torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])).loss
    assert model.config.problem_type is None
    logits = model(ids).logits
    torch.testing.assert_close(
        int_loss, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    )
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    )
    torch.testing.assert_close(float_loss, expected)
