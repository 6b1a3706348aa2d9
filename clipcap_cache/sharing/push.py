"""`clipcap push`: export a checkpoint to a temporary folder and upload it to the hub.

    clipcap push runs/coco --repo USER/NAME [--private] [--revision BRANCH]

The folder is `export.py`'s, so a pushed model is what `clipcap export` would write, card and all.
The upload is `huggingface_hub`'s (`create_repo`, then `upload_folder`, on a branch made with
`create_branch` for `--revision`), with the token of its own login (`hf auth login`, or
`HF_TOKEN`): the token is never printed, nor put in any message. Offline (`HF_HUB_OFFLINE=1`),
or without a login, the push stops with one line before the export; any failure of the upload
is one line too.
"""

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clipcap_cache.checks import check_types
from clipcap_cache.errors import ClipcapError
from clipcap_cache.hub import hub_library, is_offline, is_repo_id
from clipcap_cache.options import option
from clipcap_cache.sharing.export import (
    BASE_CLIP,
    BASE_GPT2,
    DATASETS,
    LICENSE,
    SELF_CONTAINED,
    ExportConfig,
    check_sharing_options,
    export,
)

log = logging.getLogger(__name__)


@dataclass
class PushConfig:
    """Settings of `clipcap push`: which checkpoint, which hub repository, and the export's."""

    source: str = option(
        help="Run directory, checkpoint folder or hub id.",
        argument=True,
        metavar="RUN_OR_CHECKPOINT",
    )
    repo: str = option(help="The hub repository to push to, USER/NAME.", metavar="ID")
    private: bool = option(False, help="Create the repository private.")
    revision: str | None = option(
        None, help="Push to this branch (made if need be).", default_text="main"
    )
    self_contained: bool = SELF_CONTAINED.field()
    base_clip: str | None = BASE_CLIP.field()
    base_gpt2: str | None = BASE_GPT2.field()
    license: str = LICENSE.field()
    datasets: list = DATASETS.field()

    def __post_init__(self):
        check_types(self)
        if not is_repo_id(self.repo):
            raise ClipcapError(
                f"--repo {self.repo!r} is not a hub repository id: give USER/NAME (letters, "
                "digits, '-', '_' and '.')"
            )
        if self.revision is not None and (not self.revision.strip() or ".." in self.revision):
            raise ClipcapError(f"--revision {self.revision!r} is not a branch name")
        check_sharing_options(self)


@dataclass(frozen=True)
class PushResult:
    """Where a push went."""

    repo: str
    revision: str
    url: str
    files: list[str]  # the uploaded files, relative to the repository's top


def push(config: PushConfig) -> PushResult:
    """Export `config.source` to a temporary folder and upload it as `config.repo`."""
    hf = hub_library()
    if is_offline():
        raise ClipcapError(
            "cannot push while HF_HUB_OFFLINE is set: unset it where the hub can be reached"
        )
    token = hf.get_token()
    if not token:
        raise ClipcapError(
            "not logged in to the Hugging Face hub: run `hf auth login` (or set HF_TOKEN)"
        )
    with tempfile.TemporaryDirectory(prefix="clipcap-push-") as tmp:
        folder = export(
            ExportConfig(
                source=config.source,
                out=str(Path(tmp) / config.repo.split("/")[1]),
                self_contained=config.self_contained,
                base_clip=config.base_clip,
                base_gpt2=config.base_gpt2,
                license=config.license,
                datasets=list(config.datasets),
                repo=config.repo,
            )
        )
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        try:
            url = upload(hf, folder, config, token)
        except ClipcapError:
            raise
        except Exception as e:  # network, authorisation, quota: the user's to fix
            raise ClipcapError(
                f"cannot push to {config.repo}: {_message(e, token)}{_hint(e)}"
            ) from None
    return PushResult(config.repo, config.revision or "main", url, files)


def upload(hf, folder: Path, config: PushConfig, token: str) -> str:
    """Create the repository (and branch) if need be and upload `folder`; returns its URL."""
    api = hf.HfApi(token=token)
    repo_url = api.create_repo(
        config.repo, repo_type="model", private=config.private, exist_ok=True
    )
    if config.revision is not None:
        api.create_branch(config.repo, branch=config.revision, repo_type="model", exist_ok=True)
    api.upload_folder(
        repo_id=config.repo,
        folder_path=str(folder),
        repo_type="model",
        revision=config.revision,
        commit_message="Upload a clipcap-cache checkpoint with its model card",
    )
    return str(repo_url)


def _message(error: Exception, token: str) -> str:
    """The first line of an error, with the token cut out should a library have put it there."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.replace(token, "***")


def _hint(error: Exception) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return " (log in with `hf auth login` with a token that may write there)"
    return ""
