"""The embedded Prefect and MLflow servers, the deployments' worker, the annotation page and the
serving router: start once, reuse, stop.

    python -c "from infra import services; print(services.up())"
    python -c "from infra import services; print(services.up_serving('flywheel-chat'))"
    python -c "from infra import services; print(services.up_annotation())"

For each service: an environment variable (`PREFECT_API_URL`, `MLFLOW_TRACKING_URI`, `SERVING_URL`) wins and
nothing is started (that is how the platform talks to real servers at scale). Otherwise the server
we recorded in `<state root>/services/<name>.json` is reused if it is alive and answers its health
check, or a new one is started on a free loopback port as a detached process (its own session, so
it outlives the caller and `down()` can stop its whole process group). Logs go to
`<state root>/logs/<name>.log`; all data lives under the state root.

Measured on 2 cores: Prefect ~200 MB, MLflow with one worker and no job runner ~0.5 GB; both are
started at once and waited for together. The serving router (`flywheel serve --foreground`, see
infra/router.py) starts its vLLM servers in its own process group, so stopping it stops them too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import psutil

from infra.settings import OFFLINE_ENV, Settings, load_settings

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Every service, in start order; an environment variable that points at one elsewhere starts nothing.
SERVICES = ("prefect", "mlflow", "worker", "annotation", "serving")
ENV_VARS = {"prefect": "PREFECT_API_URL", "mlflow": "MLFLOW_TRACKING_URI", "serving": "SERVING_URL",
            "annotation": "FLYWHEEL_ANNOTATION_URL"}
CORE = ("prefect", "mlflow")  # what up() starts; serving starts once there is a champion to serve
HEALTH_TIMEOUT_S = 120.0  # Prefect runs its DB migrations on first start: ~10-20 s on 2 cores
SERVING_TIMEOUT_S = 900.0  # the router is healthy once vLLM serves the champion: 35-105 s on 2 cores
STOP_TIMEOUT_S = 15.0

# Popen handles of servers started by this process, kept so Python does not warn about (and
# eventually reaps) children it still considers running; keyed by pid.
_children: dict[int, subprocess.Popen] = {}


@dataclass
class _Launch:
    name: str
    proc: subprocess.Popen
    port: int
    url: str
    log_path: Path


# ----------------------------------------------------------------------------- public API


def up(settings: Settings | None = None, timeout: float = HEALTH_TIMEOUT_S, worker: bool = False) -> dict[str, str]:
    """Make sure Prefect and MLflow are reachable (and, with `worker`, the process that executes
    deployment runs: `flywheel worker`); return their URLs.

    Returns {"prefect": api_url, "mlflow": tracking_uri, "prefect_ui": ..., "mlflow_ui": ...} and
    "worker" (its health URL) when asked for. Does not change os.environ: call `export_env(urls)`.
    """
    s = settings or load_settings()
    urls = _ensure(s, CORE, timeout)
    if worker:  # after Prefect: the worker registers its deployments there as it starts
        env = {"PREFECT_API_URL": urls["prefect"], "MLFLOW_TRACKING_URI": urls["mlflow"]}
        urls |= _ensure(s, ("worker",), timeout, env=env)
    urls["prefect_ui"] = _strip_api(urls["prefect"])
    urls["mlflow_ui"] = urls["mlflow"]
    return urls


def up_annotation(settings: Settings | None = None, timeout: float = HEALTH_TIMEOUT_S) -> str:
    """Make sure the annotation page runs (`flywheel annotate --foreground`); return its URL.

    `FLYWHEEL_ANNOTATION_URL` points at a page that runs elsewhere and starts nothing. The page
    reads the labels database from `FLYWHEEL_LABELS_DB` (default: SQLite under the state root).
    """
    s = settings or load_settings()
    return _ensure(s, ("annotation",), timeout)["annotation"]


def up_serving(model_name: str, settings: Settings | None = None, timeout: float = SERVING_TIMEOUT_S) -> str:
    """Make sure the serving router runs (it serves `model_name`@champion); return its OpenAI base URL.

    Needs MLFLOW_TRACKING_URI in the environment (the router reads the alias from it): call
    `export_env(up())` first. `SERVING_URL` points at serving that runs elsewhere and starts nothing.
    """
    s = settings or load_settings()
    return _ensure(s, ("serving",), timeout, model_name=model_name)["serving"]


def _ensure(s: Settings, names: tuple[str, ...], timeout: float, model_name: str = "",
            env: dict[str, str] | None = None) -> dict[str, str]:
    urls: dict[str, str] = {}
    # One lock per group: waiting minutes for serving must not block `up()` of Prefect and MLflow.
    with _lock(s, "-".join(names)):
        launches: list[_Launch] = []
        for name in names:
            external = os.environ.get(ENV_VARS.get(name, ""))
            if external:
                log.info("%s: using %s=%s, starting nothing", name, ENV_VARS[name], external)
                urls[name] = external
                continue
            record = _read_record(s, name)
            if record and _alive(record) and _healthy(name, record["url"]):
                log.info("%s: reusing server pid %s at %s", name, record["pid"], record["url"])
                urls[name] = record["url"]
                continue
            if record:  # stale or hung: clear it before starting a new one
                log.warning("%s: recorded server pid %s is not healthy; replacing it", name, record["pid"])
                _stop(s, name, record)
            taken = {launch.port for launch in launches}
            launches.append(_launch(s, name, free_port(taken), model_name, env))

        # Both servers boot concurrently; wait for each in turn.
        try:
            for launch in launches:
                _wait_healthy(launch, timeout)
        except Exception:
            for launch in launches:
                _kill_group(launch.proc.pid, timeout=5)
            raise
        for launch in launches:
            _write_record(s, launch)
            urls[launch.name] = launch.url
    return urls


def status(settings: Settings | None = None) -> dict[str, dict]:
    """Per service: url, pid, alive, healthy, external (an env var points elsewhere)."""
    s = settings or load_settings()
    out: dict[str, dict] = {}
    for name in SERVICES:
        var = ENV_VARS.get(name, "")
        external = os.environ.get(var)
        if external:
            healthy = _healthy(name, external) if external.startswith("http") else True
            out[name] = {"url": external, "pid": None, "alive": healthy, "healthy": healthy, "external": True}
            continue
        record = _read_record(s, name)
        if record is None:
            out[name] = {"url": None, "pid": None, "alive": False, "healthy": False, "external": False}
            continue
        alive = _alive(record)
        out[name] = {
            "url": record["url"],
            "pid": record["pid"],
            "alive": alive,
            "healthy": alive and _healthy(name, record["url"]),
            "external": False,
        }
    return out


def down(settings: Settings | None = None, timeout: float = STOP_TIMEOUT_S,
         names: tuple[str, ...] = tuple(reversed(SERVICES))) -> list[str]:
    """Stop the servers we recorded (never external ones); return the names stopped.

    In reverse start order by default: serving and the worker use the registry until they stop.
    """
    s = settings or load_settings()
    stopped = []
    with (_lock(s, "serving"), _lock(s, "annotation"), _lock(s, "worker"), _lock(s, "-".join(CORE))):
        for name in names:
            record = _read_record(s, name)
            if record is None:
                continue
            _stop(s, name, record, timeout)
            stopped.append(name)
    return stopped


def export_env(urls: dict[str, str]) -> None:
    """Point this process (and its future children) at the given servers."""
    os.environ["PREFECT_API_URL"] = urls["prefect"]
    os.environ["MLFLOW_TRACKING_URI"] = urls["mlflow"]
    _refresh_loaded_clients()


def clear_env() -> None:
    """Undo `export_env`: back to whatever the defaults are without a server."""
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    _refresh_loaded_clients()


def _refresh_loaded_clients() -> None:
    # Prefect freezes its settings when it is imported, and MLflow caches a URI set through
    # mlflow.set_tracking_uri: updating os.environ alone is not enough once they are loaded.
    if "prefect.context" in sys.modules:
        import prefect.context

        prefect.context.refresh_global_settings_context()
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))


def server_env(settings: Settings) -> dict[str, str]:
    """The environment a server is started with: ours, plus offline defaults, state in the root."""
    env = dict(os.environ)
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    # The servers we own keep their state under the state root, whatever this process uses.
    # PREFECT_API_DATABASE_CONNECTION_URL (e.g. PostgreSQL) passes through untouched.
    env["PREFECT_HOME"] = str(settings.home / "prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # the server ignores DO_NOT_TRACK
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # job runner: +2 GB, 11 more processes
    return env


# ----------------------------------------------------------------------------- starting


def _command(settings: Settings, name: str, port: int, model_name: str = "") -> tuple[list[str], str]:
    """The command line for one server and the URL clients use."""
    bin_dir = Path(sys.executable).parent
    if name == "serving":
        cmd = [str(bin_dir / "flywheel"), "serve", "--foreground", "--port", str(port), "--name", model_name]
        return cmd, f"http://{HOST}:{port}/v1"
    if name == "annotation":  # the page and the worker both answer GET /health at their URL
        return [str(bin_dir / "flywheel"), "annotate", "--foreground", "--port", str(port)], f"http://{HOST}:{port}"
    if name == "worker":
        return [str(bin_dir / "flywheel"), "worker", "--port", str(port)], f"http://{HOST}:{port}"
    if name == "prefect":
        cmd = [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
        return cmd, f"http://{HOST}:{port}/api"
    home = settings.home / "mlflow"
    (home / "artifacts").mkdir(parents=True, exist_ok=True)
    cmd = [
        str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(home / "artifacts"),
    ]
    return cmd, f"http://{HOST}:{port}"


def _launch(settings: Settings, name: str, port: int, model_name: str = "",
            env: dict[str, str] | None = None) -> _Launch:
    cmd, url = _command(settings, name, port, model_name)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    (settings.home / "prefect").mkdir(parents=True, exist_ok=True)
    log_path = settings.logs_dir / f"{name}.log"
    with open(log_path, "ab") as logf:
        logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**server_env(settings), **(env or {}), **_own_env(name, url)},
            cwd=settings.home,  # anything a server writes relative lands in the state root
            start_new_session=True,  # own process group: survives us, and down() kills the group
        )
    _children[proc.pid] = proc
    log.info("%s: started pid %s on %s (log: %s)", name, proc.pid, url, log_path)
    return _Launch(name, proc, port, url, log_path)


def _own_env(name: str, url: str) -> dict[str, str]:
    # Prefect's UI asks /ui-settings where the API is; unset, it answers the default port 4200, and
    # the page of a server on any other port shows "Can't connect to Server API".
    return {"PREFECT_UI_API_URL": url} if name == "prefect" else {}


def _wait_healthy(launch: _Launch, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        code = launch.proc.poll()
        if code is not None:
            raise RuntimeError(
                f"{launch.name} server exited with code {code} before becoming healthy; "
                f"see {launch.log_path}:\n{tail(launch.log_path)}"
            )
        if _healthy(launch.name, launch.url):
            log.info("%s: healthy after %.1f s", launch.name, time.monotonic() - t0)
            return
        time.sleep(0.25)
    raise TimeoutError(
        f"{launch.name} server (pid {launch.proc.pid}) not healthy at {launch.url} after "
        f"{timeout:.0f} s; see {launch.log_path}:\n{tail(launch.log_path)}"
    )


def check_port_free(port: int) -> None:
    """Raise OSError naming the port if something listens there: uvicorn would exit the process instead."""
    host = load_settings().bind_host
    with socket.socket() as sock:
        # As uvicorn binds: a port whose old connections linger in TIME_WAIT is free to listen on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise OSError(f"port {port} on {host} is in use ({err.strerror}): pick another with --port") from None


def free_port(taken: set[int] = frozenset()) -> int:
    """A loopback port nobody listens on (and not one we just handed to another server)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


def _healthy(name: str, url: str) -> bool:
    if name == "serving":  # healthy = the champion answers (the router's /health sits beside /v1)
        health = f"{url.rstrip('/').removesuffix('/v1')}/health"
    elif name in ("prefect", "annotation", "worker"):
        health = f"{url.rstrip('/')}/health"
    else:
        health = f"{_strip_api(url)}/health"
    try:
        return httpx.get(health, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _strip_api(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else url


def tail(path: Path, n: int = 20) -> str:
    """The last `n` lines of a log file (empty if unreadable): what an error message quotes."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- records, stopping


def _record_path(settings: Settings, name: str) -> Path:
    return settings.services_dir / f"{name}.json"


def _read_record(settings: Settings, name: str) -> dict | None:
    try:
        return json.loads(_record_path(settings, name).read_text())
    except (OSError, ValueError):
        return None


def _write_record(settings: Settings, launch: _Launch) -> None:
    record = {
        "pid": launch.proc.pid,
        "url": launch.url,
        "port": launch.port,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # create_time tells our server from an unrelated process that reused its pid
        "create_time": psutil.Process(launch.proc.pid).create_time(),
        "log": str(launch.log_path),
    }
    path = _record_path(settings, launch.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def _alive(record: dict) -> bool:
    try:
        proc = psutil.Process(record["pid"])
        same = abs(proc.create_time() - record.get("create_time", proc.create_time())) < 1.0
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError):
        return False


def _stop(settings: Settings, name: str, record: dict, timeout: float = STOP_TIMEOUT_S) -> None:
    if _alive(record):
        log.info("%s: stopping pid %s", name, record["pid"])
        _kill_group(record["pid"], timeout)
    _record_path(settings, name).unlink(missing_ok=True)


def _kill_group(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL whatever is left after `timeout`."""
    try:
        leader = psutil.Process(pid)
        procs = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        same_group = os.getpgid(pid) == pid  # start_new_session made it a group leader
    except ProcessLookupError:
        same_group = False
    if same_group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    else:
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)  # also reaps our own children
    for p in alive:
        log.warning("pid %s ignored SIGTERM for %.0f s; killing it", p.pid, timeout)
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    proc = _children.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.wait(timeout=1)


@contextlib.contextmanager
def _lock(settings: Settings, group: str) -> Iterator[None]:
    """One up()/down() of a group of services at a time per state root, across processes."""
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.services_dir / f".lock-{group}", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
