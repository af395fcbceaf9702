"""Runs in every Ray worker process at start-up (`runtime_env` `worker_process_setup_hook`).

Kept to the standard library on purpose: Ray runs the hook in every process it starts, the Train
controller and the data stages' task workers included, so a hook that imported torch (as it did while
it lived in `infra.ray_executor`) cost each of them ~5.6 s and ~560 MB before doing any work, and
fixed torch's thread count before Ray set `OMP_NUM_THREADS` to the worker's CPUs.
"""

from __future__ import annotations

import logging


def quiet_worker_logs() -> None:
    # Without the dashboard there is no State API, and Ray Train's placement-group cleaner warns
    # about that every second; the cleanup it guards still happens on controller exit.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
