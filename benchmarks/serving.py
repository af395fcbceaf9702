"""Serving: vLLM behind the router vs transformers `generate`, same checkpoint, same prompts, one run.

    .venv/bin/python benchmarks/serving.py --checkpoint .flywheel/champion/flywheel-chat/hf_model
    .venv/bin/python benchmarks/serving.py --checkpoint DIR --concurrency 1 8 32 --max-tokens 32 --switches 3

Contenders, each producing exactly `--max-tokens` tokens per request (vLLM `ignore_eos`, HF
`min_new_tokens`), so tokens/s compare like for like:

- *vllm*: the OpenAI server from `.venv-serving`, called at `/v1/completions` through the router
  (infra/router.py, in this process), `c` requests in flight at all times;
- *vllm-direct*: the same server without the router: the router's overhead is the difference;
- *hf*: `model.generate` on the same checkpoint in this process, `c` prompts batched together (static
  batching, the best case for a plain transformers server), fp32 on CPU, bf16 on CUDA.

Reported per concurrency: output tokens/s (median of `--repeats`), latency p50/p95 per request, and
the vllm/hf ratio. `--switches N` also times N blue/green switches under load: alias move seen ->
first response from the new version, and failed requests (the registry poll, `poll_s`, adds at most
2 s to that in production and is not included here).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, markdown_table, median, write_results  # noqa: E402
from infra.router import Router  # noqa: E402
from infra.services import HOST, free_port  # noqa: E402
from infra.vllm_server import ServingConfig, VLLMServer  # noqa: E402
from stages import checkpoint as ckpt  # noqa: E402
from stages.chat import prompt_text  # noqa: E402
from stages.tasks.arithmetic import generate  # noqa: E402

NAME = "bench"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def _vllm_round(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[float, list[float], int]:
    """All prompts through `concurrency` workers; returns (seconds, latencies, output tokens)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    latencies, tokens = [], [0]

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/completions", json={
                "model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens[0] += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies, tokens[0]


def _hf_round(model, tok, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[float, list[float], int]:
    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), concurrency):
        batch = prompts[lo : lo + concurrency]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        b0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        latencies += [time.perf_counter() - b0] * len(batch)  # every request waits for the whole batch
        tokens += (out.shape[1] - enc["input_ids"].shape[1]) * len(batch)
    return time.perf_counter() - t0, latencies, tokens


def _serve_router(router: Router) -> str:
    import uvicorn

    port = free_port()
    threading.Thread(target=uvicorn.run, args=(router.app,), daemon=True,
                     kwargs={"host": HOST, "port": port, "log_level": "warning"}).start()
    url = f"http://{HOST}:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


class StaticChampion:
    """Stands in for the registry: the benchmark moves `version` itself."""

    def __init__(self, checkpoint: Path) -> None:
        self.version, self.checkpoint = "1", checkpoint

    def champion(self) -> str:
        return self.version

    def fetch(self, version: str) -> Path:
        return self.checkpoint


def switch_under_load(router: Router, source: StaticChampion, url: str, prompts: list[str], switches: int) -> list[dict]:
    results = []
    for i in range(switches):
        stop, outcomes = threading.Event(), []

        def load() -> None:
            with httpx.Client(timeout=300) as http:
                for n in range(100_000):
                    if stop.is_set():
                        return
                    t = time.monotonic()
                    try:
                        r = http.post(f"{url}/v1/completions", json={"model": NAME, "prompt": prompts[n % len(prompts)],
                                                                     "max_tokens": 8})
                        outcomes.append((t, r.status_code == 200, r.headers.get("x-model-version")))
                    except httpx.HTTPError:
                        outcomes.append((t, False, None))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        new = str(int(source.version) + 1)
        moved = time.monotonic()
        source.version = new
        while not any(ok and v == new for _, ok, v in outcomes):
            time.sleep(0.05)
        first_new = min(t for t, ok, v in outcomes if ok and v == new)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
        results.append({"switch": i + 1, "to": new, "seconds_to_first_new_response": first_new - moved,
                        "requests": len(outcomes), "failed": sum(not ok for _, ok, _ in outcomes)})
        print(f"switch {i + 1}: v{new} answered {first_new - moved:.1f} s after the move; "
              f"{results[-1]['failed']} of {len(outcomes)} requests failed", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=32, help="requests per round (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--switches", type=int, default=0)
    ap.add_argument("--memory-utilization", type=float, default=0.3)
    args = ap.parse_args()

    tok = ckpt.load_tokenizer(args.checkpoint)
    cuda = torch.cuda.is_available()
    model = ckpt.load_model(args.checkpoint, "cuda" if cuda else "cpu").eval()
    if cuda:
        model = model.to(torch.bfloat16)
    prompts = [prompt_text(tok, p.question) for p in generate(max(args.requests, max(args.concurrency)), seed=123)]

    cfg = ServingConfig(memory_utilization=args.memory_utilization)
    source = StaticChampion(args.checkpoint)
    router = Router(source, served_name=NAME, cfg=cfg, state_dir=Path("/tmp/flywheel-bench-serving"),
                    free_port=free_port)
    started = time.perf_counter()
    url = _serve_router(router)
    print(f"router + vLLM healthy in {time.perf_counter() - started:.1f} s", flush=True)
    direct = router.active.url

    runs = []
    for c in args.concurrency:
        n = max(args.requests, c)
        for r in range(args.repeats):  # contenders alternate within a repeat: background load hits all alike
            for name in ("vllm", "vllm-direct", "hf"):
                if name == "hf":
                    secs, lat, toks = _hf_round(model, tok, prompts[:n], c, args.max_tokens)
                else:
                    secs, lat, toks = asyncio.run(_vllm_round(url if name == "vllm" else direct, prompts[:n], c,
                                                              args.max_tokens))
                runs.append({"contender": name, "concurrency": c, "repeat": r, "seconds": secs, "tokens": toks,
                             "tokens_per_s": toks / secs, "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95)})
                print(f"c={c:<3} {name:12s} {toks / secs:9.1f} tok/s  p50 {percentile(lat, .5):.3f} s  "
                      f"p95 {percentile(lat, .95):.3f} s", flush=True)

    switches = switch_under_load(router, source, url, prompts, args.switches) if args.switches else []
    while len(router.servers) > 1:  # the last switch may still be draining its old version
        time.sleep(0.5)
    router.stop_all()

    rows = []
    for c in args.concurrency:
        pick = {name: [x for x in runs if x["contender"] == name and x["concurrency"] == c]
                for name in ("vllm", "vllm-direct", "hf")}
        tps = {name: median([x["tokens_per_s"] for x in xs]) for name, xs in pick.items()}
        ratio = median([v["tokens_per_s"] / h["tokens_per_s"] for v, h in zip(pick["vllm"], pick["hf"], strict=True)])
        rows.append([c, tps["vllm"], tps["vllm-direct"], tps["hf"], ratio,
                     median([x["p50_s"] for x in pick["vllm"]]), median([x["p95_s"] for x in pick["vllm"]]),
                     median([x["p50_s"] for x in pick["hf"]]), median([x["p95_s"] for x in pick["hf"]])])
    table = markdown_table(["concurrency", "vllm tok/s", "vllm-direct tok/s", "hf tok/s", "vllm/hf",
                            "vllm p50 s", "vllm p95 s", "hf p50 s", "hf p95 s"], rows)
    print(table)
    if switches:
        secs = [s["seconds_to_first_new_response"] for s in switches]
        print(f"switches: median {statistics.median(secs):.1f} s to the new version's first response, "
              f"{sum(s['failed'] for s in switches)} failed of {sum(s['requests'] for s in switches)} requests")
    write_results("serving", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                              "runs": runs, "switches": switches, "table": table})


if __name__ == "__main__":
    main()
