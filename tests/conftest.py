"""Shared test fixtures: tiny random BLOOM checkpoints written by transformers, inputs, tolerances.

transformers 4.37.2 is the oracle here and nowhere else: it builds and saves the checkpoints, and
the parity tests load the same folder into both libraries. Tests never touch the network.
"""

from __future__ import annotations

import os

# Before anything can import huggingface_hub/transformers: a hub name in a test must fail fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny test models compile about twice as fast with XLA's cheaper optimisation passes; numbers are
# unchanged at the tests' tolerances. Set before any test module imports jax.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

import fcntl  # noqa: E402
import io  # noqa: E402
import pathlib  # noqa: E402
import pty  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import termios  # noqa: E402
from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import bloomlm  # noqa: E402
from bloomlm.cli import main  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Tolerances (SPEC "Tolerances"): max|ours - ref| <= tol * max(1, max|ref|) over non-padding
# positions.
FP32_TOL = 1e-5  # PyTorch fp32 against transformers
GRAD_TOL = 1e-4  # gradients (SPEC)
# Half precision, ours vs transformers at the same dtype: the bound is the size of half-precision
# rounding itself, measured as transformers' half run against its own fp32 run on these tiny models
# (bf16: 1.2e-2 .. 2.3e-2, fp16: 1.1e-3 .. 2.8e-3 of max|logits|), with headroom. Any reordering of
# a reduction may move results by ulps that grow through the layers; a real bug (a dropped bias, a
# wrong mask) is O(1) and fails. (bloomlm as of 93af5f9 is bit-identical to transformers here.)
BF16_TOL = 4e-2
FP16_TOL = 5e-3

SEED = 1234
PAD_ID, BOS_ID, EOS_ID = 3, 1, 2
FIRST_WORD_ID = 4  # random ids are drawn from [FIRST_WORD_ID, vocab_size): never a special token

ARCHS = (
    "BloomModel",
    "BloomForCausalLM",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
)

_COMMON = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
TINY_CONFIGS: dict[str, dict] = {
    "pow2": dict(vocab_size=128, hidden_size=32, n_layer=2, n_head=4, **_COMMON),
    # 3 heads: ALiBi slopes take the non-power-of-two branch; 3 layers
    "odd_heads": dict(vocab_size=160, hidden_size=24, n_layer=3, n_head=3, **_COMMON),
    "untied": dict(
        vocab_size=128, hidden_size=32, n_layer=2, n_head=4, tie_word_embeddings=False, **_COMMON
    ),
    "tp2_exact": dict(
        vocab_size=128,
        hidden_size=32,
        n_layer=2,
        n_head=4,
        pretraining_tp=2,
        slow_but_exact=True,
        **_COMMON,
    ),
    "tp2_fast": dict(
        vocab_size=128,
        hidden_size=32,
        n_layer=2,
        n_head=4,
        pretraining_tp=2,
        slow_but_exact=False,
        **_COMMON,
    ),
    # 6 heads (not a power of two either) with the residual taken after the layer norms
    "post_ln": dict(
        vocab_size=128,
        hidden_size=48,
        n_layer=2,
        n_head=6,
        apply_residual_connection_post_layernorm=True,
        **_COMMON,
    ),
    "bf16": dict(
        vocab_size=128, hidden_size=32, n_layer=2, n_head=4, torch_dtype="bfloat16", **_COMMON
    ),
}

_SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def assert_close(
    ours, ref, tol: float, mask=None, name: str = "", check_dtype: bool = True
) -> None:
    """SPEC's "same numbers": max|ours - ref| <= tol * max(1, max|ref|) over the positions in
    `mask`.

    `mask` (optional, bool or 0/1) selects the positions to compare; it is broadcast against the
    tensors after appending trailing singleton dimensions, so a [B, T] padding mask works for
    [B, T, C] hidden states.
    """
    label = f"{name}: " if name else ""
    assert isinstance(ours, torch.Tensor), (
        f"{label}ours is {type(ours).__name__}, expected a tensor"
    )
    assert isinstance(ref, torch.Tensor), (
        f"{label}reference is {type(ref).__name__}, expected a tensor"
    )
    shapes = f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert tuple(ours.shape) == tuple(ref.shape), f"{label}{shapes}"
    if check_dtype:
        assert ours.dtype == ref.dtype, f"{label}dtype {ours.dtype} != reference {ref.dtype}"
    ours64 = ours.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if mask is None:
        select = torch.ones(ref64.shape, dtype=torch.bool)
    else:
        select = torch.as_tensor(mask).to("cpu").bool()
        while select.dim() < ref64.dim():
            select = select.unsqueeze(-1)
        select = select.expand(ref64.shape)
    assert select.any(), f"{label}the mask selects no position: nothing would be checked"
    assert torch.isfinite(ref64[select]).all(), f"{label}reference has non-finite values"
    diff = torch.where(select, (ours64 - ref64).abs(), torch.zeros(()).double())
    diff = torch.where(torch.isnan(diff), torch.full((), float("inf")).double(), diff)
    max_ref = ref64[select].abs().max().item()
    allowed = tol * max(1.0, max_ref)
    max_diff = diff.max().item()
    if max_diff <= allowed:
        return
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    raise AssertionError(
        f"{label}max|ours - ref| = {max_diff:.3e} > {allowed:.3e}"
        f" (tol {tol:g} * max(1, max|ref| = {max_ref:.3g}))"
        f" at index {where}: ours {ours64[where].item():.6g}, ref {ref64[where].item():.6g};"
        f" {int((diff > allowed).sum())} of {int(select.sum())} compared elements out of tolerance"
    )


def randomize_(model: torch.nn.Module, seed: int = SEED) -> None:
    """Give every parameter random values, so no bias is 0 and no LayerNorm is the identity.

    Parameters are visited in `named_parameters()` order with one generator, so for a given config
    the body (`transformer.*`) gets the same values whatever head sits on top. Linear weights have
    std 1/sqrt(fan_in), the fused QKV twice that (attention scores of std ~4: far from uniform, so a
    wrong mask or ALiBi shows); embeddings std 0.5.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "layernorm" in name or "ln_f" in name:
                value = 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif "word_embeddings" in name:
                value = 0.5 * noise
            else:  # Linear weight [out, in]
                scale = 2.0 if "query_key_value" in name else 1.0
                value = scale * noise / param.shape[-1] ** 0.5
            param.copy_(value.to(param.dtype))


def build_reference(config_name: str, arch: str = "BloomForCausalLM", **config_overrides):
    """A transformers model of `arch` for TINY_CONFIGS[config_name] with every tensor randomised."""
    import transformers

    kwargs = {**TINY_CONFIGS[config_name], **config_overrides}
    save_dtype = _SAVE_DTYPES.get(kwargs.pop("torch_dtype", None))
    config = transformers.BloomConfig(**kwargs)
    torch.manual_seed(SEED)
    model = getattr(transformers, arch)(config)
    randomize_(model)
    if save_dtype is not None:
        model = model.to(save_dtype)  # save_pretrained then writes torch_dtype into config.json
    return model.eval()


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[..., pathlib.Path]:
    """`(config_name, arch="BloomForCausalLM", **config_overrides) -> folder` written by
    transformers.

    Cached for the session: the same arguments give the same folder. Treat folders as read-only.
    """
    cache: dict[tuple, pathlib.Path] = {}

    def make(config_name: str, arch: str = "BloomForCausalLM", **config_overrides) -> pathlib.Path:
        key = (config_name, arch, tuple(sorted((k, repr(v)) for k, v in config_overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{config_name}-{arch}")
            build_reference(config_name, arch, **config_overrides).save_pretrained(folder)
            cache[key] = folder
        return cache[key]

    return make


def make_inputs(
    vocab_size: int, padding: str = "none", batch: int = 3, seq: int = 7, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `input_ids` [batch, seq] (no special ids) and `attention_mask` [batch, seq].

    `padding`: "none" (mask all ones), "left" or "right": row i keeps seq - 2*i tokens (row 0 is
    never padded) and the rest are `PAD_ID` with mask 0 on that side.
    """
    if padding not in ("none", "left", "right"):
        raise ValueError(f"padding must be 'none', 'left' or 'right', not {padding!r}")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if padding != "none":
        for row in range(1, batch):
            n_pad = min(2 * row, seq - 1)
            span = slice(0, n_pad) if padding == "left" else slice(seq - n_pad, seq)
            attention_mask[row, span] = 0
            input_ids[row, span] = PAD_ID
    return input_ids, attention_mask


@pytest.fixture
def inputs() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The `make_inputs` helper as a fixture."""
    return make_inputs


# ---------------------------------------------------------------------------------------------
# Ours vs transformers: loading pairs and comparing whole outputs.


def ours_cls(arch: str) -> type:
    import bloomlm

    return getattr(bloomlm, arch)


def ref_cls(arch: str) -> type:
    import transformers

    return getattr(transformers, arch)


def reference_overrides(config_name: str) -> dict:
    """What transformers must be told to give the correct answer for a config.

    transformers 4.37 with pretraining_tp > 1 and slow_but_exact=True never adds
    self_attention.dense.bias and mlp.dense_4h_to_h.bias (a defect bloomlm does not copy); the same
    weights with slow_but_exact=False are the right answer (equal up to summation order).
    """
    config = TINY_CONFIGS[config_name]
    defective = config.get("pretraining_tp", 1) > 1 and config.get("slow_but_exact", False)
    return {"slow_but_exact": False} if defective else {}


@pytest.fixture(scope="session")
def load_pair(make_checkpoint) -> Callable[..., tuple[torch.nn.Module, torch.nn.Module]]:
    """`(config_name, arch, load=None, **checkpoint_overrides) -> (ours, reference)` in eval mode.

    Both come from the same transformers-written folder; `load` is passed to both
    `from_pretrained` calls. Cached for the session: callers must not mutate the models (tests that
    train, backprop or change the config load their own).
    """
    cache: dict[tuple, tuple[torch.nn.Module, torch.nn.Module]] = {}

    def load(config_name: str, arch: str, load: dict | None = None, **checkpoint_overrides):
        load = dict(load or {})
        key = (
            config_name,
            arch,
            repr(sorted(load.items())),
            repr(sorted(checkpoint_overrides.items())),
        )
        if key not in cache:
            folder = make_checkpoint(config_name, arch, **checkpoint_overrides)
            ours = ours_cls(arch).from_pretrained(folder, **load)
            ref = ref_cls(arch).from_pretrained(
                folder, **{**load, **reference_overrides(config_name)}
            )
            cache[key] = (ours.eval(), ref.eval())
        return cache[key]

    return load


def forward_kwargs(arch: str, use_cache: bool | None = True, **kwargs) -> dict:
    """Keyword arguments for `arch`'s forward: QA takes no cache arguments."""
    if arch != "BloomForQuestionAnswering" and use_cache is not None:
        kwargs["use_cache"] = use_cache
    return kwargs


# Output fields of each class, in transformers' order (which is also the return_dict=False order).
OUTPUT_FIELDS = {
    "BloomModel": ("last_hidden_state", "past_key_values", "hidden_states", "attentions"),
    "BloomForCausalLM": ("loss", "logits", "past_key_values", "hidden_states", "attentions"),
    "BloomForSequenceClassification": (
        "loss",
        "logits",
        "past_key_values",
        "hidden_states",
        "attentions",
    ),
    "BloomForTokenClassification": ("loss", "logits", "hidden_states", "attentions"),
    "BloomForQuestionAnswering": (
        "loss",
        "start_logits",
        "end_logits",
        "hidden_states",
        "attentions",
    ),
}
# The field holding one value per token (compared where the query mask is 1); the sequence
# classifier's logits are pooled, one row per sequence.
PER_TOKEN_FIELDS = {
    "BloomModel": ("last_hidden_state",),
    "BloomForCausalLM": ("logits",),
    "BloomForSequenceClassification": (),
    "BloomForTokenClassification": ("logits",),
    "BloomForQuestionAnswering": ("start_logits", "end_logits"),
}
MAIN_FIELD = {
    "BloomModel": "last_hidden_state",
    "BloomForCausalLM": "logits",
    "BloomForSequenceClassification": "logits",
    "BloomForTokenClassification": "logits",
    "BloomForQuestionAnswering": "start_logits",
}


def assert_cache_close(ours, ref, tol: float, kv_mask=None, name: str = "past_key_values") -> None:
    """Caches in BLOOM's layout, per layer key [B*H, D, S] and value [B*H, S, D];
    `kv_mask` [B, S]."""
    assert isinstance(ours, (tuple, list)), (
        f"{name}: {type(ours).__name__}, expected a tuple of layers"
    )
    assert len(ours) == len(ref), f"{name}: {len(ours)} layers, reference {len(ref)}"
    for layer, (ours_layer, ref_layer) in enumerate(zip(ours, ref)):
        assert len(ours_layer) == 2, (
            f"{name}[{layer}]: {len(ours_layer)} entries, expected (key, value)"
        )
        key_mask = value_mask = None
        if kv_mask is not None:
            batch = kv_mask.shape[0]
            per_row = kv_mask.bool().repeat_interleave(
                ref_layer[0].shape[0] // batch, dim=0
            )  # [B*H, S]
            key_mask, value_mask = per_row[:, None, :], per_row
        assert_close(ours_layer[0], ref_layer[0], tol, key_mask, name=f"{name}[{layer}] key")
        assert_close(ours_layer[1], ref_layer[1], tol, value_mask, name=f"{name}[{layer}] value")


def compare_outputs(
    ours,
    ref,
    arch: str,
    tol: float = FP32_TOL,
    query_mask=None,
    kv_mask=None,
    check_dtype: bool = True,
) -> None:
    """Every field of `arch`'s output: same presence, shapes and values (padding excluded).

    `query_mask` [B, T] selects the query positions of per-token outputs, hidden states and
    attention rows; `kv_mask` [B, S] the cache positions.
    """
    checked = 0
    for field in OUTPUT_FIELDS[arch]:
        ref_value, ours_value = getattr(ref, field, None), getattr(ours, field, None)
        if ref_value is None:
            assert ours_value is None, (
                f"{field}: ours returned a value where transformers returns None"
            )
            continue
        assert ours_value is not None, (
            f"{field}: ours returned None where transformers returns a value"
        )
        checked += 1
        if field == "past_key_values":
            assert_cache_close(ours_value, ref_value, tol, kv_mask)
        elif field in ("hidden_states", "attentions"):
            assert isinstance(ours_value, tuple), (
                f"{field}: {type(ours_value).__name__}, expected a tuple"
            )
            lengths = f"{field}: {len(ours_value)} entries, reference {len(ref_value)}"
            assert len(ours_value) == len(ref_value), lengths
            mask = query_mask
            if field == "attentions" and query_mask is not None:
                mask = query_mask.bool()[
                    :, None, :, None
                ]  # rows of padding queries are not compared
            for i, (o, r) in enumerate(zip(ours_value, ref_value)):
                assert_close(o, r, tol, mask, name=f"{field}[{i}]", check_dtype=check_dtype)
        else:
            mask = query_mask if field in PER_TOKEN_FIELDS[arch] else None
            assert_close(ours_value, ref_value, tol, mask, name=field, check_dtype=check_dtype)
    assert checked > 0


def assert_tree_close(ours, ref, tol: float = FP32_TOL, name: str = "output") -> None:
    """Nested tuples of tensors: same structure (lengths, None positions) and values."""
    if isinstance(ref, torch.Tensor):
        assert_close(ours, ref, tol, name=name)
    elif isinstance(ref, (tuple, list)):
        assert isinstance(ours, (tuple, list)), f"{name}: {type(ours).__name__}, expected a tuple"
        assert len(ours) == len(ref), f"{name}: length {len(ours)}, expected {len(ref)}"
        for i, (o, r) in enumerate(zip(ours, ref)):
            assert_tree_close(o, r, tol, f"{name}[{i}]")
    else:
        assert ours == ref, f"{name}: {ours!r} != {ref!r}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core machine they cost ~5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# CLI tests: the real `bloomlm` command in a subprocess (`run`), the same `main` in this process
# for cheap output-format variants (`call`), and tiny model folders (`tiny`). `run(...,
# block=("torch",))` runs the command with those modules unimportable: that proves a command never
# imports them (argument errors, --help, info), or shows what a user without them (jax) sees.

FIXTURE_TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"
PACKAGE_ROOT = str(pathlib.Path(bloomlm.__file__).resolve().parent.parent)
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",  # tiny models: threads only add overhead on a busy machine
    "HF_HUB_OFFLINE": "1",
}


ENTRY_POINT = "from bloomlm.cli import main; sys.exit(main())"


@pytest.fixture(scope="session")
def console_script(tmp_path_factory) -> list[str]:
    installed = pathlib.Path(sys.executable).parent / "bloomlm"
    if installed.is_file():
        return [str(installed)]
    wrapper = tmp_path_factory.mktemp("bin") / "bloomlm"
    wrapper.write_text(f"#!{sys.executable}\nimport sys\n{ENTRY_POINT}\n")
    wrapper.chmod(0o755)
    return [str(wrapper)]


@pytest.fixture
def run(console_script, tmp_path):
    def run(
        *args: str,
        stdin: str | None = None,
        ok: bool = True,
        block: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        command = [*console_script, *args]
        if block:  # the same entry point, with `block` unimportable (None in sys.modules)
            setup = f"import sys; sys.modules.update(dict.fromkeys({list(block)!r}))"
            command = [sys.executable, "-c", f"{setup}; {ENTRY_POINT}", *args]
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            env=env or ENV,
            cwd=tmp_path,
            timeout=120,
        )
        if ok:
            assert result.returncode == 0, result.stderr
        return result

    return run


@pytest.fixture
def call(capsys, monkeypatch, tmp_path):
    """`bloomlm.cli.main(args)` in this process: (exit status, stdout, stderr)."""

    def call(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        monkeypatch.chdir(tmp_path)
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return call


def assert_one_line_error(
    result: subprocess.CompletedProcess, fragment: str, status: int = 1
) -> None:
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """Tiny random folders for each head, with the fixture tokenizer and named labels."""
    tokenizer = bloomlm.AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    folders = {}
    heads = {
        "lm": (bloomlm.BloomForCausalLM, {}),
        "cls": (
            bloomlm.BloomForSequenceClassification,
            {"id2label": {0: "negative", 1: "neutral", 2: "positive"}},
        ),
        "tag": (
            bloomlm.BloomForTokenClassification,
            {"id2label": {0: "O", 1: "B-PER", 2: "B-LOC"}},
        ),
        "qa": (bloomlm.BloomForQuestionAnswering, {}),
    }
    for name, (model_class, overrides) in heads.items():
        if "id2label" in overrides:
            overrides = {**overrides, "label2id": {v: k for k, v in overrides["id2label"].items()}}
            overrides["num_labels"] = len(overrides["id2label"])
        config = bloomlm.BloomConfig(
            vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides,
        )  # fmt: skip
        torch.manual_seed(len(folders))
        model = model_class(config)
        for (
            parameter
        ) in model.parameters():  # larger weights than the init, so outputs differ clearly
            torch.nn.init.normal_(parameter, std=0.5)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


def on_a_terminal(command: list[str], cwd: pathlib.Path) -> str:
    """Run `command` with stdout and stderr on one pseudo-terminal; everything it wrote."""
    leader, follower = pty.openpty()
    # 80 columns, as a terminal has (a new pseudo-terminal has 0, and tqdm then draws nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(
        command, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=ENV, cwd=cwd
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=120) == 0
    os.close(leader)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def generate_alone(tiny: tuple, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """The continuation `model.generate` gives `prompt` alone, `tiny` = (model, tokenizer): what
    a server (one process or split) must return for the same request."""
    model, tokenizer = tiny
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, **kwargs)[0, ids.shape[1] :]
    return tokenizer.decode(out, skip_special_tokens=True)
