"""The Prefect runs a killed lifecycle left behind: marked Crashed when its run is resumed.

    crash_abandoned(record.prefect_flow_run_ids, resumed_by=str(flow_run.id))

A `kill -9` gives Prefect no chance to report, so the killed flow run, its subflows and their task
runs would show as Running in the UI forever. The resume knows better: it holds the run's lock
(`run_record.hold`), which no live process of that run could have let go, so whatever of the run's
earlier flow runs is still unfinished was abandoned. This is the Prefect side of what
`registry.tracking.reopen_run` does for MLflow (the killed attempt's child runs become KILLED).
"""

from __future__ import annotations

from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId,
                                            FlowRunFilterState, FlowRunFilterStateType, TaskRunFilter,
                                            TaskRunFilterState, TaskRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

UNFINISHED = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]


def crash_abandoned(flow_run_ids: list[str], resumed_by: str) -> list[str]:
    """Mark the given flow runs, their subflows at any depth and their task runs Crashed where they
    are still unfinished; returns the ids of the flow runs it marked."""
    if not flow_run_ids:
        return []
    message = f"the process running it was killed; flow run {resumed_by} resumed the lifecycle run"
    with get_client(sync_client=True) as client:
        tree, frontier = set(), [UUID(i) for i in flow_run_ids]
        while frontier:
            tree.update(frontier)
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [c.id for c in children if c.id not in tree]
        in_tree = FlowRunFilterId(any_=sorted(tree))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=in_tree), task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED))))
        flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=in_tree, state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED))))
        for task in tasks:
            client.set_task_run_state(task.id, Crashed(message=message), force=True)
        for run in flows:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return [str(run.id) for run in flows]
