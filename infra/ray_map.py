"""`ray_map(fn, items)`: the builtin `map`, with each call a Ray task (local Ray, or `RAY_ADDRESS`).

Data stages process their input shard by shard and take a `mapper` argument shaped like `map`; the
flows hand them this one. Results come back in input order, and at most `max_in_flight` tasks are
queued at once, so a corpus of thousands of shards does not flood the object store: memory stays
bounded by a few shards' results, whatever the corpus size.

On a multi-node cluster the items (shard paths) must name a filesystem every node sees.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import ray

from infra.ray_executor import ensure_ray

T = TypeVar("T")
R = TypeVar("R")


def ray_map(fn: Callable[[T], R], items: Iterable[T], *, num_cpus: float = 1.0,
            max_in_flight: int | None = None) -> Iterator[R]:
    """Yield `fn(item)` for every item, in order, each computed in a Ray task."""
    ensure_ray()
    remote = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
    limit = max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1) / num_cpus))
    pending: deque[Any] = deque()
    for item in items:
        pending.append(remote.remote(item))
        if len(pending) >= limit:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def mapper(num_cpus: float = 1.0) -> Callable[..., Iterator[Any]]:
    """A `map`-shaped callable bound to these task options (what a stage's `mapper=` takes)."""
    def bound(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        return ray_map(fn, items, num_cpus=num_cpus)

    return bound
