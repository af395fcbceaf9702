"""Artifacts the training-stage tests share, each built once per session by the stages themselves.

corpus -> tokenizer -> tokens -> pretrained -> sft: a few hundred KB of stdlib English plus 500 arithmetic
problems, a 1k-token byte-level BPE, its token shards, a 2-layer hidden-64 Llama (head_dim 32, servable by vLLM)
pretrained for 30 steps, and an SFT checkpoint on top of it that DPO, GRPO and evaluation start from.
The whole chain costs well under a minute on 2 CPU cores.

Weight decay is off in these runs so that "every trainable parameter changed" means a gradient
reached it, not that AdamW shrank it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from stages import collect, pretrain, sft, tokenize, tokenizer
from stages.collect import CollectConfig
from stages.model import ModelConfig
from stages.pretrain import PretrainConfig
from stages.sft import SFTConfig
from stages.tokenize import TokenizeConfig
from stages.tokenizer import TokenizerConfig
from stages.tracking import RecordingTracker
from stages.train_loop import TrainConfig

TINY_MODEL = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                         max_seq_len=128)
LINEAGE = {"dataset": "tests-corpus@v1"}


def quiet_train(**overrides) -> TrainConfig:
    """A TrainConfig for tests: no progress bar, no weight decay, log every step."""
    return TrainConfig(**{"progress": False, "weight_decay": 0.0, "log_every": 1, **overrides})


def pretrain_config(tokens: Path, tokenizer_dir: Path, output_dir: Path, **train) -> PretrainConfig:
    return PretrainConfig(
        tokens=tokens, tokenizer=tokenizer_dir, output_dir=output_dir, model=TINY_MODEL, seq_len=64,
        batch_size=8, eval_windows=16, lineage=LINEAGE,
        train=quiet_train(**{"max_steps": 30, "lr": 3e-3, "warmup_steps": 3, "checkpoint_every": 10, **train}))


@dataclass
class Trained:
    """A stage run: its config, what it returned, and everything it told the tracker."""

    cfg: object
    result: object
    tracker: RecordingTracker

    @property
    def checkpoint(self) -> Path:
        return self.result.checkpoint


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~300 KB of stdlib docstrings and pydoc topics plus 500 arithmetic problems (10% test split)."""
    cfg = CollectConfig(output_dir=tmp_path_factory.mktemp("collect"), max_builtin_chars=150_000,
                        arithmetic_problems=500)
    return collect.run(cfg).dataset


@pytest.fixture(scope="session")
def tokenizer_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TokenizerConfig(dataset=corpus, output_dir=tmp_path_factory.mktemp("tokenizer"), vocab_size=1024)
    return tokenizer.run(cfg).tokenizer_dir


@pytest.fixture(scope="session")
def tokens(corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus as token shards (2 % of documents held out, by id): what pretraining reads."""
    cfg = TokenizeConfig(dataset=corpus, tokenizer=tokenizer_dir, output_dir=tmp_path_factory.mktemp("tokens"))
    return tokenize.run(cfg).tokens


@pytest.fixture(scope="session")
def pretrained(tokens: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    cfg = pretrain_config(tokens, tokenizer_dir, tmp_path_factory.mktemp("pretrain"))
    tracker = RecordingTracker()
    return Trained(cfg, pretrain.run(cfg, tracker=tracker), tracker)


@pytest.fixture(scope="session")
def sft_trained(corpus: Path, pretrained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    cfg = SFTConfig(dataset=corpus, policy=pretrained.checkpoint, output_dir=tmp_path_factory.mktemp("sft"),
                    batch_size=16, lineage=LINEAGE,
                    train=quiet_train(max_steps=20, lr=3e-3, warmup_steps=2, checkpoint_every=10))
    tracker = RecordingTracker()
    return Trained(cfg, sft.run(cfg, tracker=tracker), tracker)
