"""DVC versions of the datasets in the repository's `data/` folder.

    ensure_repo(repo_root, remote_url)                        # dvc init once, remote in config.local
    v = version_dataset(repo_root, src_dir, "sft", remote_url)   # data/sft <- src_dir, add, push
    v.md5                                                     # "3f2a...e1.dir": the lineage tag
    checkout_version(repo_root, "sft", old_md5, remote_url)   # bring an older version back

Only the small `data/<name>.dvc` files belong in git; the data itself is ignored (DVC writes
`data/.gitignore`) and lives in DVC's cache and the remote. Pitfalls this module handles:

- DVC is initialised at the repository root, never with `--subdir` (that breaks commands from the root).
- DVC's site cache and global/system config would otherwise land in /var/tmp/dvc and ~/.config/dvc:
  `_isolate_dvc_env()` points them under the state root (unless the caller set them already).
- Relative remote paths are resolved against the working directory, not the config file: the
  remote URL is made absolute and written to `.dvc/config.local` (machine-specific, not committed).
- Every path handed to DVC is absolute.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from infra.settings import dvc_env, load_settings

REMOTE_NAME = "local"
# DVC tells a person to `git add` the .dvc file after every `add`; committing data versions is the
# user's call (the lineage already records the md5), so the hint is noise in every flow log.
logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)


@dataclass(frozen=True)
class DataVersion:
    name: str
    path: Path  # repo_root/data/<name>
    md5: str  # the .dvc out's md5 of the directory, "<hex>.dir"
    dvc_file: Path  # repo_root/data/<name>.dvc
    remote: str  # the remote URL the data was pushed to


def _isolate_dvc_env() -> dict[str, str]:
    """Keep DVC's machine-wide state under the state root; variables already set are kept."""
    defaults = {**dvc_env(load_settings()), "GIT_PYTHON_REFRESH": "quiet"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in defaults}

def _absolute_remote(remote_url: str) -> str:
    if "://" in str(remote_url):
        return str(remote_url)  # s3://, gs://, ...: used as given
    path = Path(remote_url).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _repo(repo_root: Path):
    from dvc.repo import Repo  # imported late: ~0.5 s, and only after the env is isolated

    return Repo(str(Path(repo_root).resolve()))


def ensure_repo(repo_root: Path, remote_url: str) -> None:
    """`dvc init` at `repo_root` if needed; default remote "local" -> `remote_url` in config.local."""
    _isolate_dvc_env()
    root = Path(repo_root).resolve()
    if not (root / ".dvc").is_dir():
        from dvc.repo import Repo

        # Inside a git repository DVC stages its own config files in git (autostage at init only).
        Repo.init(str(root), no_scm=not (root / ".git").exists()).close()
    with _repo(root) as repo:
        with repo.config.edit("repo") as conf:  # committed: project policy, no machine paths
            conf["core"]["autostage"] = False
            conf["core"]["check_update"] = False
        with repo.config.edit("local") as conf:  # not committed: this machine's remote
            conf["remote"][REMOTE_NAME] = {"url": _absolute_remote(remote_url)}
            conf["core"]["remote"] = REMOTE_NAME


def _read_dvc_file(dvc_file: Path) -> dict:
    data = yaml.safe_load(dvc_file.read_text()) or {}
    outs = data.get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise ValueError(f"{dvc_file}: expected exactly one out with an md5, got {outs!r}")
    return data


def _configured_remote(repo_root: Path) -> str:
    with _repo(repo_root) as repo:
        return repo.config.get("remote", {}).get(REMOTE_NAME, {}).get("url", "")


def current_version(repo_root: Path, name: str) -> DataVersion | None:
    """The version recorded in data/<name>.dvc, or None if the dataset is not versioned."""
    _isolate_dvc_env()
    root = Path(repo_root).resolve()
    dvc_file = root / "data" / f"{name}.dvc"
    if not dvc_file.is_file():
        return None
    md5 = _read_dvc_file(dvc_file)["outs"][0]["md5"]
    return DataVersion(name, root / "data" / name, md5, dvc_file, _configured_remote(root))


def _replace_dir(src: Path, dest: Path, staging_root: Path) -> None:
    """Copy `src` (a folder, or one file) to `dest`, replacing it with two renames at the end."""
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}-", dir=staging_root))
    new = staging / "new"
    if src.is_dir():
        shutil.copytree(src, new)
    else:
        new.mkdir()
        shutil.copy2(src, new / src.name)
    try:
        if dest.exists():
            dest.rename(staging / "old")
        new.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def version_dataset(repo_root: Path, src: Path, name: str, remote_url: str) -> DataVersion:
    """Make `src` the current `data/<name>`, `dvc add` it and push it to the remote.

    `src` (a folder, or a single file that becomes the folder's only file) is copied; an existing
    `data/<name>` is replaced. Versioning unchanged data again yields the same md5.
    """
    root = Path(repo_root).resolve()
    src = Path(src).resolve()
    if not src.exists():
        raise FileNotFoundError(src)
    ensure_repo(root, remote_url)
    dest = root / "data" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src != dest:
        # Staged inside .dvc/tmp: same filesystem (renames are atomic) and never seen by DVC or git.
        _replace_dir(src, dest, root / ".dvc" / "tmp" / "flywheel-staging")

    with _repo(root) as repo:
        repo.add([str(dest)])
        repo.push(targets=[str(dest)], remote=REMOTE_NAME)
    version = current_version(root, name)
    assert version is not None  # dvc add just wrote the .dvc file
    _stage_in_git(root, version)
    return version


def _stage_in_git(root: Path, version: DataVersion) -> None:
    """`git add` the version's .dvc file (and data/.gitignore) so the next commit pins it.

    Staged, never committed: what goes into history stays the user's call, but the version no
    longer sits untracked where `git status` readers miss it.
    """
    if not (root / ".git").exists():
        return
    paths = [str(p.relative_to(root)) for p in (version.dvc_file, version.path.parent / ".gitignore") if p.exists()]
    try:
        subprocess.run(["git", "add", "--", *paths], cwd=root, check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        logging.getLogger(__name__).warning("could not git add %s: %s", paths, e)


def remote_location(version: DataVersion) -> str:
    """Where the remote keeps the version's directory listing (DVC 3 layout: files/md5/ab/cdef....dir)."""
    return f"{version.remote.rstrip('/')}/files/md5/{version.md5[:2]}/{version.md5[2:]}"


def version_at(repo_root: Path, path: Path) -> DataVersion | None:
    """The current DVC version holding `path` (data/<name> or a file in it), or None for an unversioned path."""
    root = Path(repo_root).resolve()
    try:
        name = Path(path).resolve().relative_to(root / "data").parts[0]
    except (ValueError, IndexError):
        return None
    return current_version(root, name)


def current_versions(repo_root: Path) -> list[DataVersion]:
    """Every dataset versioned in data/ (one per `data/<name>.dvc`)."""
    root = Path(repo_root).resolve()
    return [v for f in sorted((root / "data").glob("*.dvc")) if (v := current_version(root, f.stem)) is not None]


def checkout_version(repo_root: Path, name: str, md5: str, remote_url: str) -> DataVersion:
    """Restore the version with directory hash `md5` into data/<name> (from the cache or remote).

    Rewrites data/<name>.dvc to point at `md5` (commit it to make the rollback part of history)
    and pulls: objects already in the local cache are not fetched again.
    """
    root = Path(repo_root).resolve()
    ensure_repo(root, remote_url)
    dvc_file = root / "data" / f"{name}.dvc"
    data = _read_dvc_file(dvc_file) if dvc_file.is_file() else {"outs": [{}]}
    if data["outs"][0].get("md5") != md5:
        # size/nfiles describe the version being replaced: drop them rather than record wrong ones.
        data["outs"] = [{"md5": md5, "hash": "md5", "path": name}]
        dvc_file.parent.mkdir(parents=True, exist_ok=True)
        dvc_file.write_text(yaml.safe_dump(data, sort_keys=False))
    with _repo(root) as repo:
        repo.pull(targets=[str(dvc_file)], remote=REMOTE_NAME, force=True)
    version = current_version(root, name)
    assert version is not None
    return version
