"""Rollouts through a vLLM OpenAI server: the same `Samples` as `stages.rollout.sample`, over plain HTTP.

    samples = sample_via_server("http://127.0.0.1:8000", "grpo-policy", tokenizer, prompts, n=8,
                                max_new_tokens=24, temperature=1.0, seed=0)
    load_adapter("http://127.0.0.1:8000", "grpo-policy", Path("out/rollout-adapter/3"))

The prompt goes to `/v1/completions` as token ids (so the server sees exactly the tokens the training
model will score) and `return_token_ids` brings the completion's token ids back (vLLM >= 0.10; the
0.32 server is the one the project pins): no re-tokenization of text, which would not round-trip.
Stage code cannot import `infra`, so this module knows nothing about how the server was started;
it needs `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` for `load_adapter`.

The server's numbers are never trusted for the loss: GRPO rescores every token with the training
model. Only the sampled token ids come from here.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from stages.rollout import Samples

TIMEOUT_S = 600.0  # a rollout of a few hundred tokens on 2 CPU cores can take minutes


class RolloutServerError(RuntimeError):
    """The rollout server refused a request; the message holds its status code and answer."""


def _post(base_url: str, route: str, body: dict) -> httpx.Response:
    url = f"{base_url.rstrip('/').removesuffix('/v1')}{route}"
    try:
        response = httpx.post(url, json=body, timeout=TIMEOUT_S)
    except httpx.HTTPError as err:
        raise RolloutServerError(f"grpo.rollout_url: {url} did not answer ({err!r})") from err
    return response


def stop_token_ids(tokenizer, generation_eos: int | list[int] | None = None) -> list[int]:
    """The tokens a completion ends at: the policy's generation_config eos ids (eos and bos, see
    stages/checkpoint.generation_config), falling back to the tokenizer's eos."""
    ids = generation_eos if generation_eos is not None else tokenizer.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return [i for i in ids if i is not None]


def sample_via_server(base_url: str, model: str, tokenizer, prompts: list[str], *, n: int, max_new_tokens: int,
                      temperature: float, seed: int, stop_ids: list[int] | None = None) -> Samples:
    """`n` completions per prompt from the served `model` (a base model or a loaded adapter's name).

    Same contract as `rollout.sample`: prompt ids (each repeated `n` times, in order), completion ids
    cut after the first stop token, and texts. Greedy when temperature == 0. `stop_ids` default to the
    tokenizer's eos; pass the policy's generation_config eos ids to stop where `generate` would.
    """
    stops = stop_ids if stop_ids is not None else stop_token_ids(tokenizer)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    body = {"model": model, "prompt": prompt_ids, "n": n, "max_tokens": max_new_tokens,
            # top_k=0 / top_p=1: no truncation, as generate(top_k=None, top_p=None) samples in-process
            "temperature": temperature, "top_p": 1.0, "top_k": 0, "seed": seed, "stop_token_ids": stops,
            "return_token_ids": True, "skip_special_tokens": True}
    response = _post(base_url, "/v1/completions", body)
    if response.status_code != 200:
        raise RolloutServerError(f"{base_url}: /v1/completions for {model!r} answered {response.status_code}: "
                                 f"{response.text[:500]}")
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])  # index = prompt * n + sample
    if len(choices) != len(prompts) * n:
        raise RolloutServerError(f"{base_url}: asked for {len(prompts) * n} completions, got {len(choices)}")
    completions, texts, expanded = [], [], []
    stop_set = set(stops)
    for choice in choices:
        row = choice.get("token_ids")
        if row is None:
            raise RolloutServerError(f"{base_url}: the server returned no token_ids (return_token_ids needs "
                                     "vLLM >= 0.10)")
        cut = next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))
        completions.append(list(row[:cut]))
        texts.append(choice["text"])  # the server's detokenization (skip_special_tokens, like rollout.sample)
        expanded.append(prompt_ids[choice["index"] // n])
    return Samples(prompts=expanded, completions=completions, texts=texts)


def served_models(base_url: str) -> list[str]:
    """The names the server answers to: its base model and every loaded adapter."""
    url = f"{base_url.rstrip('/').removesuffix('/v1')}/v1/models"
    try:
        response = httpx.get(url, timeout=30)
    except httpx.HTTPError as err:
        raise RolloutServerError(f"grpo.rollout_url: {url} did not answer ({err!r})") from err
    if response.status_code != 200:
        raise RolloutServerError(f"{url} answered {response.status_code}: {response.text[:500]}")
    return [m["id"] for m in response.json()["data"]]


def load_adapter(base_url: str, name: str, path: Path) -> None:
    """Hot-load the peft adapter at `path` under `name`, replacing an adapter loaded under that name.

    vLLM refuses a second load of a name it holds, so the old one is unloaded first (a 404/400 for a
    name it does not hold yet is fine). A new path per load also keeps vLLM's prefix cache from
    serving blocks computed with the previous weights.
    """
    _post(base_url, "/v1/unload_lora_adapter", {"lora_name": name})
    response = _post(base_url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(path).resolve())})
    if response.status_code != 200:
        hint = (" (is the server started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and "
                "--max-lora-rank at least the adapter's r?)")
        raise RolloutServerError(f"{base_url}: loading adapter {name!r} from {path} answered {response.status_code}: "
                                 f"{response.text[:500]}{hint}")
