"""Weight files in and out: what we write transformers 4.37.2 reads, what it writes we read, and
every damaged or hostile file ends in a named CheckpointError / CheckpointNotFoundError."""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
import transformers.utils
from transformers.modeling_utils import shard_checkpoint
from transformers.utils.hub import convert_file_size_to_int

from bloomlm import (
    BloomForCausalLM,
    BloomForSequenceClassification,
    BloomModel,
    checkpoint,
    checkpoint_names,
)
from bloomlm.checkpoint import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    atomic_path,
    atomic_write_text,
    find_weight_files,
    load_numpy_state_dict,
    load_state_dict,
    load_state_dict_file,
    parse_size,
    read_index,
    save_state_dict,
)
from bloomlm.errors import CheckpointError, CheckpointNotFoundError
from bloomlm.hub import HUB_KEYWORDS, resolve_model_dir, select_hub_files

# The tiny model's weights take ~30 KB, so this gives 3 shards (transformers' own save uses the same
# size).
SHARD_SIZE = "12KB"
FORMATS = {
    True: (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME),
    False: (WEIGHTS_NAME, WEIGHTS_INDEX_NAME),
}


@pytest.fixture(scope="module")
def theirs() -> transformers.BloomForCausalLM:
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=4)
    return transformers.BloomForCausalLM(config).eval()


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as save_pretrained writes it:
    the tied LM head is the embedding, written once."""
    state_dict = model.state_dict()
    del state_dict["lm_head.weight"]
    return state_dict


def assert_same_tensors(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
    assert len(expected) > 0


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- round trips with transformers -----------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("shard_size", ["5GB", SHARD_SIZE], ids=["single", "sharded"])
def test_transformers_reads_what_we_write(theirs, tmp_path, safe, shard_size):
    written = save_state_dict(
        untied_state_dict(theirs), tmp_path, safe_serialization=safe, max_shard_size=shard_size
    )
    theirs.config.save_pretrained(tmp_path)

    single_name, index_name = FORMATS[safe]
    if shard_size == "5GB":
        assert [p.name for p in written] == [single_name]
    else:
        assert len(written) == 4 and written[-1].name == index_name
    reloaded = transformers.BloomForCausalLM.from_pretrained(tmp_path, use_safetensors=safe)
    assert_same_tensors(reloaded.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("shard_size", ["5GB", SHARD_SIZE], ids=["single", "sharded"])
def test_we_read_what_transformers_writes(theirs, tmp_path, safe, shard_size):
    theirs.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size=shard_size)

    single_name, index_name = FORMATS[safe]
    expected_first = single_name if shard_size == "5GB" else index_name
    assert (tmp_path / expected_first).is_file()
    # transformers drops the tied head only for safetensors; torch.save keeps it (sharing the
    # embedding).
    expected = untied_state_dict(theirs) if safe else theirs.state_dict()
    assert_same_tensors(load_state_dict(tmp_path), expected)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_sharded_layout_and_index_match_transformers(theirs, tmp_path, safe):
    theirs.save_pretrained(tmp_path / "theirs", safe_serialization=safe, max_shard_size=SHARD_SIZE)
    save_state_dict(
        untied_state_dict(theirs),
        tmp_path / "ours",
        safe_serialization=safe,
        max_shard_size=SHARD_SIZE,
    )

    weight_files = {"theirs": set(), "ours": set()}
    for side in weight_files:
        weight_files[side] = {
            p.name for p in (tmp_path / side).iterdir() if not p.name.endswith("config.json")
        }
    assert weight_files["ours"] == weight_files["theirs"]
    index_name = FORMATS[safe][1]
    ours_text = (tmp_path / "ours" / index_name).read_text()
    theirs_text = (tmp_path / "theirs" / index_name).read_text()
    if safe:
        assert ours_text == theirs_text  # byte for byte, total_size included
    else:
        # torch.save also lists the tied head, stored once with the embedding (not counted in
        # total_size)
        theirs_index = json.loads(theirs_text)
        assert (
            theirs_index["weight_map"].pop("lm_head.weight") == "pytorch_model-00001-of-00003.bin"
        )
        assert json.loads(ours_text) == theirs_index
    assert len(set(read_index(tmp_path / "ours" / index_name).values())) == 3


def test_safetensors_metadata_says_pt(theirs, tmp_path):
    (path,) = save_state_dict(untied_state_dict(theirs), tmp_path)
    with safetensors.safe_open(str(path), framework="pt") as reader:
        assert reader.metadata() == {"format": "pt"}


def test_old_non_zip_bin_is_read(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3)}
    torch.save(tensors, tmp_path / WEIGHTS_NAME, _use_new_zipfile_serialization=False)
    assert_same_tensors(load_state_dict(tmp_path), tensors)


# -- shared memory, views, dtypes ------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_views_and_shared_storage_are_written_in_full(tmp_path, safe):
    base = torch.arange(4000, dtype=torch.float32).reshape(40, 100)
    state_dict = {
        "tied.a": base,
        "tied.b": base,  # the very same tensor twice
        "row": base[3],  # a view into a larger storage
        "transposed": base[:2, :3].t(),  # not contiguous
        "bf16": torch.ones(3, dtype=torch.bfloat16),
    }
    save_state_dict(state_dict, tmp_path, safe_serialization=safe)

    assert_same_tensors(load_state_dict(tmp_path), {k: v.clone() for k, v in state_dict.items()})
    (weights,) = find_weight_files(tmp_path)
    assert (
        weights.stat().st_size < 3 * base.numel() * 4
    )  # views did not drag their base storage along


def test_non_tensor_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="'step'"):
        save_state_dict({"step": 3}, tmp_path)


def test_numpy_state_dict_matches_torch(theirs, tmp_path):
    state_dict = untied_state_dict(theirs) | {"half": torch.ones(2, dtype=torch.bfloat16)}
    save_state_dict(state_dict, tmp_path / "safe")
    save_state_dict(
        state_dict, tmp_path / "bin", safe_serialization=False, max_shard_size=SHARD_SIZE
    )
    for folder in ("safe", "bin"):
        arrays = load_numpy_state_dict(tmp_path / folder)
        assert sorted(arrays) == sorted(state_dict)
        for name, tensor in state_dict.items():
            assert isinstance(arrays[name], np.ndarray)
            np.testing.assert_array_equal(
                np.asarray(arrays[name], dtype=np.float32), tensor.float().numpy()
            )


# -- parse_size ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", ["5GB", "10MB", "200KB", "200KiB", "1MiB", "2GiB", "5Gb", "8kb", "3mb", 1234]
)
def test_parse_size_agrees_with_transformers(size):
    assert parse_size(size) == convert_file_size_to_int(size)


def test_parse_size_units():
    assert parse_size("10MB") == 10_000_000
    assert parse_size("200KiB") == 200 * 1024
    assert parse_size("5GB") == 5 * 10**9


@pytest.mark.parametrize(
    "size", ["5", "GB", "1.5GB", "-1MB", "0MB", "ten MB", 0, -3, True, 2.5, None]
)
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="size"):
        parse_size(size)


# -- damaged files ---------------------------------------------------------------------------------


def test_truncated_safetensors(theirs, tmp_path):
    (path,) = save_state_dict(untied_state_dict(theirs), tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_state_dict(tmp_path)
    assert str(path) in str(info.value)


def test_truncated_bin(theirs, tmp_path):
    (path,) = save_state_dict(untied_state_dict(theirs), tmp_path, safe_serialization=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_state_dict(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", [SAFE_WEIGHTS_NAME, WEIGHTS_NAME])
@pytest.mark.parametrize(
    "data", [os.urandom(500), b"", b"PK\x03\x04" + os.urandom(200)], ids=["random", "empty", "zip"]
)
def test_random_bytes(tmp_path, name, data):
    path = write(tmp_path / name, data)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(tmp_path)
    assert str(path) in str(info.value) and "corrupt" in str(info.value)


def test_bin_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_state_dict(tmp_path)


class _RunsCode:
    """Unpickling this calls os.system; a safe loader must refuse before anything runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_bin_never_runs(tmp_path, writer):
    marker = tmp_path / "PWNED"
    payload = {"transformer.ln_f.weight": torch.ones(2), "evil": _RunsCode(marker)}
    path = tmp_path / "model" / WEIGHTS_NAME
    path.parent.mkdir()
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))

    with pytest.raises(CheckpointError, match="never executes") as info:
        load_state_dict(path.parent)
    assert str(path) in str(info.value)
    if writer == "torch.save":  # a well-formed file: torch names the global it refused
        assert "posix.system" in str(info.value) or "nt.system" in str(info.value)
    assert not marker.exists()


def test_bad_index_json(tmp_path):
    path = write(tmp_path / SAFE_WEIGHTS_INDEX_NAME, b'{"weight_map": {"a": ')
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_state_dict(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content", [[], {"metadata": {}}, {"weight_map": {"a": 3}}, {"weight_map": {}}]
)
def test_index_without_usable_weight_map(tmp_path, content):
    write(tmp_path / WEIGHTS_INDEX_NAME, json.dumps(content).encode())
    with pytest.raises(CheckpointError, match=WEIGHTS_INDEX_NAME.replace(".", r"\.")):
        load_state_dict(tmp_path)


def test_index_pointing_at_missing_shard(theirs, tmp_path):
    save_state_dict(untied_state_dict(theirs), tmp_path, max_shard_size=SHARD_SIZE)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00003.safetensors"):
        load_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError):  # CheckpointNotFoundError is one, as callers may expect
        find_weight_files(tmp_path)


def test_index_escaping_its_folder_is_refused(tmp_path):
    write(tmp_path / "elsewhere.safetensors", b"")
    write(
        tmp_path / "model" / SAFE_WEIGHTS_INDEX_NAME,
        b'{"weight_map": {"a": "../elsewhere.safetensors"}}',
    )
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_state_dict(tmp_path / "model")


def test_index_listing_tensor_its_shard_lacks(theirs, tmp_path):
    save_state_dict(untied_state_dict(theirs), tmp_path, max_shard_size=SHARD_SIZE)
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    index["weight_map"]["transformer.ghost.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="transformer.ghost.weight"):
        load_state_dict(tmp_path)


def test_missing_single_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_state_dict_file(tmp_path / SAFE_WEIGHTS_NAME)


# -- which files are found -------------------------------------------------------------------------


def test_priority_and_use_safetensors(tmp_path):
    safetensors.torch.save_file({"w": torch.zeros(1)}, str(tmp_path / SAFE_WEIGHTS_NAME))
    torch.save({"w": torch.ones(1)}, tmp_path / WEIGHTS_NAME)

    assert find_weight_files(tmp_path) == [tmp_path / SAFE_WEIGHTS_NAME]
    assert find_weight_files(tmp_path, use_safetensors=False) == [tmp_path / WEIGHTS_NAME]
    assert load_state_dict(tmp_path, use_safetensors=False)["w"].item() == 1.0
    (tmp_path / SAFE_WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointNotFoundError, match="use_safetensors=True") as info:
        find_weight_files(tmp_path, use_safetensors=True)
    assert SAFE_WEIGHTS_INDEX_NAME in str(info.value)


def test_nothing_found_names_folder_and_candidates(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as info:
        load_state_dict(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
        assert name in message


def test_only_flax_weights_is_said(tmp_path):
    write(tmp_path / "flax_model.msgpack", b"\x80")
    with pytest.raises(CheckpointNotFoundError, match="only Flax weights found"):
        find_weight_files(tmp_path)


def test_file_instead_of_folder(tmp_path):
    path = write(tmp_path / SAFE_WEIGHTS_NAME, b"")
    with pytest.raises(CheckpointNotFoundError, match="not a folder"):
        load_state_dict(path)


# -- atomic saving and cleanup ---------------------------------------------------------------------


def _fail_after_partial_write(calls_before_failure: int):
    real_save = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) <= calls_before_failure:
            return real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    return save_file


@pytest.mark.parametrize("calls_before_failure", [0, 1], ids=["first-file", "second-shard"])
def test_failed_save_leaves_earlier_files_untouched(
    theirs, tmp_path, monkeypatch, calls_before_failure
):
    save_state_dict(untied_state_dict(theirs), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(
        safetensors.torch, "save_file", _fail_after_partial_write(calls_before_failure)
    )

    with pytest.raises(OSError, match="disk full"):
        save_state_dict(
            {"other": torch.ones(4000)} | untied_state_dict(theirs), tmp_path, max_shard_size="16KB"
        )

    assert {
        p.name: p.read_bytes() for p in tmp_path.iterdir()
    } == before  # no temporaries, no new shards


def test_atomic_write_text(tmp_path):
    target = write(tmp_path / "config.json", b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("new, half written")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]

    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓" and os.listdir(tmp_path) == ["config.json"]


def test_stale_weight_files_are_removed_and_nothing_else(theirs, tmp_path):
    state_dict = untied_state_dict(theirs)
    keep = [
        "config.json",
        "README.md",
        "flax_model.msgpack",
        "model-notes.txt",
        "my_model.safetensors",
    ]
    for name in keep:
        write(tmp_path / name, b"x")

    save_state_dict(state_dict, tmp_path, max_shard_size="8KB")
    assert len(list(tmp_path.glob("model-*-of-00005.safetensors"))) == 5
    save_state_dict(state_dict, tmp_path, max_shard_size=SHARD_SIZE)
    assert {p.name for p in tmp_path.glob("model-*.safetensors")} == {
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    }
    assert_same_tensors(load_state_dict(tmp_path), state_dict)

    save_state_dict(state_dict, tmp_path)  # single file: shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + [SAFE_WEIGHTS_NAME])

    save_state_dict(state_dict, tmp_path, safe_serialization=False, max_shard_size=SHARD_SIZE)
    # The old model.safetensors would otherwise shadow the new .bin shards when loading.
    assert not (tmp_path / SAFE_WEIGHTS_NAME).exists()
    assert find_weight_files(tmp_path)[0].name == "pytorch_model-00001-of-00003.bin"
    assert all((tmp_path / name).read_bytes() == b"x" for name in keep)


# -- resolve_model_dir -----------------------------------------------------------------------------


@pytest.fixture
def online(monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    # The hub answers bloomlm.hub's reachability probe (the test machine has no network).
    monkeypatch.setattr("bloomlm.hub._hub_silence", lambda hub: None)


def test_local_folder_absolute_relative_and_subfolder(tmp_path, monkeypatch):
    folder = tmp_path / "bigscience" / "bloom-560m"
    (folder / "sub").mkdir(parents=True)
    assert resolve_model_dir(folder, ["config.json"]) == folder
    assert resolve_model_dir(str(folder), ["config.json"], subfolder="sub") == folder / "sub"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A relative folder that looks like a hub id is still the local folder.
    assert resolve_model_dir("bigscience/bloom-560m", ["config.json"]).resolve() == folder
    with pytest.raises(CheckpointNotFoundError, match="no subfolder 'missing'"):
        resolve_model_dir("bigscience/bloom-560m", ["config.json"], subfolder="missing")


@pytest.mark.parametrize(
    ("variable", "kwargs"),
    [("HF_HUB_OFFLINE", {}), ("TRANSFORMERS_OFFLINE", {}), (None, {"local_files_only": True})],
)
def test_hub_id_offline_fails_fast(tmp_path, monkeypatch, online, variable, kwargs):
    if variable:
        monkeypatch.setenv(variable, "1")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_model_dir(
            "bloomlm-tests/no-such-model",
            ["config.json", SAFE_WEIGHTS_NAME],
            cache_dir=tmp_path / "cache",
            **kwargs,
        )
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "config.json" in message and SAFE_WEIGHTS_NAME in message
    assert str(tmp_path / "bloomlm-tests" / "no-such-model") in message
    assert (variable or "local_files_only") in message and "not in the local hub cache" in message


def test_offline_uses_hub_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(snapshot)

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download)
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("org/name", ["config.json"], revision="v1") == snapshot
    assert seen == {"repo_id": "org/name", "local_files_only": True, "revision": "v1"}


def test_hub_download_fetches_one_weight_format(tmp_path, monkeypatch, online):
    repo_files = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "flax_model.msgpack",
        "pytorch_model.bin",
        SAFE_WEIGHTS_INDEX_NAME,
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "onnx/decoder_model.onnx",
    ]
    calls = {}

    class HfApi:
        def list_repo_files(self, repo_id, revision=None, token=None):
            calls["listed"] = (repo_id, revision, token)
            return repo_files

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls["patterns"] = allow_patterns
        calls["kwargs"] = kwargs
        return str(tmp_path)

    monkeypatch.setitem(
        sys.modules,
        "huggingface_hub",
        types.SimpleNamespace(HfApi=HfApi, snapshot_download=snapshot_download),
    )
    monkeypatch.chdir(tmp_path)
    weights = [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME]
    assert resolve_model_dir("bigscience/bloom", weights, use_auth_token="hf_x") == tmp_path
    assert calls["listed"] == ("bigscience/bloom", None, "hf_x")
    assert calls["patterns"] == sorted(
        [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            SAFE_WEIGHTS_INDEX_NAME,
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
    )
    assert calls["kwargs"] == {"token": "hf_x"}


def test_hub_network_error_is_not_found(tmp_path, monkeypatch, online):
    class HfApi:
        def list_repo_files(self, repo_id, revision=None, token=None):
            raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=HfApi))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no route to host") as info:
        resolve_model_dir("org/name", ["config.json"])
    assert isinstance(info.value.__cause__, ConnectionError)


def test_select_hub_files_subfolder_and_bin_fallback():
    repo = [
        "sub/config.json",
        "sub/pytorch_model.bin",
        "sub/deeper/model.safetensors",
        "config.json",
    ]
    weights = [SAFE_WEIGHTS_NAME, WEIGHTS_NAME]
    assert select_hub_files(repo, weights, subfolder="sub") == [
        "sub/config.json",
        "sub/pytorch_model.bin",
    ]
    assert select_hub_files(repo, ["tokenizer.json"]) == []


def test_without_huggingface_hub(tmp_path, monkeypatch, online):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"pip install bloomlm\[hub\]"):
        resolve_model_dir("org/name", ["config.json"])


@pytest.mark.parametrize("name", ["./missing", "a/b/c", "../up", "/definitely/not/here"])
def test_missing_path_that_is_not_a_hub_id(tmp_path, monkeypatch, online, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="Nor is .* a hub model id") as info:
        resolve_model_dir(name, ["config.json"])
    assert str(Path(name).resolve()) in str(info.value) and "config.json" in str(info.value)


def test_file_given_where_folder_expected(tmp_path):
    path = write(tmp_path / "config.json", b"{}")
    with pytest.raises(CheckpointNotFoundError, match="is a file, but a model folder is expected"):
        resolve_model_dir(path, ["config.json"])


def test_hub_keywords_accepted_unknown_refused(tmp_path):
    assert (
        resolve_model_dir(tmp_path, [], **dict.fromkeys(HUB_KEYWORDS - {"subfolder"})) == tmp_path
    )
    with pytest.raises(TypeError, match="torch_dtype"):
        resolve_model_dir(tmp_path, [], torch_dtype="auto")


# -- the names both frameworks share (bloomlm.checkpoint_names) ----------------------------------


def test_weight_file_names_are_transformers():
    names = checkpoint_names
    for name in ("SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME", "WEIGHTS_NAME",
                 "WEIGHTS_INDEX_NAME", "FLAX_WEIGHTS_NAME", "FLAX_WEIGHTS_INDEX_NAME"):  # fmt: skip
        assert getattr(names, name) == getattr(transformers.utils, name), name
    assert names.TF_WEIGHTS_NAME == transformers.utils.TF2_WEIGHTS_NAME
    # the old import places keep working and are the same table
    assert checkpoint.WEIGHT_FILE_CANDIDATES is names.PYTORCH_WEIGHT_FILES
    assert checkpoint.SAFE_WEIGHTS_NAME == names.SAFE_WEIGHTS_NAME == "model.safetensors"
    assert checkpoint.FLAX_WEIGHTS_NAME == names.FLAX_WEIGHTS_NAME == "flax_model.msgpack"


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_shard_file_names_are_transformers(weights_name):
    state_dict = {f"w{i}": torch.zeros(100) for i in range(3)}  # 400 bytes each, one per shard
    theirs, _ = shard_checkpoint(state_dict, max_shard_size=500, weights_name=weights_name)
    ours = [checkpoint_names.shard_file_name(weights_name, i, 3) for i in (1, 2, 3)]
    assert sorted(theirs) == ours
    assert all(checkpoint_names.is_shard_file_name(name, weights_name) for name in ours)
    flax_shard = checkpoint_names.shard_file_name("flax_model.msgpack", 2, 12)
    assert flax_shard == "flax_model-00002-of-00012.msgpack"
    for other in ("model-1-of-3.safetensors", "xmodel-00001-of-00003.safetensors", weights_name):
        assert not checkpoint_names.is_shard_file_name(other, "model.safetensors")


@pytest.mark.parametrize(
    ("name", "sep", "for_head", "for_base"),
    [
        ("h.0.mlp.dense_h_to_4h.weight", ".", "transformer.h.0.mlp.dense_h_to_4h.weight", None),
        ("transformer.ln_f.bias", ".", None, "ln_f.bias"),
        ("lm_head.weight", ".", None, None),  # a head's own weight is never under the prefix
        ("score.weight", ".", None, None),
        # the prefix is a whole name, not leading text
        ("transformers.odd", ".", "transformer.transformers.odd", None),
        ("transformer", ".", None, None),
        ("word_embeddings/embedding", "/", "transformer/word_embeddings/embedding", None),
        ("transformer/h/1/mlp/dense_4h_to_h/kernel", "/", None, "h/1/mlp/dense_4h_to_h/kernel"),
        ("qa_outputs/bias", "/", None, None),
    ],
)
def test_base_prefix_added_and_stripped(name, sep, for_head, for_base):
    for_head, for_base = for_head or name, for_base or name  # None: unchanged
    assert checkpoint_names.add_base_prefix(name, sep) == for_head
    assert checkpoint_names.strip_base_prefix(name, sep) == for_base
    assert checkpoint_names.fit_base_prefix(name, True, sep) == for_head
    assert checkpoint_names.fit_base_prefix(name, False, sep) == for_base


def test_base_checkpoint_into_a_head_and_back(tmp_path):
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=4)
    transformers.BloomModel(config).save_pretrained(tmp_path / "base")
    base_weights = load_state_dict(tmp_path / "base")
    head, info = BloomForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert_same_tensors({k.removeprefix("transformer."): v for k, v in head.state_dict().items()
                         if k != "lm_head.weight"}, base_weights)  # fmt: skip

    classifier = BloomForSequenceClassification.from_pretrained(tmp_path / "base")
    classifier.save_pretrained(tmp_path / "head")
    base, info = BloomModel.from_pretrained(tmp_path / "head", output_loading_info=True)
    assert info["unexpected_keys"] == ["score.weight"] and info["missing_keys"] == []
    assert_same_tensors(base.state_dict(), base_weights)
