"""A throw-away PostgreSQL server on a free loopback port, for tests and benchmarks of the annotation store.

    python -m infra.postgres /tmp/pg        # prints the SQLAlchemy URL; Ctrl-C stops it

    from infra import postgres
    server = postgres.start(tmp_dir)        # initdb + postgres, ready to connect
    url = server.new_database("labels")     # postgresql+psycopg://postgres:...@127.0.0.1:PORT/labels
    server.stop()                           # fast shutdown of that PID

The binaries: `FLYWHEEL_POSTGRES_BIN` if set, else the newest `/usr/lib/postgresql/<version>/bin`
(Debian's `postgresql` package), else `initdb` on PATH. initdb and postgres refuse to run as root:
as root the server runs as the `postgres` system user (the Debian package creates it), with its data
directory owned by that user. It listens on 127.0.0.1 only, with no Unix socket (socket paths are
limited to 107 bytes and Debian's default socket directory belongs to the system cluster), and a
random password (scram-sha-256): other local users share the loopback interface.

Not durable by default (fsync off): the data is thrown away with the directory, and tests run
several times faster. `durable=True` keeps PostgreSQL's defaults, for benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra.services import HOST, free_port, tail

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SYSTEM_USER = "postgres"  # who runs the server when we are root
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or no user to run them as; the message says which and how to fix."""


def find_bin_dir() -> Path | None:
    """Where initdb and postgres live, or None when PostgreSQL is not installed."""
    if os.environ.get("FLYWHEEL_POSTGRES_BIN"):
        chosen = Path(os.environ["FLYWHEEL_POSTGRES_BIN"])
        return chosen if (chosen / "initdb").exists() else None

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates = [p for p in DEBIAN_ROOT.glob("*/bin") if (p / "initdb").exists() and (p / "postgres").exists()]
    if candidates:
        return max(candidates, key=version)
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


@dataclass
class Postgres:
    """A running server: `url` is its `postgres` database; `new_database` gives a fresh one."""
    pid: int
    port: int
    password: str = field(repr=False)
    data_dir: Path
    log_path: Path
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _owned_dir: Path | None = field(default=None, repr=False)  # a temporary data dir we must remove

    def url_of(self, database: str) -> str:
        return f"postgresql+psycopg://postgres:{self.password}@{HOST}:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def _connect(self, database: str = "postgres", timeout: float = 5.0):
        import psycopg

        return psycopg.connect(host=HOST, port=self.port, user="postgres", password=self.password,
                               dbname=database, connect_timeout=max(1, int(timeout)), autocommit=True)

    def new_database(self, name: str) -> str:
        """Create an empty database (dropping one of that name first); its SQLAlchemy URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name: lower-case letters, digits and _ only, got {name!r}")
        with self._connect() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        return self.url_of(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it."""
        with self._connect() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Fast shutdown (SIGINT: clients are disconnected, nothing waits for them); idempotent."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)
        if not _wait_exit(self.pid, self._proc, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # its children die with the postmaster
            _wait_exit(self.pid, self._proc, 5)
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None


def start(directory: Path | str, *, durable: bool = False, timeout: float = START_TIMEOUT_S) -> Postgres:
    """initdb a new cluster under `directory` and start it on a free loopback port, ready to connect."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable(
            f"PostgreSQL is not installed: no initdb in $FLYWHEEL_POSTGRES_BIN, {DEBIAN_ROOT}/<version>/bin or on "
            "PATH (Debian: apt-get install postgresql, or `make test-deps`)")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    user = _server_user()
    owned_dir = None
    if user is not None and not _reachable(directory, user):
        # pytest's and mkdtemp's folders are private to root: the server user could not enter them.
        owned_dir = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
        base = owned_dir
    else:
        base = directory
    data_dir = base / "data"
    data_dir.mkdir(mode=0o700)
    password = secrets.token_urlsafe(18)
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if user is not None:
        for path in (base, data_dir, pwfile):
            os.chown(path, user.pw_uid, user.pw_gid)
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--pwfile", str(pwfile),
              "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"], user, data_dir)
    finally:
        pwfile.unlink(missing_ok=True)

    log_path = directory / "postgres.log"
    settings = [f"listen_addresses={HOST}", "unix_socket_directories=", "max_connections=300",
                *(() if durable else FAST_SETTINGS)]
    for _attempt in range(3):  # the free port may be taken by someone else before we bind it
        port = free_port()
        cmd = [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port)]
        for setting in settings:
            cmd += ["-c", setting]
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    cwd=data_dir, start_new_session=True, **_as_user(user))
        server = Postgres(proc.pid, port, password, data_dir, log_path, proc, owned_dir)
        try:
            _wait_ready(server, timeout)
            return server
        except _PortTaken:
            continue
        except BaseException:
            server.stop(timeout=5)
            raise
    raise RuntimeError(f"postgres: could not bind a free port in 3 attempts; see {log_path}:\n{tail(log_path)}")


class _PortTaken(Exception):
    pass


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as: None for ourselves, the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, but initdb and postgres refuse root and there is no {SYSTEM_USER!r} user to "
            "run them as (Debian's postgresql package creates it; or run as another user)") from None


def _as_user(user: pwd.struct_passwd | None) -> dict:
    if user is None:
        return {}
    # Popen switches user in the child itself: the PID we keep is the server's own, not a wrapper's.
    env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "LC_ALL": "C"}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": env}


def _run(cmd: list[str], user: pwd.struct_passwd | None, cwd: Path) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, **_as_user(user))
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")


def _reachable(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether `user` may enter every folder down to `path` (the execute bit, by owner, group or other)."""
    groups = {g for g in os.getgrouplist(user.pw_name, user.pw_gid)}
    for folder in (path, *path.parents):
        st = folder.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in groups:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


def _wait_ready(server: Postgres, timeout: float) -> None:
    import psycopg

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        code = server._proc.poll() if server._proc else None
        if code is not None:
            log = tail(server.log_path)
            if "could not bind" in log or "Address already in use" in log:
                raise _PortTaken()
            raise RuntimeError(f"postgres exited with code {code} before accepting connections; "
                               f"see {server.log_path}:\n{log}")
        try:
            with server._connect(timeout=2):
                return
        except psycopg.OperationalError:
            time.sleep(0.1)
    raise TimeoutError(f"postgres (pid {server.pid}) not accepting connections on {HOST}:{server.port} after "
                       f"{timeout:.0f} s; see {server.log_path}:\n{tail(server.log_path)}")


def _wait_exit(pid: int, proc: subprocess.Popen | None, timeout: float) -> bool:
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m infra.postgres DIR   (starts a throw-away PostgreSQL; Ctrl-C stops it)",
              file=sys.stderr)
        return 2
    try:
        server = start(args[0])
    except (PostgresUnavailable, RuntimeError, TimeoutError) as err:
        print(f"infra.postgres: {err}", file=sys.stderr)
        return 1
    print(server.url, flush=True)
    stop_now = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_now.append(1))
    try:
        while not stop_now and server._proc.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
