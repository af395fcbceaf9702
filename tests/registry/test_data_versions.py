"""DVC data versions in a temporary git repository with a temporary local remote."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from registry.data_versions import (
    DataVersion,
    checkout_version,
    current_version,
    ensure_repo,
    version_dataset,
)

DVC_VARS = ("DVC_SITE_CACHE_DIR", "DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_NO_ANALYTICS")
VAR_TMP_DVC = Path("/var/tmp/dvc")


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    """A fresh state root and a fake $HOME; DVC variables unset so the module must set them."""
    home = tmp_path / "state"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("HOME", str(tmp_path / "user-home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for var in DVC_VARS:
        monkeypatch.setenv(var, "placeholder")  # recorded, so the value set by the module is undone
        monkeypatch.delenv(var)
    return home


@pytest.fixture
def repo(tmp_path, env) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for cmd in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    return root


def _dataset(path: Path, rows: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": rows, "n": range(len(rows))}).to_parquet(path / "part-0.parquet")
    return path


def _remote_files(remote: Path) -> set[str]:
    return {str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()}


def test_version_change_and_checkout_old(tmp_path, repo, env):
    var_tmp_existed = VAR_TMP_DVC.exists()
    remote = tmp_path / "remote"

    v1 = version_dataset(repo, _dataset(tmp_path / "src1", ["a", "b"]), "sft", str(remote))
    assert isinstance(v1, DataVersion) and v1.md5.endswith(".dir") and v1.remote == str(remote)
    assert v1.dvc_file == repo / "data" / "sft.dvc" and v1.path == repo / "data" / "sft"
    out = yaml.safe_load(v1.dvc_file.read_text())["outs"][0]
    assert out["md5"] == v1.md5 and out["path"] == "sft"
    assert (repo / "data" / "sft" / "part-0.parquet").is_file()
    assert "/sft" in (repo / "data" / ".gitignore").read_text()  # data itself stays out of git
    pushed_v1 = _remote_files(remote)
    assert any(f.endswith(".dir") for f in pushed_v1) and len(pushed_v1) == 2  # manifest + parquet
    assert current_version(repo, "sft") == v1
    assert current_version(repo, "missing") is None

    # The remote is machine-local config, the committed config has no paths.
    assert str(remote) in (repo / ".dvc" / "config.local").read_text()
    assert str(tmp_path) not in (repo / ".dvc" / "config").read_text()

    v2 = version_dataset(repo, _dataset(tmp_path / "src2", ["a", "b", "c"]), "sft", str(remote))
    assert v2.md5 != v1.md5 and len(pd.read_parquet(v2.path / "part-0.parquet")) == 3
    assert pushed_v1 < _remote_files(remote)

    # Restore the old version from the remote alone: drop the local cache first.
    subprocess.run(["rm", "-rf", str(repo / ".dvc" / "cache")], check=True)
    back = checkout_version(repo, "sft", v1.md5, str(remote))
    assert back.md5 == v1.md5
    assert list(pd.read_parquet(repo / "data" / "sft" / "part-0.parquet")["text"]) == ["a", "b"]

    # DVC's machine-wide state went to the state root, not $HOME or /var/tmp.
    assert all(os.environ[v].startswith(str(env)) for v in DVC_VARS[:3])
    assert Path(os.environ["DVC_SITE_CACHE_DIR"]).is_dir()
    assert not (tmp_path / "user-home" / ".config" / "dvc").exists()
    assert not (tmp_path / "user-home" / ".cache" / "dvc").exists()
    assert VAR_TMP_DVC.exists() == var_tmp_existed


def test_same_data_same_md5_and_single_file_source(tmp_path, repo):
    remote = tmp_path / "remote"
    src = _dataset(tmp_path / "src", ["x"])
    first = version_dataset(repo, src, "pairs", str(remote))
    again = version_dataset(repo, src / "part-0.parquet", "pairs", str(remote))
    assert again.md5 == first.md5


def test_ensure_repo_is_idempotent_and_works_without_git(tmp_path, env):
    root = tmp_path / "plain"
    root.mkdir()
    ensure_repo(root, str(tmp_path / "r1"))
    ensure_repo(root, str(tmp_path / "r2"))  # a second call only updates the remote
    local = (root / ".dvc" / "config.local").read_text()
    assert str(tmp_path / "r2") in local and str(tmp_path / "r1") not in local
    config = (root / ".dvc" / "config").read_text()
    assert "no_scm = True" in config and "check_update = False" in config
