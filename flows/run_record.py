"""A lifecycle run's record, `<runs dir>/<stamp>/run.json`: what `flywheel run --resume` re-enters.

    record = create(runs_dir, preset, overrides, commit)   # a new run: its folder and record
    record = resolve(runs_dir, "latest")                    # the newest unfinished run, or one by name
    with hold(record.run_dir): ...                          # one process runs a run at a time
    finish(record, version="3", champion="3")              # `latest` no longer picks it

The record holds what a resume must reuse rather than recompute: the preset and overrides (a resume
runs the saved config, never a new one), the MLflow parent run it reopens, the Prefect flow runs of
earlier attempts (a killed one's are marked Crashed), the git commit the lineage names. `status` is
`running` while a process runs it (and stays so when that process is killed), `failed` after an
error, `finished` once the lifecycle completed; every status but `finished` can be resumed. No
prefect or mlflow import here: the command line reads records before any server starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

RUN_FILE = "run.json"
LATEST = "latest"  # `--resume` with no RUN: the newest unfinished run
FINISHED = "finished"


class RunNotFound(LookupError):
    pass


class RunBusy(RuntimeError):
    """Another process is running this run right now."""


@dataclass(frozen=True)
class RunRecord:
    run_dir: Path
    preset: str
    overrides: list[str] = field(default_factory=list)
    git_commit: str = ""
    mlflow_run_id: str = ""
    prefect_flow_run_ids: list[str] = field(default_factory=list)  # every attempt's lifecycle flow run
    status: str = "running"
    started_at: str = ""
    finished_at: str = ""
    version: str = ""  # the registered version, once finished
    champion: str = ""

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write(record: RunRecord) -> RunRecord:
    raw = {k: v for k, v in asdict(record).items() if k != "run_dir"}
    tmp = record.run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    tmp.replace(record.run_dir / RUN_FILE)  # a kill mid-write leaves the previous record whole
    return record


def read(run_dir: Path) -> RunRecord:
    path = Path(run_dir) / RUN_FILE
    try:
        raw = json.loads(path.read_text())
        return RunRecord(run_dir=Path(run_dir), preset=str(raw["preset"]),
                         **{k: v for k, v in raw.items() if k in RunRecord.__dataclass_fields__ and k != "preset"})
    except FileNotFoundError:
        raise RunNotFound(f"{run_dir} has no {RUN_FILE} (a run from before resumable runs?): it cannot be resumed") from None
    except (ValueError, KeyError, TypeError) as err:
        raise RunNotFound(f"{path}: not a run record ({err})") from None


def create(runs_dir: Path, preset: str, overrides: list[str] | None, git_commit: str) -> RunRecord:
    """A new run folder named by the time (`-2`, `-3`... if a run started in the same second) and its record."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        run_dir = runs_dir / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return write(RunRecord(run_dir, preset, list(overrides or []), git_commit, started_at=_now()))
    raise RuntimeError(f"no free run folder for {stamp} in {runs_dir}")


def resolve(runs_dir: Path, name: str) -> RunRecord:
    """The run called `name` (its folder under the runs dir), or with `latest` the newest unfinished one."""
    if name != LATEST:
        run_dir = runs_dir / name
        if "/" in name or name.startswith(".") or not run_dir.is_dir():
            raise RunNotFound(f"no run {name!r} in {runs_dir}")
        return read(run_dir)
    records = []
    for path in runs_dir.glob(f"*/{RUN_FILE}") if runs_dir.is_dir() else ():
        with contextlib.suppress(RunNotFound):
            records.append(read(path.parent))
    unfinished = [r for r in records if not r.finished and not busy(r.run_dir)]
    if not unfinished:
        raise RunNotFound(f"no unfinished run in {runs_dir} to resume (none, or each is running right now)")
    return max(unfinished, key=lambda r: (r.started_at, r.name))


def update(record: RunRecord, **changes) -> RunRecord:
    return write(replace(record, **changes))


def finish(record: RunRecord, version: str, champion: str | None) -> RunRecord:
    return update(record, status=FINISHED, finished_at=_now(), version=version, champion=champion or "")


def busy(run_dir: Path) -> bool:
    """Whether a process is running this run now."""
    try:
        with hold(run_dir):
            return False
    except RunBusy:
        return True


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run for as long as this process runs it (the kernel drops it when the
    process dies, however it dies): a resume never runs beside the run it resumes."""
    fd = os.open(run_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"run {run_dir.name} is being run by another process right now") from None
        yield
    finally:
        os.close(fd)
