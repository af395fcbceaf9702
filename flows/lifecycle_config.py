"""The lifecycle's configuration: one section per stage, checked in full before anything runs.

A preset (stages/presets/<name>.yaml) and `section.key=value` overrides only set the fields a user
chooses; the paths that connect stages (inputs, output_dir, lineage) are the flow's business, so
they are not settable here. Every section is built into its real dataclass up front, so a typo
anywhere fails in the first second with the key and the valid ones named, not an hour in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from infra.ray_executor import RayConfig, check_world_size
from registry.gate import GateSpec
from stages.base_model import BaseModelConfig
from stages.clean import CleanConfig
from stages.collect import CollectConfig
from stages.config import ConfigError, deep_merge, from_dict, load_preset, parse_overrides
from stages.decontaminate import DecontaminateConfig
from stages.dedup import DedupConfig
from stages.dpo import DPOConfig
from stages.evaluate import EvaluateConfig
from stages.grpo import GRPOConfig
from stages.mix import MixConfig
from stages.model import ModelConfig
from stages.ppo import PPOConfig
from stages.pretrain import PretrainConfig
from stages.rejection import RejectionConfig
from stages.reward import RewardConfig
from stages.sft import SFTConfig
from stages.tokenize import TokenizeConfig
from stages.tokenizer import TokenizerConfig
from stages.validate import ValidateConfig


def _default_gates() -> dict[str, dict[str, Any]]:
    return {"eval/arithmetic/accuracy": {"margin": 0.02}}


@dataclass(frozen=True, kw_only=True)
class PromoteConfig:
    """The gate: each metric's paired difference vs the champion, re-scored on the same items.

    `gates` maps a metric with per-item scores (see stages/evaluate.py items.jsonl) to its GateSpec
    fields: `margin` (how much worse the confidence interval's lower bound may be: non-inferiority),
    `floor` (an absolute minimum, or maximum when `higher_is_better` is false), `higher_is_better`.
    """

    model_name: str = "flywheel-chat"
    gates: dict[str, dict[str, Any]] = field(default_factory=_default_gates)
    confidence: float = 0.95

    def specs(self) -> list[GateSpec]:
        if not self.gates:
            raise ConfigError("promote.gates is empty: at least one gate metric is needed to promote")
        specs = []
        for metric, options in self.gates.items():
            unknown = sorted(set(options or {}) - {"margin", "floor", "higher_is_better"})
            if unknown:
                raise ConfigError(f"unknown key promote.gates.{metric}.{unknown[0]} "
                                  "(valid keys: margin, floor, higher_is_better)")
            specs.append(GateSpec(metric, confidence=self.confidence, **(options or {})))
        return specs

    def __post_init__(self) -> None:
        self.specs()


RECIPES = ("r1", "instructgpt")


@dataclass(frozen=True, kw_only=True)
class AlignConfig:
    """Which post-training recipe the align phase runs, and what it starts from.

    - `r1` (DeepSeek-R1's shape): SFT -> DPO -> GRPO with verifiable rewards -> rejection sampling of
      the RL policy's best answers -> SFT on them (section `rejection_sft`).
    - `instructgpt` (Ouyang et al.): SFT -> reward model -> PPO against it with a KL penalty.

    `base_model` is any Hugging Face causal-LM directory (Llama, Qwen2, GPT-2, Mistral families): the
    tokenizer and pretraining phases are skipped and the recipe starts from it, in its own format.
    `recipe=` and `base_model=` also work as top-level overrides.
    """

    recipe: str = "r1"
    base_model: Path | None = None

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"align.recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.base_model is not None and not (Path(self.base_model) / "config.json").exists():
            raise ConfigError(f"align.base_model={self.base_model}: no Hugging Face model there (config.json missing)")


@dataclass(frozen=True, kw_only=True)
class ServePhaseConfig:
    enabled: bool = True  # the lifecycle ends with the champion served (vLLM behind the router)
    timeout_s: float = 900.0  # for serving to answer with the champion (vLLM starts in 35-105 s on 2 cores)


@dataclass(frozen=True, kw_only=True)
class QueueConfig:
    """`flywheel queue fill`: prompts answered by champion and challenger, queued for annotators."""

    n: int = 20  # items per fill
    overlap: int = 2  # labels wanted on the overlapping share of items (agreement is measured there)
    overlap_share: float = 0.25  # the rest need one label each
    max_new_tokens: int = 64
    temperature: float = 0.8  # sampling: two answers of one model differ when there is no other version yet
    seed: int = 0
    after_run: bool = True  # `flywheel run` ends with the queue filled and the annotation page up

    def __post_init__(self) -> None:
        if self.n < 1 or self.overlap < 1 or not 0.0 <= self.overlap_share <= 1.0:
            raise ConfigError("queue: n and overlap must be >= 1 and overlap_share within [0, 1]")


@dataclass(frozen=True, kw_only=True)
class FeedbackConfig:
    """The feedback round: new labels -> preference pairs -> tuning from the champion -> gate -> serve.

    `method=dpo` tunes the champion on the pairs directly; `method=reward_ppo` (InstructGPT's loop)
    trains a reward model on the people's pairs, then PPO from the champion against that reward model.
    """

    min_new_labels: int = 20  # the scheduled check starts a round once this many labels are new
    check_every_s: int = 60  # how often that check counts them (a Prefect interval schedule)
    min_pairs: int = 4  # fewer usable pairs than this (after ties and both-bad) and the round stops early
    # Passes of DPO over the pairs (its steps follow from the pair count and dpo.batch_size; 0: take
    # dpo.train.max_steps as set). A few dozen labels must nudge the champion, not overfit it:
    # measured on the tiny preset, the lifecycle's 40 DPO steps on 20 pairs (labelled carelessly, half
    # at random) took accuracy 0.54 -> 0.27, and the gate refused the result.
    epochs: float = 2.0
    # DPO's learning rate in a round (0: dpo.train.lr). The champion has been through DPO and GRPO
    # already; measured on the tiny champion with 20 truthful human pairs, 5 steps: the lifecycle's
    # DPO rate 1e-4 took accuracy 0.54 -> 0.45, 1e-5 took it to 0.57, 3e-6 to 0.55.
    lr: float = 1e-5
    method: str = "dpo"  # dpo | reward_ppo

    def __post_init__(self) -> None:
        if self.method not in ("dpo", "reward_ppo"):
            raise ConfigError(f"feedback.method must be dpo or reward_ppo, got {self.method!r}")
        if (self.min_new_labels < 1 or self.check_every_s < 10 or self.min_pairs < 1 or self.epochs < 0
                or self.lr < 0):
            raise ConfigError("feedback: min_new_labels and min_pairs must be >= 1, check_every_s >= 10, "
                              "epochs and lr >= 0")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Cron schedules of the deployments (`flywheel deploy`); times in `timezone`."""

    enabled: bool = True  # tests switch schedules off; the README's setup keeps them on
    retrain_cron: str = "0 3 * * 0"  # the whole lifecycle, weekly (Sunday 03:00)
    evaluate_cron: str = "0 2 * * *"  # the champion's evaluation, nightly
    timezone: str = "UTC"


# section -> (config class, fields the flow fills in)
SECTIONS: dict[str, tuple[type, frozenset[str]]] = {
    "collect": (CollectConfig, frozenset({"output_dir"})),
    "clean": (CleanConfig, frozenset({"input_dir", "output_dir"})),
    "dedup": (DedupConfig, frozenset({"input_dir", "output_dir"})),
    "decontaminate": (DecontaminateConfig, frozenset({"input_dir", "output_dir"})),
    "mix": (MixConfig, frozenset({"input_dir", "output_dir"})),
    "validate": (ValidateConfig, frozenset({"dataset", "output_dir"})),
    "tokenizer": (TokenizerConfig, frozenset({"dataset", "output_dir"})),
    "model": (ModelConfig, frozenset()),
    "tokenize": (TokenizeConfig, frozenset({"dataset", "tokenizer", "output_dir"})),
    "pretrain": (PretrainConfig, frozenset({"tokens", "tokenizer", "output_dir", "model", "lineage"})),
    "sft": (SFTConfig, frozenset({"dataset", "tokens", "policy", "output_dir", "lineage"})),
    "dpo": (DPOConfig, frozenset({"dataset", "policy", "output_dir", "lineage"})),
    "grpo": (GRPOConfig, frozenset({"dataset", "policy", "output_dir", "lineage"})),
    "rejection": (RejectionConfig, frozenset({"dataset", "policy", "output_dir", "lineage"})),
    "rejection_sft": (SFTConfig, frozenset({"dataset", "messages", "tokens", "policy", "output_dir", "lineage"})),
    "reward": (RewardConfig, frozenset({"dataset", "policy", "output_dir", "lineage"})),
    "ppo": (PPOConfig, frozenset({"dataset", "policy", "reward_model", "output_dir", "lineage"})),
    "align": (AlignConfig, frozenset()),
    "base_model": (BaseModelConfig, frozenset({"source", "output_dir", "lineage"})),
    "evaluate": (EvaluateConfig, frozenset({"checkpoint", "dataset", "tokens", "output_dir"})),
    "ray": (RayConfig, frozenset()),
    "promote": (PromoteConfig, frozenset()),
    "serve": (ServePhaseConfig, frozenset()),
    "queue": (QueueConfig, frozenset()),
    "feedback": (FeedbackConfig, frozenset()),
    "schedule": (ScheduleConfig, frozenset()),
}
_PLACEHOLDER = Path("/nonexistent")


@dataclass(frozen=True)
class LifecycleConfig:
    preset: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, preset: str = "tiny", overrides: list[str] | None = None) -> LifecycleConfig:
        values = deep_merge(load_preset(preset), parse_overrides(overrides or []))
        for key in ("recipe", "base_model"):  # the two choices a user makes most: top-level shorthands
            if key in values and not isinstance(values[key], dict):
                values.setdefault("align", {})[key] = values.pop(key)
        cfg = cls(preset=preset, sections={k: v or {} for k, v in values.items()})
        cfg.check()
        return cfg

    def check(self) -> None:
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section {unknown[0]!r} (valid sections: {', '.join(SECTIONS)})")
        for name, (klass, provided) in SECTIONS.items():
            section = self.sections.get(name, {})
            for key in sorted(set(section) & provided):
                raise ConfigError(f"{name}.{key} is set by the lifecycle (it wires stages together), not by config")
            settable = [f.name for f in fields(klass) if f.name not in provided]
            for key in section:
                if key not in settable:
                    raise ConfigError(f"unknown config key {name}.{key} (valid keys of {name}: {', '.join(settable)})")
            self.build(name, **{k: _PLACEHOLDER for k in provided if k not in ("model", "lineage")})
        if self.build("align").base_model is None:  # pretraining runs on Ray: every rank needs rows
            check_world_size(self.build("pretrain", tokens=_PLACEHOLDER, tokenizer=_PLACEHOLDER,
                                        output_dir=_PLACEHOLDER), self.build("ray"))

    def build(self, name: str, **wiring: Any) -> Any:
        """The section's dataclass, with the flow's paths (and, for pretraining, the model section)."""
        klass, _ = SECTIONS[name]
        values = dict(self.sections.get(name, {}))
        if name == "pretrain":
            values["model"] = self.sections.get("model", {})
        return from_dict(klass, {**values, **wiring}, prefix=f"{name}.")
