"""Download a diffusers Stable Diffusion repository from the Hugging Face Hub: only what sd_jax reads.

``download("CompVis/stable-diffusion-v1-4")`` lists the repository, picks per model the weight
files the folder reader will use (a ``variant`` first, safetensors before PyTorch ``.bin``, all
shards of a sharded checkpoint), the ``config.json`` files, the tokenizer and the scheduler
config, and fetches those alone with ``huggingface_hub.snapshot_download`` (so the root's
multi-GB ``*.ckpt`` files, ``.bin`` duplicates, other variants and the safety checker stay on
the Hub). Without a network (or with ``HF_HUB_OFFLINE=1``) a cached snapshot is used; if there
is none the error says how to pass a local folder or file instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from sd_jax.convert.diffusers import WEIGHT_NAMES, _TORCH_BIN_NAMES

MODELS = ("unet", "vae", "text_encoder")
SMALL_FOLDERS = ("tokenizer", "scheduler")


class HubDownloadError(OSError):
    """A model could not be fetched from (or found in the cache of) the Hugging Face Hub."""


def _weights_of(files: set[str], component: str, variant: str | None) -> list[str]:
    """The weight files of one component, in the reader's order of preference (see diffusers.find_weight_files)."""
    stem = WEIGHT_NAMES[component]
    for var in ([variant, None] if variant else [None]):
        suffix = f".{var}" if var else ""
        for name, ext in ((stem, "safetensors"), (_TORCH_BIN_NAMES[stem], "bin")):
            single = f"{component}/{name}{suffix}.{ext}"
            if single in files:
                return [single]
            # sharded: the index as sd_jax's reader names it, or as diffusers/transformers write variants
            indexes = [f"{single}.index.json", f"{component}/{name}.{ext}.index{suffix}.json"]
            index = next((i for i in indexes if i in files), None)
            if index is not None:
                var_re = re.escape(var) if var else None
                shard = (rf"{re.escape(name)}(?:\.{var_re}-\d+-of-\d+|-\d+-of-\d+\.{var_re})\.{ext}" if var
                         else rf"{re.escape(name)}-\d+-of-\d+\.{ext}")
                shards = sorted(f for f in files if f.startswith(component + "/")
                                and re.fullmatch(shard, f[len(component) + 1:]))
                return [index, *shards]
    return []


def select_files(files: Iterable[str], repo_id: str = "the repository", variant: str | None = None,
                 safety_checker: bool = False) -> list[str]:
    """The repository files a Stable Diffusion folder needs; raises if it is not such a folder."""
    files = set(files)
    if "model_index.json" not in files:
        singles = sorted(f for f in files if "/" not in f and f.endswith((".ckpt", ".safetensors")))
        hint = (f"; it holds single files ({', '.join(singles[:4])}): download one and pass its path"
                if singles else "")
        raise HubDownloadError(f"{repo_id} is not a diffusers Stable Diffusion repository (no model_index.json)"
                               f"{hint}")
    wanted = ["model_index.json"]
    # The safety checker is fetched when asked for and the repository has one (it is optional).
    has_checker = safety_checker and "safety_checker/config.json" in files
    components = MODELS + (("safety_checker",) if has_checker else ())
    for component in components:
        config = f"{component}/config.json"
        weights = _weights_of(files, component, variant)
        if config not in files or not weights:
            raise HubDownloadError(f"{repo_id} has no {'config.json' if config not in files else 'weights'} "
                                   f"for {component}/; it is not a complete Stable Diffusion folder")
        wanted += [config, *weights]
    small = SMALL_FOLDERS + (("feature_extractor",) if has_checker else ())
    wanted += sorted(f for f in files if f.split("/")[0] in small and f.count("/") == 1)
    return wanted


def _offline_error(repo_id: str, cause: BaseException | None) -> HubDownloadError:
    """The one message for "could not download and not cached", saying how to pass a local path."""
    from huggingface_hub import errors

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or isinstance(cause, errors.OfflineModeIsEnabled):
        why = "offline mode is on (HF_HUB_OFFLINE=1)"
    elif isinstance(cause, errors.HfHubHTTPError):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        why = f"the Hub answered with an error ({first})"
    else:
        why = f"the Hugging Face Hub cannot be reached ({type(cause).__name__})"
    return HubDownloadError(
        f"cannot download {repo_id!r}: {why}, and it is not in the local Hugging Face cache. "
        f"Pass a local path instead: a diffusers folder (e.g. from `hf download {repo_id} --local-dir DIR` on a "
        "connected machine) or a .ckpt/.safetensors file, as StableDiffusion.from_pretrained('DIR')")


def _is_complete(folder: Path, variant: str | None) -> bool:
    """A cached snapshot with everything the folder reader needs."""
    files = {str(p.relative_to(folder)).replace(os.sep, "/") for p in folder.rglob("*") if p.is_file()}
    try:
        select_files(files, variant=variant)
    except HubDownloadError:
        return False
    return True


def download(repo_id: str, revision: str | None = None, token: str | bool | None = None,
             cache_dir: str | os.PathLike | None = None, variant: str | None = None,
             safety_checker: bool = False) -> Path:
    """Fetch the files of a diffusers SD repository that sd_jax reads; returns the local snapshot folder."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        listing = huggingface_hub.HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except errors.GatedRepoError:
        raise HubDownloadError(f"{repo_id} is gated: accept its licence on huggingface.co and pass token= "
                               "(or run `hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise HubDownloadError(f"{repo_id} was not found on the Hub (or it is private: pass token=)") from None
    except errors.RevisionNotFoundError:
        raise HubDownloadError(f"{repo_id} has no revision {revision!r}") from None
    except Exception as err:  # offline mode, DNS, connection refused, timeouts, proxy errors, ...
        return _from_cache(repo_id, revision, cache_dir, variant, err)
    wanted = select_files(listing, repo_id, variant, safety_checker)
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                                   allow_patterns=wanted)
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError) as err:
        return _from_cache(repo_id, revision, cache_dir, variant, err)
    return Path(folder)


def _from_cache(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None, variant: str | None,
                cause: BaseException) -> Path:
    """A complete cached snapshot of the repository, or the one clear offline error."""
    import huggingface_hub

    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                        local_files_only=True))
    except Exception:
        raise _offline_error(repo_id, cause) from None
    if not _is_complete(folder, variant):
        raise _offline_error(repo_id, cause)
    return folder
