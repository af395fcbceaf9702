"""A flow process killed with SIGKILL leaves Running flow and task runs; crash_abandoned ends them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import StateType

from flows.abandoned import crash_abandoned

REPO = Path(__file__).resolve().parents[2]

# outer flow -> inner subflow -> a task that waits to be killed; the ids go to a file once it runs
KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from prefect import flow, task
    from prefect.runtime import flow_run

    @task
    def wait():
        Path(sys.argv[1]).write_text(flow_run.root_flow_run_id)
        time.sleep(600)

    @flow
    def inner():
        wait()

    @flow
    def outer():
        inner()

    outer()
""")


def _tree(client, root: UUID) -> tuple[list, list]:
    subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[root])))
    ids = [root, *(s.id for s in subflows)]
    return [client.read_flow_run(root), *subflows], client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))


def test_the_runs_of_a_killed_flow_process_become_crashed_and_finished_ones_stay(services, tmp_path: Path) -> None:
    ready = tmp_path / "root-id"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(ready)], cwd=REPO, start_new_session=True,
                            stdout=(tmp_path / "log").open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    root = UUID(ready.read_text())

    with get_client(sync_client=True) as client:
        flows, tasks = _tree(client, root)
        assert len(flows) == 2 and tasks  # outer, inner; wait (and inner's task run in outer)
        assert {f.state.type for f in flows} == {StateType.RUNNING}, "the kill should leave them Running"
        assert StateType.RUNNING in {t.state.type for t in tasks}

        marked = crash_abandoned([str(root)], resumed_by="test-resume")
        flows, tasks = _tree(client, root)
    assert sorted(marked) == sorted(str(f.id) for f in flows)
    assert {f.state.type for f in flows} == {StateType.CRASHED}
    assert all(t.state.type in {StateType.CRASHED, StateType.COMPLETED} for t in tasks), [t.state for t in tasks]
    assert "test-resume" in flows[0].state.message

    with get_client(sync_client=True) as client:  # a second resume finds nothing left to mark
        assert crash_abandoned([str(root)], resumed_by="again") == []
