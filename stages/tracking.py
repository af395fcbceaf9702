"""What a stage may tell the outside world while it runs, without knowing who listens.

Stages receive a `Tracker` (MLflow in the platform, nothing in a unit test). It is a Protocol, so
anything with these three methods qualifies; `registry.tracking.MLflowTracker` is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """Discards everything; the default when a stage is called from a test or a notebook."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


class RecordingTracker(NullTracker):
    """Keeps what it is told in memory: handy in tests and in benchmarks."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def series(self, name: str) -> list[float]:
        return [m[name] for _, m in self.metrics if name in m]
