"""The serving front: one stable OpenAI base URL that always answers with the current champion.

    router = Router(source, served_name="flywheel-chat", cfg=ServingConfig(), state_dir=...)
    uvicorn.run(router.app, host="127.0.0.1", port=8000)      # what `flywheel serve` runs

vLLM has no way to swap weights in a running server on CPU (no sleep mode, every weight-transfer
backend needs a GPU), so a promotion is a blue/green switch: start the new version's server beside
the old one, wait for its health check and one real completion, send new requests to it, let the old
one finish what it has in flight, stop it. The router itself is a thin ASGI proxy (Starlette, httpx
and uvicorn are already in the main environment): it forwards `/v1/*` unchanged (streaming
included), stamps every response with `X-Model-Version`, and writes one log line per request. The
active server's API docs (`/docs`, `/openapi.json` and the Swagger assets under `/static/`) pass through
too, unlogged: vLLM serves those assets itself only with `--enable-offline-docs` (its default page
loads them from a CDN, which an offline browser cannot reach).

Who the champion is comes from a `ChampionSource`, polled every `cfg.poll_s` seconds: polling rather
than MLflow webhooks because it sees every kind of move (gate, CLI, a hand edit in the MLflow UI)
with one code path, needs no receiver reachable from the MLflow server, and costs one small REST
call per poll. A failed switch keeps the old version serving and is retried after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from infra.vllm_server import ServingConfig, VLLMServer

log = logging.getLogger(__name__)

# Set by the platform's own callers (the queue fill, benchmarks): their prompts are not users' and
# are never sampled back out of the request log.
CLIENT_HEADER = "X-Flywheel-Client"
VERSION_HEADER = "X-Model-Version"
# Headers that describe one hop, not the message: never forwarded.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
               "proxy-authenticate", "proxy-authorization", "content-length"}
RETRY_AFTER_FAILURE_S = 60.0
LOGGED_CHARS = 4000  # of a prompt or a response, per request


class ChampionSource(Protocol):
    def champion(self) -> str | None:
        """The version the champion alias points at now (None: there is no champion)."""

    def fetch(self, version: str) -> Path:
        """A local Hugging Face directory holding that version's files."""


class Router:
    def __init__(self, source: ChampionSource, *, served_name: str, cfg: ServingConfig, state_dir: Path,
                 free_port: Callable[[], int]) -> None:
        self.source, self.served_name, self.cfg = source, served_name, cfg
        self.state_dir, self.free_port = Path(state_dir), free_port
        self.active: VLLMServer | None = None
        self.servers: set[VLLMServer] = set()  # every server started and not yet stopped
        self.switching_to: str | None = None
        self.last_error: str | None = None
        self.switches: list[dict] = []
        self._failed: dict[str, float] = {}  # version -> monotonic time of its failed start
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        self._requests = _request_logger(self.state_dir / "logs" / "requests.jsonl")
        self.app = Starlette(routes=[
            Route("/health", self.health),
            Route("/status", self.status),
            Route("/v1/{path:path}", self.proxy, methods=["GET", "POST", "DELETE"]),
            *(Route(path, self.docs) for path in ("/docs", "/openapi.json", "/static/{path:path}")),
        ], lifespan=self._lifespan)

    # ------------------------------------------------------------------ following the champion

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        follower = asyncio.create_task(self.follow())
        try:
            yield
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await self._client.aclose()
            await asyncio.to_thread(self.stop_all)

    def stop_all(self) -> None:
        """Stop every vLLM server this router started: the active one, and any starting or draining."""
        for server in list(self.servers):
            self._stop(server)
        self.active = None

    def _stop(self, server: VLLMServer) -> None:
        server.stop()
        self.servers.discard(server)

    async def follow(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the registry being briefly unreachable must not stop serving
                self.last_error = f"{type(err).__name__}: {err}"
                log.warning("following the champion: %s", self.last_error)
            await asyncio.sleep(self.cfg.poll_s)

    async def sync_once(self) -> None:
        """One look at the registry; switch if the champion moved or the active server died."""
        wanted = await asyncio.to_thread(self.source.champion)
        if wanted is None:
            return
        active = self.active
        dead = active is not None and active.proc.poll() is not None
        if active is not None and active.version == wanted and not dead:
            return
        failed_at = self._failed.get(wanted)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_FAILURE_S:
            return
        await self.switch(wanted)

    async def switch(self, version: str) -> None:
        """Blue/green: start `version`, check it answers, route to it, drain and stop the old one."""
        moved_at = time.monotonic()
        self.switching_to = version
        green: VLLMServer | None = None
        try:
            model_dir = await asyncio.to_thread(self.source.fetch, version)
            green = VLLMServer.start(model_dir, version=version, served_name=self.served_name,
                                     port=self.free_port(), cfg=self.cfg, log_dir=self.state_dir / "logs")
            self.servers.add(green)
            await asyncio.to_thread(green.wait_healthy, self.cfg.health_timeout_s)
            await self._smoke_test(green)
        except Exception as err:
            self._failed[version] = time.monotonic()
            self.last_error = f"v{version} failed to start: {err}"
            log.error("%s; still serving %s", self.last_error, self.active.version if self.active else "nothing")
            if green is not None:
                await asyncio.to_thread(self._stop, green)
            return
        finally:
            self.switching_to = None
        blue, self.active = self.active, green
        self._failed.pop(version, None)
        self.last_error = None
        ready_s = time.monotonic() - moved_at
        log.info("serving v%s (ready %.1f s after the move was seen)%s", version, ready_s,
                 f"; draining v{blue.version}" if blue else "")
        self.switches.append({"from": blue.version if blue else None, "to": version, "ready_s": round(ready_s, 2),
                              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if blue is not None:
            await self._drain(blue)
            await asyncio.to_thread(self._stop, blue)

    async def _smoke_test(self, server: VLLMServer) -> None:
        """Healthy is not enough: one real completion proves the weights load and generate."""
        r = await self._client.post(f"{server.url}/v1/completions", timeout=120.0,
                                    json={"model": self.served_name, "prompt": "Hello", "max_tokens": 1})
        if r.status_code != 200:
            raise RuntimeError(f"smoke completion answered {r.status_code}: {r.text[:200]}")

    async def _drain(self, server: VLLMServer) -> None:
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while server.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if server.inflight:
            log.warning("v%s still had %d requests after %.0f s; stopping it anyway", server.version,
                        server.inflight, self.cfg.drain_timeout_s)

    # ------------------------------------------------------------------ HTTP

    async def health(self, request: Request) -> Response:
        if self.active is None:
            return JSONResponse({"status": "starting", "switching_to": self.switching_to,
                                 "error": self.last_error}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.served_name, "version": self.active.version},
                            headers={VERSION_HEADER: self.active.version})

    async def status(self, request: Request) -> Response:
        active = self.active
        return JSONResponse({
            "model": self.served_name,
            "version": active.version if active else None,
            "backend": active.url if active else None,
            "inflight": active.inflight if active else 0,
            "switching_to": self.switching_to,
            "last_error": self.last_error,
            "switches": self.switches[-20:],
        })

    async def proxy(self, request: Request) -> Response:
        backend = self.active
        if backend is None:
            return _error(503, "no model version is being served yet (the champion's server is starting)")
        backend.inflight += 1  # before any await: a drain that starts now must wait for this request
        try:
            body = await request.body()
        except BaseException:  # the client went away
            backend.inflight -= 1
            raise
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        started = time.perf_counter()
        try:
            upstream = await self._send(backend, request, headers, body)
        except httpx.TransportError as err:
            backend.inflight -= 1
            # The active server died under us: one retry on whatever serves now (a restart, or a switch).
            retry = self.active
            if retry is None or retry is backend:
                return _error(502, f"model server for v{backend.version} unreachable: {type(err).__name__}")
            backend = retry
            backend.inflight += 1
            try:
                upstream = await self._send(backend, request, headers, body)
            except httpx.TransportError as err2:
                backend.inflight -= 1
                return _error(502, f"model server for v{backend.version} unreachable: {type(err2).__name__}")
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        out_headers[VERSION_HEADER] = backend.version

        async def relay() -> AsyncIterator[bytes]:
            kept: list[bytes] = []
            try:
                async for chunk in upstream.aiter_raw():
                    if sum(map(len, kept)) < 4 * LOGGED_CHARS:
                        kept.append(chunk)
                    yield chunk
            finally:
                await upstream.aclose()
                backend.inflight -= 1
                self._log(request, body, b"".join(kept), upstream.status_code, backend.version,
                          time.perf_counter() - started)

        return StreamingResponse(relay(), status_code=upstream.status_code, headers=out_headers)

    async def docs(self, request: Request) -> Response:
        """The active vLLM server's API docs page and what it loads; not requests worth a log line."""
        backend = self.active
        if backend is None:
            return _error(503, "no model version is being served yet (the champion's server is starting)")
        try:
            upstream = await self._client.get(f"{backend.url}{request.url.path}", params=request.query_params)
        except httpx.TransportError as err:
            return _error(502, f"model server for v{backend.version} unreachable: {type(err).__name__}")
        # httpx has decoded the body already: its content-encoding no longer applies.
        out_headers = {k: v for k, v in upstream.headers.items()
                       if k.lower() not in HOP_HEADERS and k.lower() != "content-encoding"}
        out_headers[VERSION_HEADER] = backend.version
        return Response(upstream.content, status_code=upstream.status_code, headers=out_headers)

    async def _send(self, backend: VLLMServer, request: Request, headers: dict, body: bytes) -> httpx.Response:
        upstream = self._client.build_request(request.method, f"{backend.url}{request.url.path}",
                                              params=request.query_params, headers=headers, content=body)
        return await self._client.send(upstream, stream=True)

    def _log(self, request: Request, body: bytes, response: bytes, status: int, version: str, seconds: float) -> None:
        record = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "path": request.url.path, "status": status,
                  "model_version": version, "latency_s": round(seconds, 4)}
        if request.headers.get(CLIENT_HEADER):  # the platform's own traffic, not a user's prompt
            record["client"] = request.headers[CLIENT_HEADER]
        if self.cfg.log_prompts:
            request_json = _json_or_none(body) or {}
            record["prompt"] = _prompt_of(request_json)
            record["response"] = _response_text(response)[:LOGGED_CHARS]
            record["stream"] = bool(request_json.get("stream"))
        self._requests.info(json.dumps(record, ensure_ascii=False))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "service_unavailable", "code": status}},
                        status_code=status)


def _request_logger(path: Path) -> logging.Logger:
    """JSON lines, rotated at 10 MB (5 files kept): the human loop samples prompts from here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"flywheel.serving.requests.{path}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 * 2**20, backupCount=5, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def _json_or_none(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _prompt_of(request_json: dict) -> object:
    """Chat messages as they were sent, or the completion prompt, cut to a loggable size."""
    if "messages" in request_json:
        return [{"role": m.get("role"), "content": str(m.get("content"))[:LOGGED_CHARS]}
                for m in request_json["messages"] if isinstance(m, dict)]
    prompt = request_json.get("prompt")
    return str(prompt)[:LOGGED_CHARS] if prompt is not None else None


def _response_text(raw: bytes) -> str:
    """The generated text of a JSON response or of a server-sent-event stream (first choice)."""
    whole = _json_or_none(raw)
    if whole is not None:
        choice = (whole.get("choices") or [{}])[0]
        return str((choice.get("message") or {}).get("content") or choice.get("text") or "")
    parts = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        event = _json_or_none(line.removeprefix("data: ").encode()) if line.startswith("data: {") else None
        for choice in (event or {}).get("choices", []):
            if choice.get("index", 0) == 0:
                parts.append(str((choice.get("delta") or {}).get("content") or choice.get("text") or ""))
    return "".join(parts)
