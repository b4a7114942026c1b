"""Find the folder a model lives in: a local directory, or a Hugging Face hub id fetched into the
hub cache.

`huggingface_hub` is optional (`pip install bloomlm[hub]`) and imported only here, only when a name
is not a local folder. Offline (`HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE`, or `local_files_only=True`)
only the local hub cache is consulted, so nothing waits on the network. Online, the hub is first
asked one small question with a deadline of HUB_PROBE_SECONDS: a machine that turns out to be
offline is then treated as such (the hub cache, else a one-line error) instead of waiting through
the download's timeouts and retries.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from bloomlm.checkpoint_names import is_shard_file_name
from bloomlm.errors import CheckpointNotFoundError

# transformers' from_pretrained keywords about where files come from. All are accepted so code
# written for transformers runs unchanged; the ones that mean nothing for a local folder are
# ignored.
HUB_KEYWORDS: frozenset[str] = frozenset(
    {
        "cache_dir",
        "revision",
        "local_files_only",
        "token",
        "use_auth_token",
        "force_download",
        "proxies",
        "resume_download",
        "subfolder",
        "trust_remote_code",
        "_from_auto",
        "mirror",
        "_commit_hash",
    }
)

# Files worth fetching with any model whatever was asked for: they are small, and the config and
# tokenizer calls that usually follow then find them in the same snapshot.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)
# Weight files are alternatives (one format is enough), unlike config and tokenizer files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".h5", ".index.json")
# Hub repo ids: "name" or "org/name" (the rule huggingface_hub's validate_repo_id applies).
_REPO_ID = re.compile(r"[\w\-.]+(/[\w\-.]+)?")
_TRUE_VALUES = {"1", "true", "yes", "on"}
HUB_PROBE_SECONDS = 3.0

# Models shipped inside the package (src/bloomlm/assets/<name>/), so the CLI and the README work
# offline. A local folder of the same name wins, as it does for hub ids.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODELS: tuple[str, ...] = ("bloomlm-tiny", "bloomlm-tiny-sentiment")


# Over 40 lines: each way a name can fail to resolve gets its own message.
def resolve_model_dir(
    name_or_path: str | os.PathLike, wanted_files: list[str], **hub_kwargs: Any
) -> Path:
    """The folder holding a model: `name_or_path` itself if it is a directory, else a hub snapshot.

    `wanted_files` are the file names the caller will look for; they are used to choose what to
    download (weight names count as alternatives in priority order) and to word the error when
    nothing is found. Raises `CheckpointNotFoundError` when there is no such folder and the hub
    cannot supply one.
    """
    unknown = sorted(set(hub_kwargs) - HUB_KEYWORDS)
    if unknown:
        raise TypeError(f"unexpected keyword(s) {unknown}; allowed here: {sorted(HUB_KEYWORDS)}")
    subfolder = hub_kwargs.get("subfolder") or ""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _local_folder(path, subfolder, wanted_files)
    if path.exists():
        raise CheckpointNotFoundError(
            f"{path.resolve()} is a file, but a model folder is expected "
            f"(one holding {_names(wanted_files)})"
        )
    name = os.fspath(name_or_path)
    if name in EMBEDDED_MODELS:
        return _embedded_folder(name, subfolder, wanted_files)
    not_local = (
        f"No local folder named '{name}' ({path.resolve()}); looked for {_names(wanted_files)}."
    )
    if not _looks_like_repo_id(name):
        raise CheckpointNotFoundError(
            f"{not_local} Nor is '{name}' a hub model id ('name' or 'org/name')."
        )
    hub = _import_huggingface_hub()
    if hub is None:
        raise CheckpointNotFoundError(
            f"{not_local} The Hugging Face hub was not tried: huggingface_hub is not installed "
            "(pip install bloomlm[hub])."
        )
    offline_reason = _offline_reason(hub_kwargs)
    if offline_reason is not None:
        why_offline = f"{not_local} The hub was not contacted: {offline_reason}"
        return _from_hub_cache(hub, name, wanted_files, hub_kwargs, why_offline)
    silent = _hub_silence(hub)
    if silent is not None:
        why_offline = f"{not_local} The Hugging Face hub is unreachable ({silent})"
        return _from_hub_cache(hub, name, wanted_files, hub_kwargs, why_offline)
    return _download(hub, name, wanted_files, hub_kwargs, not_local)


def _local_folder(path: Path, subfolder: str, wanted_files: list[str]) -> Path:
    folder = path / subfolder if subfolder else path
    if not folder.is_dir():
        raise CheckpointNotFoundError(
            f"{path.resolve()} has no subfolder '{subfolder}' "
            f"(looked for {_names(wanted_files)} in it)"
        )
    return folder


def _embedded_folder(name: str, subfolder: str, wanted_files: list[str]) -> Path:
    folder = ASSETS_DIR / name
    if not folder.is_dir():
        raise CheckpointNotFoundError(
            f"'{name}' is a model embedded in bloomlm, but {folder} is missing: reinstall bloomlm "
            "(pip install --force-reinstall bloomlm), or regenerate it with the scripts/ "
            "in its repository"
        )
    return _local_folder(folder, subfolder, wanted_files)


def _looks_like_repo_id(name: str) -> bool:
    # Anything path-like ("./x", "/abs", "a/b/c", "..") is a missing local folder, never a hub id.
    return (
        len(name) <= 96
        and _REPO_ID.fullmatch(name) is not None
        and ".." not in name
        and "--" not in name
        and not name.startswith((".", "-"))
        and not name.endswith(".git")
    )


def _import_huggingface_hub() -> ModuleType | None:
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def _offline_reason(hub_kwargs: dict[str, Any]) -> str | None:
    # Read the environment at call time (not import time) so tests and notebooks can switch it.
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(variable, "")
        if value.strip().lower() in _TRUE_VALUES:
            return f"offline mode ({variable}={value})"
    if hub_kwargs.get("local_files_only"):
        return "local_files_only=True"
    return None


def _hub_silence(hub: ModuleType) -> str | None:
    """Why the hub does not answer within HUB_PROBE_SECONDS, or None when it answers (with any
    HTTP status: only silence matters). Runs in a thread so a slow name lookup is bounded too."""
    import urllib.error
    import urllib.request

    constants = importlib.import_module(f"{hub.__name__}.constants")
    endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")  # HF_ENDPOINT, if set
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            request = urllib.request.Request(endpoint.rstrip("/") + "/api/status", method="HEAD")
            urllib.request.urlopen(request, timeout=HUB_PROBE_SECONDS).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # it answered
            outcome.append(None)
        except Exception as err:  # URLError, timeouts, name lookup failures
            outcome.append(f"{endpoint}: {getattr(err, 'reason', err)}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    if not outcome:
        return f"{endpoint} did not answer within {HUB_PROBE_SECONDS:g} s"
    return outcome[0]


def _snapshot_kwargs(hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    token = hub_kwargs.get("token")
    if token is None:
        token = hub_kwargs.get("use_auth_token")  # transformers' older name for `token`
    kwargs = {
        "revision": hub_kwargs.get("revision"),
        "cache_dir": hub_kwargs.get("cache_dir"),
        "token": token,
        "proxies": hub_kwargs.get("proxies"),
        "force_download": hub_kwargs.get("force_download") or None,
    }
    # Pass only what was given, so huggingface_hub versions that dropped a keyword still work.
    return {key: value for key, value in kwargs.items() if value is not None}


def _from_hub_cache(
    hub: ModuleType,
    repo_id: str,
    wanted_files: list[str],
    hub_kwargs: dict[str, Any],
    why_offline: str,
) -> Path:
    """A snapshot downloaded earlier, found without touching the network (what transformers does
    offline)."""
    kwargs = _snapshot_kwargs(hub_kwargs) | {"local_files_only": True}
    kwargs.pop("force_download", None)
    try:
        snapshot = Path(hub.snapshot_download(repo_id, **kwargs))
    except (
        Exception
    ) as err:  # LocalEntryNotFoundError and friends: nothing cached for this repo/revision
        raise CheckpointNotFoundError(
            f"{why_offline}, and '{repo_id}' is not in the local hub cache. "
            "Download it while online, or pass the path of a folder holding the files "
            "(HF_HUB_OFFLINE=1 skips the network)."
        ) from err
    return _local_folder(snapshot, hub_kwargs.get("subfolder") or "", wanted_files)


def _download(
    hub: ModuleType,
    repo_id: str,
    wanted_files: list[str],
    hub_kwargs: dict[str, Any],
    not_local: str,
) -> Path:
    kwargs = _snapshot_kwargs(hub_kwargs)
    subfolder = hub_kwargs.get("subfolder") or ""
    try:
        api = hub.HfApi()
        repo_files = api.list_repo_files(
            repo_id, revision=kwargs.get("revision"), token=kwargs.get("token")
        )
        patterns = select_hub_files(repo_files, wanted_files, subfolder)
        if not patterns:
            raise CheckpointNotFoundError(
                f"{not_local} The hub repo '{repo_id}' has none of them either "
                f"(it holds {_names(sorted(repo_files)[:20])})."
            )
        snapshot = Path(hub.snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
    except CheckpointNotFoundError:
        raise
    except (
        Exception
    ) as err:  # network, auth, unknown repo or revision: all mean "not found from here"
        raise CheckpointNotFoundError(
            f"{not_local} Fetching '{repo_id}' from the Hugging Face hub failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    return _local_folder(snapshot, subfolder, wanted_files)


def select_hub_files(
    repo_files: list[str], wanted_files: list[str], subfolder: str = ""
) -> list[str]:
    """Which repo files to download: the wanted ones, small JSON/tokenizer files, and ONE weight
    format.

    Weight names in `wanted_files` are alternatives in priority order; the first present in the repo
    wins (with its shards when it is an index). Downloading every format would triple the size of
    repos such as bigscience/bloom that ship safetensors, PyTorch and Flax weights side by side.
    Returns [] when none of `wanted_files` is in the repo.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    names = {
        f[len(prefix) :] for f in repo_files if f.startswith(prefix) and "/" not in f[len(prefix) :]
    }
    weight_names = [w for w in wanted_files if w.endswith(_WEIGHT_SUFFIXES)]
    other_names = [w for w in wanted_files if w not in weight_names and w in names]
    chosen_weights = next(([w] + _shards_of(w, names) for w in weight_names if w in names), [])
    if not other_names and not chosen_weights:
        return []
    small = [n for n in names if n in _TOKENIZER_FILES or _is_small_json(n)]
    return sorted({prefix + n for n in small + other_names + chosen_weights})


def _is_small_json(name: str) -> bool:
    # config.json, generation_config.json, tokenizer files; an index only comes with its chosen
    # format.
    return name.endswith(".json") and not name.endswith(".index.json")


def _shards_of(weight_name: str, names: set[str]) -> list[str]:
    """Shard files of an index name: model.safetensors.index.json ->
    model-00001-of-00002.safetensors, ..."""
    if not weight_name.endswith(".index.json"):
        return []
    weights_name = weight_name.removesuffix(".index.json")
    return [name for name in names if is_shard_file_name(name, weights_name)]


def _names(files: list[str]) -> str:
    return ", ".join(files) if files else "(no files named)"
