"""Publish a cleaned model folder to the Hub in ONE commit, or as a pull request.

Never a silent overwrite: a push to a repo that already holds files is refused unless it is a pull
request, and the commit names its parent so that a concurrent change fails instead of being
overwritten. The token comes from ``HF_TOKEN`` or ``hf auth login`` and is never printed.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

from hubdefend.errors import HubDefendError


class PushError(HubDefendError, OSError):
    """The cleaned model could not be published; the target repo is left as it was."""


@dataclass
class PushResult:
    repo_id: str
    commit_sha: str
    commit_url: str
    pr_url: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_push(repo_id: str, *, create_pr: bool = False, source_repo: str | None = None) -> str:
    """What can be checked before any work: not the scanned repo itself (without a pull request),
    and a token to push with. Returns the token.

    Raises:
        PushError: a push onto the scanned model without ``create_pr``, or no token.
    """
    from huggingface_hub import get_token

    if source_repo is not None and repo_id == source_repo and not create_pr:
        raise PushError(
            f"Refusing to overwrite {repo_id}, the model that was scanned. Pass --pr to open a pull request on it, "
            "or --push to a new repo."
        )
    token = get_token()
    if not token:
        raise PushError("No Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again.")
    return token


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    create_pr: bool = False,
    private: bool = False,
    source_repo: str | None = None,
    commit_message: str = "Backdoor-cleaned model (hubdefend)",
    commit_description: str | None = None,
) -> PushResult:
    """Upload every file of ``folder`` to ``repo_id`` in one commit.

    Args:
        folder: the cleaned model folder (family layout, README.md card, report.json, plots).
        repo_id: the target repo. Created (``private`` if asked) when it does not exist and this is
            not a pull request.
        create_pr: open a pull request instead of committing to main (needs only read access).
        source_repo: the repo that was scanned: pushing to it without ``create_pr`` is refused.

    Raises:
        PushError: no token, a push onto the scanned model, a non-empty target without
            ``create_pr``, or a failed commit (nothing is changed on the Hub then).
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    token = check_push(repo_id, create_pr=create_pr, source_repo=source_repo)
    api = HfApi(token=token)
    parent, created = None, False
    try:
        if api.repo_exists(repo_id):
            files = api.list_repo_files(repo_id)
            if not create_pr and any(f != ".gitattributes" for f in files):
                raise PushError(
                    f"{repo_id} already holds files; hubdefend never overwrites a repo silently. Pass --pr to open a "
                    "pull request, or push to a new repo id."
                )
            parent = None if create_pr else api.model_info(repo_id).sha
        elif create_pr:
            raise PushError(
                f"{repo_id} does not exist, so no pull request can be opened on it. Push without --pr."
            )
        else:
            api.create_repo(repo_id, private=private, exist_ok=True)
            created = True
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            parent_commit=parent,
        )
    except hub_errors.HfHubHTTPError as exc:
        if created:  # leave no empty repo behind
            with contextlib.suppress(hub_errors.HfHubHTTPError):
                api.delete_repo(repo_id)
        raise PushError(
            f"Publishing to {repo_id} failed, nothing was changed there: {_first_line(exc)}"
        ) from exc
    return PushResult(repo_id, info.oid, info.commit_url, info.pr_url)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
