"""Step time of our SFT, DPO and GRPO stages against TRL 1.16's SFTTrainer, DPOTrainer and GRPOTrainer.

    .venv/bin/python benchmarks/trl_steps.py --steps 20 --warmup 3 --repeats 3 --out results.json
    .venv/bin/python benchmarks/trl_steps.py --quick                        # smoke run, about 2 minutes
    python benchmarks/trl_steps.py --device cuda --size small [--trl-vllm --trl-python ENV/bin/python]

One model for both sides: a Llama built from config (`--size tiny`: the tiny preset's hidden 128, 4 layers,
4 heads, 2 KV heads, SwiGLU 384; `--size small`: hidden 256, 6 layers, for a GPU), freshly initialised and saved
once as a checkpoint that our stages load by path and TRL gets as the loaded model. One tokenizer (the tiny
preset's, trained locally) and one chat template. The data are the arithmetic problems of the collected
dataset, and TRL sees exactly the batches our stages draw: its dataset is our stages' per-step sample laid out
in order and read sequentially (`train_sampling_strategy="sequential"`, GRPO `shuffle_dataset=False`), in
TRL's conversational prompt/completion (SFT), prompt/chosen/rejected (DPO) and prompt (GRPO) forms. The
worker hashes the token ids each side trains on; the table prints tokens per step so the match is visible.

Equal on both sides: batch (SFT/DPO rows; GRPO prompts x group = TRL's per-device batch of completions), no
gradient accumulation, AdamW (lr, betas 0.9/0.95, weight decay 0.1, fused on CUDA only, as ours), grad clip
1.0, cosine schedule without warm-up, precision (fp32 on CPU; bf16 autocast over fp32 weights on CUDA), no
gradient checkpointing (TRL's default is on), SDPA attention, DPO beta and sigmoid loss with a live reference
model, GRPO max_completion_length = max_new_tokens, temperature, num_generations = group_size,
num_iterations = updates_per_rollout, beta = kl_coef, epsilon = clip_eps, loss_type "grpo" (TRL's default is
"dapo"), group-scaled rewards, no top-k/top-p, the same reward function (stages.rewards.combined). TRL's
logging, evaluation, saving, progress bars and reporting are off.

What still differs, because it is each framework's own step: TRL's fused LM head also computes the entropy
(and, for SFT, top-1 accuracy) of every token for its metrics; TRL's DPO pads chosen and rejected rows to one
width and runs them in one forward, ours in two; with num_iterations > 1 TRL takes the "old" log-probs with an
extra forward while ours reuses the first update's; on CUDA ours compiles the model (`train.compile=auto`)
and TRL does not (`--compile off` or `on` sets both alike). A freshly initialised policy rarely samples the
end-of-turn token, so GRPO completions run to max_new_tokens on both sides (pass `--policy DIR` to time a
trained one).

Each (framework, method) runs in a subprocess of its own, so peak memory is clean: ru_maxrss on CPU (a
baseline after imports is reported too: TRL imports more), torch.cuda.max_memory_allocated on CUDA. The
time of a step is the wall time between two consecutive ends of optimizer steps (our stage's per-step
tracker call, TRL's `on_step_end`), so it includes the data, the reference forwards and GRPO's rollout;
the first `--warmup` intervals are dropped (on CUDA give ours' torch.compile a few more, e.g. `--warmup 5`:
GRPO's batch widths vary and each new one may recompile). Runs alternate ours, TRL, ours, TRL... over
`--repeats`; the table shows the median and interquartile range of the pooled steps, the ratio TRL/ours of
the medians and the ratio within each repeat. On CPU each run uses one torch thread (`--threads`): on a
2-core machine that other work shares, two threads each spin against that work and a step took 5-8x longer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a plain script from the repository root
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

METHODS = ("sft", "dpo", "grpo")
FRAMEWORKS = ("ours", "trl")
TARGETS = {"sft": 1.3, "dpo": 1.3, "grpo": 1.5}  # issue 8: TRL/ours at least this
SIZES = {"small": {"hidden_size": 256, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 768}}
RESULT = "RESULT "  # prefix of the worker's one line of JSON on stdout


@dataclass(frozen=True)
class Spec:
    """Everything one timed run needs; the same values go to our stage and to TRL."""

    framework: str
    method: str
    device: str
    policy: str
    dataset: str
    work: str
    steps: int  # optimizer steps run (warm-up + timed + 1: a step's time is the gap between two step ends)
    warmup: int
    lr: float
    batch_size: int  # SFT/DPO rows; GRPO prompts per step
    group_size: int = 8
    max_new_tokens: int = 20
    temperature: float = 1.0
    kl_coef: float = 0.04
    clip_eps: float = 0.2
    updates_per_rollout: int = 1
    beta: float = 0.1
    format_weight: float = 0.1
    compile: str = "default"  # default: ours auto (on for CUDA), TRL off; "on"/"off": both alike
    trl_vllm: bool = False
    threads: int = 1  # torch intra-op threads, both sides alike
    seed: int = 0


# --- the data both sides see ---------------------------------------------------------------------


def drawn_indices(spec: Spec, n_items: int) -> list[list[int]]:
    """The items our stage's `batch_at` draws, per step (SFT, DPO) or per rollout (GRPO).

    Mirrors stages/sft.py and stages/dpo.py (`default_rng([seed, step]).integers(0, n, batch)`) and
    stages/grpo.py (`default_rng([seed, rollout, 0])`, one rollout per `updates_per_rollout` steps); the token
    hashes in the results show when a change there breaks the match.
    """
    if spec.method == "grpo":
        keys = [[spec.seed, r, 0] for r in range(math.ceil(spec.steps / spec.updates_per_rollout))]
    else:
        keys = [[spec.seed, step] for step in range(spec.steps)]
    return [np.random.default_rng(k).integers(0, n_items, size=spec.batch_size).tolist() for k in keys]


def records(spec: Spec) -> list[dict[str, Any]]:
    """The rows both sides train on, in step order, in TRL's conversational form."""
    from stages.chat import load_problems
    from stages.dpo import synthetic_pairs
    from stages.tasks.arithmetic import target

    problems = load_problems(Path(spec.dataset), "train")

    def user(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    def assistant(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    if spec.method == "sft":
        items = [{"prompt": user(p.question), "completion": assistant(target(p))} for p in problems]
    elif spec.method == "dpo":
        items = [{"prompt": user(d["prompt"]), "chosen": assistant(d["chosen"]), "rejected": assistant(d["rejected"])}
                 for d in synthetic_pairs(problems, spec.seed)]
    else:
        items = [{"prompt": user(p.question), "answer": p.answer} for p in problems]
    return [items[i] for batch in drawn_indices(spec, len(items)) for i in batch]


def token_digest(sequences: list[list[int]]) -> dict[str, Any]:
    h = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:16]
    return {"sha256": h, "rows": len(sequences), "tokens": sum(map(len, sequences))}


def ours_tokens(spec: Spec, tokenizer, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The token ids our stage builds for these rows, through the stages' own encoders."""
    from stages.chat import conversation_ids, prompt_and_response

    if spec.method == "sft":
        return token_digest([conversation_ids(tokenizer, r["prompt"] + r["completion"])[0] for r in rows])
    if spec.method == "dpo":
        seqs = []
        for r in rows:
            question = r["prompt"][0]["content"]
            seqs += [prompt_and_response(tokenizer, question, r[side][0]["content"])[0] for side in ("chosen", "rejected")]
        return token_digest(seqs)
    return {}


def trl_tokens(spec: Spec, dataset) -> dict[str, Any]:
    """The token ids TRL's trainer prepared (its tokenized train_dataset), in the same layout as ours."""
    if spec.method == "sft":
        return token_digest([list(ids) for ids in dataset["input_ids"]])
    if spec.method == "dpo":
        seqs = []
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True):
            seqs += [list(p) + list(c), list(p) + list(r)]
        return token_digest(seqs)
    return {}


# --- the workers (one subprocess each) -----------------------------------------------------------


class _Clock:
    """Wall-clock marks at the end of every optimizer step (after a CUDA sync, so a mark is a finished step),
    and the process's CPU time at the same marks: on a shared machine a step's wall time counts the
    other jobs too, its CPU time (one torch thread) much less so."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []
        self.created = time.perf_counter()

    def mark(self) -> None:
        self.sync()
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())

    def cpu_gaps(self) -> list[float]:
        return np.diff(self.cpu_marks).tolist()


def _memory(device: str) -> dict[str, float]:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        import torch

        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_ours(spec: Spec) -> dict[str, Any]:
    import torch

    from stages import checkpoint as ckpt
    from stages import dpo, grpo, sft
    from stages.tracking import NullTracker
    from stages.train_loop import TrainConfig

    clock, rows_logged = _Clock(spec.device), []

    class StepTracker(NullTracker):
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if "train/loss" in metrics:  # the loop's per-step window (log_every=1); data metrics at step 0 are not
                clock.mark()
                rows_logged.append(dict(metrics))

    tokenizer = ckpt.load_tokenizer(Path(spec.policy))
    digest = ours_tokens(spec, tokenizer, records(spec))
    compile_ = {"default": "auto"}.get(spec.compile, spec.compile)
    train = TrainConfig(max_steps=spec.steps, lr=spec.lr, warmup_steps=0, log_every=1, checkpoint_every=spec.steps,
                        keep_checkpoints=1, progress=False, compile=compile_, seed=spec.seed)
    common = {"policy": Path(spec.policy), "output_dir": Path(spec.work), "train": train}
    base = _memory(spec.device)
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if spec.method == "sft":
        sft.run(sft.SFTConfig(dataset=Path(spec.dataset), batch_size=spec.batch_size, **common), tracker=StepTracker())
    elif spec.method == "dpo":
        dpo.run(dpo.DPOConfig(dataset=Path(spec.dataset), batch_size=spec.batch_size, beta=spec.beta, **common),
                tracker=StepTracker())
    else:
        grpo.run(grpo.GRPOConfig(dataset=Path(spec.dataset), group_size=spec.group_size,
                                 prompts_per_step=spec.batch_size, max_new_tokens=spec.max_new_tokens,
                                 temperature=spec.temperature, clip_eps=spec.clip_eps, kl_coef=spec.kl_coef,
                                 updates_per_rollout=spec.updates_per_rollout, format_weight=spec.format_weight,
                                 **common), tracker=StepTracker())
    gaps = np.diff(clock.marks)
    # The loop's tokens/s times its own window, which the marks bracket: tokens = rate x gap.
    tokens = [r["train/tokens_per_s"] * g for r, g in zip(rows_logged[1:], gaps, strict=True)]
    extra = {"completion_length": float(np.mean([r["rl/response_length"] for r in rows_logged]))} \
        if spec.method == "grpo" else {}
    return {"step_s": gaps.tolist(), "step_cpu_s": clock.cpu_gaps(), "setup_s": clock.marks[0] - clock.created,
            "tokens_per_step": float(np.mean(tokens)), "data": digest,
            "baseline_rss_mib": base["peak_rss_mib"], **_memory(spec.device), **extra}


def arithmetic_reward(completions, answer, format_weight: float = 0.1, **_) -> list[float]:
    """Our GRPO reward (stages.rewards.combined) in TRL's reward-function form."""
    from stages.rewards import combined

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return combined(texts, answers=list(answer), format_weight=format_weight)


def run_trl(spec: Spec) -> dict[str, Any]:
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback

    from stages import checkpoint as ckpt

    clock, padded, lengths = _Clock(spec.device), [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()
            # GRPO's per-generation metrics; read now, since the closing log of train() clears them
            lengths.extend(trainer._metrics["train"].get("completions/mean_length", [])[len(lengths):])

    tokenizer = ckpt.load_tokenizer(Path(spec.policy))
    model = ckpt.load_model(Path(spec.policy))  # fp32 weights, SDPA: as our stages load it
    cuda = spec.device == "cuda"
    compile_ = spec.compile == "on"  # TRL's own default ("default") is no torch.compile
    common = dict(
        output_dir=spec.work, max_steps=spec.steps, gradient_accumulation_steps=1, learning_rate=spec.lr,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=False, torch_compile=compile_, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, seed=spec.seed, data_seed=spec.seed,
        dataloader_num_workers=0)
    dataset = datasets.Dataset.from_list(records(spec))
    context = model.config.max_position_embeddings  # ours: sft.seq_len=0 means the model's context
    if spec.method == "sft":
        args = trl.SFTConfig(**common, per_device_train_batch_size=spec.batch_size, max_length=context,
                             train_sampling_strategy="sequential")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[StepClock()])
    elif spec.method == "dpo":
        args = trl.DPOConfig(**common, per_device_train_batch_size=spec.batch_size, max_length=context,
                             beta=spec.beta, loss_type=["sigmoid"], train_sampling_strategy="sequential")
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[StepClock()])
    else:
        vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3) if spec.trl_vllm else {}
        args = trl.GRPOConfig(
            **common, per_device_train_batch_size=spec.batch_size * spec.group_size,
            num_generations=spec.group_size, max_completion_length=spec.max_new_tokens,
            temperature=spec.temperature, top_k=0, top_p=1.0, beta=spec.kl_coef, epsilon=spec.clip_eps,
            num_iterations=spec.updates_per_rollout, loss_type="grpo", scale_rewards="group",
            shuffle_dataset=False, log_completions=False, **vllm)
        reward = lambda completions, answer, **kw: arithmetic_reward(  # noqa: E731
            completions, answer, spec.format_weight)
        reward.__name__ = "arithmetic_reward"  # TRL names its reward metrics after the function
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[StepClock()])
    digest = trl_tokens(spec, trainer.train_dataset)

    collate = trainer.data_collator  # count the padded tokens of every batch TRL builds

    def counting(examples):
        batch = collate(examples)
        if isinstance(batch, dict) and "input_ids" in batch:
            padded.append(int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    base = _memory(spec.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    gaps = np.diff(clock.marks)
    extra = {}
    if spec.method == "grpo":
        extra["completion_length"] = float(np.mean(lengths))
    return {"step_s": gaps.tolist(), "step_cpu_s": clock.cpu_gaps(), "setup_s": clock.marks[0] - clock.created,
            "tokens_per_step": float(np.mean(padded[1:spec.steps])) if padded else None,
            "data": digest, "baseline_rss_mib": base["peak_rss_mib"], **_memory(spec.device), **extra}


def worker(spec: Spec) -> None:
    import torch

    torch.set_num_threads(spec.threads)
    result = run_ours(spec) if spec.framework == "ours" else run_trl(spec)
    print(RESULT + json.dumps({"spec": asdict(spec), **result}), flush=True)


# --- the driver ------------------------------------------------------------------------------------


def subprocess_env(root: Path, threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(root / "hf"),
            "WANDB_DISABLED": "true", "PYTHONPATH": str(REPO)}


def launch(spec: Spec, python: str, root: Path) -> dict[str, Any]:
    log_path = Path(spec.work).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([python, __file__, "--worker", json.dumps(asdict(spec))], stdout=subprocess.PIPE,
                              stderr=log, text=True, env=subprocess_env(root, spec.threads), cwd=REPO)
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not found:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{spec.framework} {spec.method} failed (exit {proc.returncode}); {log_path}:\n{tail}")
    return json.loads(found[-1][len(RESULT):])


def prepare_policy(root: Path, tokenizer_dir: Path, size: str) -> Path:
    """A freshly initialised Llama of `size`, saved once as a checkpoint with the tokenizer."""
    from stages import checkpoint as ckpt
    from stages.config import from_dict, load_preset
    from stages.model import ModelConfig, build_model

    path = root / f"policy-{size}"
    if not (path / "config.json").exists():  # saved atomically: present means complete
        fields = {**load_preset("tiny")["model"], **SIZES.get(size, {})}
        tokenizer = ckpt.load_tokenizer(tokenizer_dir)
        model = build_model(from_dict(ModelConfig, fields, "model."), tokenizer, seed=0)
        ckpt.save_checkpoint(path, model, tokenizer, {"stage": "bench-init", "size": size})
    return path


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        sides = {}
        for fw in FRAMEWORKS:
            mine = [r for r in runs if r["spec"]["method"] == method and r["spec"]["framework"] == fw]
            if not mine:
                continue
            warm = mine[0]["spec"]["warmup"]
            pooled = [s for r in mine for s in r["step_s"][warm:]]
            q25, q50, q75 = np.percentile(pooled, [25, 50, 75]).tolist()
            cpu = [s for r in mine for s in r.get("step_cpu_s", [])[warm:]]
            sides[fw] = {"median_s": q50, "q25_s": q25, "q75_s": q75, "steps": len(pooled),
                         "median_cpu_s": float(np.median(cpu)) if cpu else float("nan"),
                         "repeat_medians_s": [float(np.median(r["step_s"][warm:])) for r in mine],
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
                         "baseline_rss_mib": max(r["baseline_rss_mib"] for r in mine),
                         "peak_cuda_mib": max((r.get("peak_cuda_mib", 0.0) for r in mine), default=0.0),
                         "tokens_per_step": mine[0]["tokens_per_step"], "data": mine[0]["data"],
                         "completion_length": float(np.mean([r.get("completion_length", float("nan")) for r in mine]))}
        if len(sides) == 2:
            ratio = sides["trl"]["median_s"] / sides["ours"]["median_s"]
            pairs = [t / o for o, t in zip(sides["ours"]["repeat_medians_s"], sides["trl"]["repeat_medians_s"])]
            same = bool(sides["ours"]["data"]) and sides["ours"]["data"] == sides["trl"]["data"]
            rows.append({"method": method, **{f"{fw}_{k}": v for fw, s in sides.items() for k, v in s.items()},
                         "ratio_trl_over_ours": ratio,
                         "cpu_ratio_trl_over_ours": sides["trl"]["median_cpu_s"] / sides["ours"]["median_cpu_s"], "repeat_ratios": pairs,
                         "median_repeat_ratio": float(np.median(pairs)), "target": TARGETS[method],
                         "meets_target": ratio >= TARGETS[method], "same_tokens": same})
    return rows


def print_table(rows: list[dict[str, Any]], device: str) -> None:
    mem = "peak_cuda_mib" if device == "cuda" else "peak_rss_mib"
    print(f"\n| method | ours s/step (IQR) | TRL s/step (IQR) | TRL/ours | target | per-repeat ratios | "
          f"{'peak CUDA' if device == 'cuda' else 'peak RSS (after imports)'} MiB ours / TRL | tokens/step ours / TRL "
          f"| same tokens | CPU s/step ours / TRL (ratio) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        def side(fw: str) -> str:
            return f"{r[f'{fw}_median_s']:.3f} ({r[f'{fw}_q25_s']:.3f}-{r[f'{fw}_q75_s']:.3f})"

        def memory(fw: str) -> str:
            if device == "cuda":
                return f"{r[f'{fw}_{mem}']:,.0f}"
            return f"{r[f'{fw}_{mem}']:,.0f} ({r[f'{fw}_baseline_rss_mib']:,.0f})"

        tokens = f"{r['ours_tokens_per_step']:,.0f} / {r['trl_tokens_per_step'] or float('nan'):,.0f}"
        if r["method"] == "grpo":
            tokens = f"completion {r['ours_completion_length']:.1f} / {r['trl_completion_length']:.1f}"
        same = "yes" if r["same_tokens"] else ("n/a" if r["method"] == "grpo" else "NO")
        print(f"| {r['method']} | {side('ours')} | {side('trl')} | {r['ratio_trl_over_ours']:.2f}x | "
              f">= {r['target']}x {'(met)' if r['meets_target'] else '(missed)'} | "
              f"{', '.join(f'{x:.2f}' for x in r['repeat_ratios'])} (median {r['median_repeat_ratio']:.2f}) | {memory('ours')} / {memory('trl')} | "
              f"{tokens} | {same} | {r['ours_median_cpu_s']:.3f} / {r['trl_median_cpu_s']:.3f} "
              f"({r['cpu_ratio_trl_over_ours']:.2f}x) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="step intervals dropped at the start of each run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 repeat, 4 GRPO prompts")
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--policy", type=Path, help="time this checkpoint instead of a fresh --size model")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--compile", choices=("default", "on", "off"), default="default")
    ap.add_argument("--threads", type=int, help="torch threads per run (default: 1 on CPU, where other work "
                    "shares the cores and 2 threads each spin against it; torch's default on CUDA)")
    ap.add_argument("--sft-batch", type=int)
    ap.add_argument("--dpo-batch", type=int)
    ap.add_argument("--grpo-prompts", type=int)
    ap.add_argument("--group-size", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--updates-per-rollout", type=int, default=1)
    ap.add_argument("--trl-vllm", action="store_true", help="TRL's GRPO rollouts through vLLM (colocate, CUDA)")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter for the TRL runs (one with vLLM)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.worker:
        return worker(Spec(**json.loads(a.worker)))

    import torch

    from benchmarks.common import bench_dir, machine, prepare_workload, write_results
    from stages.config import load_preset

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if a.quick:
        a.steps, a.warmup, a.repeats = 3, 1, 1
        a.grpo_prompts = a.grpo_prompts or 4
    threads = a.threads or (1 if a.device == "cpu" else torch.get_num_threads())
    root = bench_dir("trl_steps")
    workload = prepare_workload(root)  # the tiny preset's collected problems and tokenizer, cached
    policy = a.policy or prepare_policy(root, workload.tokenizer, a.size)
    preset = load_preset("tiny")
    mu = a.updates_per_rollout
    total = math.ceil((a.warmup + a.steps + 1) / mu) * mu  # whole rollouts, so GRPO may checkpoint at the end
    per_method = {
        "sft": dict(batch_size=a.sft_batch or preset["sft"]["batch_size"], lr=preset["sft"]["train"]["lr"]),
        "dpo": dict(batch_size=a.dpo_batch or preset["dpo"]["batch_size"], lr=preset["dpo"]["train"]["lr"]),
        "grpo": dict(batch_size=a.grpo_prompts or preset["grpo"]["prompts_per_step"], lr=preset["grpo"]["train"]["lr"],
                     group_size=a.group_size or preset["grpo"]["group_size"],
                     max_new_tokens=a.max_new_tokens or preset["grpo"]["max_new_tokens"], updates_per_rollout=mu)}
    methods = [m for m in a.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        sys.exit(f"--methods: unknown {sorted(unknown)} (valid: {', '.join(METHODS)})")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    for rep in range(a.repeats):
        for method in methods:
            for fw in FRAMEWORKS:
                spec = Spec(framework=fw, method=method, device=a.device, policy=str(policy),
                            dataset=str(workload.dataset), work=str(root / "runs" / stamp / f"{method}-{fw}-{rep}"),
                            steps=total, warmup=a.warmup, compile=a.compile, trl_vllm=a.trl_vllm, threads=threads,
                            **per_method[method])
                t0 = time.perf_counter()
                run = launch(spec, a.trl_python if fw == "trl" else sys.executable, root)
                run["wall_s"] = time.perf_counter() - t0
                runs.append(run)
                steady = run["step_s"][a.warmup:]
                print(f"repeat {rep + 1}/{a.repeats} {method:4s} {fw:4s}: median {np.median(steady):.3f} s/step "
                      f"over {len(steady)} steps (run {run['wall_s']:.0f} s, to the first step's end {run['setup_s']:.0f} s)", flush=True)
    rows = summarize(runs)
    print_table(rows, a.device)
    payload = {"machine": machine(), "device": a.device, "size": a.size, "policy": str(policy),
               "settings": {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "compile": a.compile,
                            "threads": threads,
                            "trl_vllm": a.trl_vllm, **{m: per_method[m] for m in methods}},
               "summary": rows, "runs": runs}
    if a.out:
        a.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nwrote {a.out}")
    else:
        print(f"\nwrote {write_results(f'trl_steps-{a.device}-{a.size}', payload)}")


if __name__ == "__main__":
    main()
