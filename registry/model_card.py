"""A markdown model card per registered version, built from what the registry already knows.

    md = build_model_card(client, "flywheel-chat", "4")   # tags + meta.json/config.json of the version
    log_model_card(client, "flywheel-chat", "4", md)      # artifact model_card.md + version description
    print(model_card(name=..., version=..., tags=..., meta=..., model_config=..., history=...))  # pure

Everything on the card comes from the version's tags (lineage, `eval.*` metrics with their
`_stderr` companions, the `gate.*` record, flags, `monitor.alarms`), the checkpoint's `meta.json` (the chain of
training stages) and `config.json` (the architecture), and the champion history. Nothing is
invented: a section without data says so.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from registry import models
from registry.gate import GateVerdict

CARD_FILE = "model_card.md"
MAX_DESCRIPTION = 5000  # the SQL store's model_versions.description column
_NOT_LINEAGE = ("gate.", "champion.", "metric.", "eval.", "mlflow.", "monitor.")
_NOT_LINEAGE_KEYS = {"stage", models.ROLLED_BACK}


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith("eval."):
            try:
                out[key.removeprefix("eval.")] = float(value)
            except ValueError:
                continue
    return out


def _stage_chain(meta: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The checkpoint's training stages, oldest first, from meta.json's parent_meta chain."""
    chain, node = [], meta
    while isinstance(node, dict) and node:
        chain.append(node)
        node = node.get("parent_meta")
    return chain[::-1]


def _evaluation_table(metrics: dict[str, float], verdicts: Sequence[GateVerdict]) -> list[str]:
    names = sorted(k for k in metrics if not k.endswith("_stderr"))
    if not names:
        return ["No evaluation metrics were recorded on this version."]
    gated = {v.metric: v for v in verdicts}
    lines = ["| metric | value | ± stderr | vs champion (paired, CI) |", "|---|---|---|---|"]
    for m in names:
        se = metrics.get(f"{m}_stderr")
        v = gated.get(m)
        vs = (f"{_fmt(v.diff, True)} [{_fmt(v.ci_low, True)}, {_fmt(v.ci_high, True)}] vs v{v.champion_version}, "
              f"n={v.n}" if v is not None and v.n else "")
        lines.append(f"| `{m}` | {_fmt(metrics[m])} | {_fmt(se) if se is not None else '-'} | {vs or '-'} |")
    lines.append("")
    lines.append("Standard errors are over evaluation items; the paired column is the mean per-item difference "
                 "with the champion on the same items (positive = this version better).")
    return lines


def _gate_section(tags: dict[str, str], verdicts: Sequence[GateVerdict]) -> list[str]:
    state = models.gate_state(tags)
    if state == "none":
        return ["This version was never gated."]
    champion = tags.get("gate.champion_version") or None
    lines = [f"**{state}** against {'v' + champion if champion else 'no champion (floors only)'}"
             f" ({tags.get('gate.at', 'time unknown')}).", ""]
    if verdicts:
        lines += ["| metric | value | diff | CI | n | margin | floor | verdict |", "|---|---|---|---|---|---|---|---|"]
        for v in verdicts:
            ci = f"[{_fmt(v.ci_low, True)}, {_fmt(v.ci_high, True)}] ({v.confidence:.0%})" if v.n else "-"
            floor = "-" if v.floor is None else f"{'≥' if v.higher_is_better else '≤'} {v.floor:g}"
            lines.append(f"| `{v.metric}` | {_fmt(v.value)} | {_fmt(v.diff, True)} | {ci} | {v.n} | {v.margin:g} | "
                         f"{floor} | {'pass' if v.passed else 'FAIL'} |")
        lines.append("")
    lines.append(f"Reason: {tags.get('gate.reason', '')}")
    return lines


def _monitor_section(tags: dict[str, str]) -> list[str]:
    alarms = models.monitor_alarms(tags)
    if not alarms:
        return ["No reward-hacking monitor alarms were recorded (KL to the reference, length drift, polite and "
                "overconfident wording, reward model vs verifier; stages/monitors.py)."]
    return ["This version tripped reward-hacking monitors; the promotion gate refuses it unless a person forces "
            "it with a reason:", "", *[f"- `{a}`" for a in alarms]]


def _limitations(model_config: dict[str, Any] | None, stages: list[str]) -> list[str]:
    size = ""
    if model_config:
        size = (f" ({model_config.get('num_hidden_layers', '?')} layers, hidden size "
                f"{model_config.get('hidden_size', '?')}, vocabulary {model_config.get('vocab_size', '?')})")
    return [
        f"- A tiny model{size}, trained from scratch by this platform: it demonstrates the lifecycle and is "
        "not a general-purpose assistant.",
        "- Pretraining text is what the `collect` stage was configured with; by default Python standard-library "
        "docstrings and pydoc help topics (about 2 MB of English technical prose) plus synthetic arithmetic word "
        "problems. It knows nothing of the world beyond that text and is English only.",
        f"- Alignment stages{' (' + ', '.join(stages[1:]) + ')' if len(stages) > 1 else ''} train on synthetic "
        "arithmetic problems (and preference pairs built from them or from annotators): expect fluent-looking but "
        "unreliable text outside short arithmetic. There is no safety or refusal training.",
        "- Evaluation uses held-out text from the same corpus and synthetic test problems: the numbers track "
        "progress along this loop, not general capability. Intervals use a normal approximation.",
    ]


def model_card(*, name: str, version: str, tags: dict[str, str], aliases: Sequence[str] = (),
               run_id: str = "", meta: dict[str, Any] | None = None, model_config: dict[str, Any] | None = None,
               metrics: dict[str, float] | None = None, history: Sequence[models.ChampionEvent] = ()) -> str:
    """The card as markdown. `metrics` default: the version's `eval.*` tags."""
    metrics = _metrics_from_tags(tags) if metrics is None else metrics
    verdicts = models.recorded_verdicts(tags)
    chain = _stage_chain(meta)
    lines = [f"# {name} v{version}", ""]
    status = f"Aliases: {', '.join(aliases) or 'none'}. Gate: {models.gate_state(tags)}."
    if tags.get(models.FLAGGED):
        status += f" **FLAGGED: {tags[models.FLAGGED]}.**"
    if models.monitor_alarms(tags):
        status += f" **MONITOR ALARMS: {'; '.join(models.monitor_alarms(tags))}.**"
    lines += [status, ""]

    lines += ["## Lineage", ""]
    lineage = {k: v for k, v in sorted(tags.items())
               if not k.startswith(_NOT_LINEAGE) and k not in _NOT_LINEAGE_KEYS}
    if run_id:
        lineage = {"registered from run": run_id, **lineage}
    lines += [f"- `{k}`: `{v}`" for k, v in lineage.items()] or ["No lineage tags were recorded."]

    lines += ["", "## Training stages", ""]
    if chain:
        for i, node in enumerate(chain, start=1):
            runs = ", ".join(f"{k}={v}" for k, v in sorted((node.get("lineage") or {}).items()) if k.endswith("run_id"))
            step = f", step {node['step']}" if node.get("step") is not None else ""
            parent = f", from `{node['parent']}`" if node.get("parent") else ""
            lines.append(f"{i}. **{node.get('stage', '?')}**{step}{parent}{'; ' + runs if runs else ''}")
        if meta and meta.get("git_commit"):
            lines.append(f"\nLast stage built at git commit `{meta['git_commit']}`"
                         f"{', saved ' + meta['saved_at'] if meta.get('saved_at') else ''}.")
    else:
        lines.append("The checkpoint has no meta.json: its training stages are unknown.")

    lines += ["", "## Evaluation", ""] + _evaluation_table(metrics, verdicts)
    lines += ["", "## Promotion gate", ""] + _gate_section(tags, verdicts)
    lines += ["", "## Reward-hacking monitors", ""] + _monitor_section(tags)

    mine = [e for e in history if version in (e.from_version, e.to_version)]
    lines += ["", "## Champion history of this version", ""]
    lines += [f"- {e.at}: {e.action} by {e.by}: {models._v(e.from_version)} → {models._v(e.to_version)}"
              f"{' — ' + e.reason if e.reason else ''}" for e in mine] or ["Never champion."]

    lines += ["", "## Limitations", ""] + _limitations(model_config, [str(n.get("stage")) for n in chain])
    return "\n".join(lines) + "\n"


def _artifact_json(client: MlflowClient, run_id: str, path: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
        except Exception:  # a missing file or an unreadable one: the card says the section is unknown
            return None


def build_model_card(client: MlflowClient | str, name: str, version: str) -> str:
    """Gather tags, meta.json, config.json and history of one version and render its card."""
    client = models._client(client)
    history = models.champion_history(client, name)  # records a hand move first
    mv = models._model_version(client, name, str(version))
    meta = config = None
    if mv.run_id:
        meta = _artifact_json(client, mv.run_id, f"{models.ARTIFACT_PATH}/meta.json")
        config = _artifact_json(client, mv.run_id, f"{models.ARTIFACT_PATH}/config.json")
    return model_card(name=name, version=str(version), tags=dict(mv.tags), aliases=list(mv.aliases or []),
                      run_id=mv.run_id or "", meta=meta, model_config=config, history=history)


def description_summary(markdown: str, where: str) -> str:
    """The card, or its head cut at a section boundary, within the description column's limit."""
    if len(markdown) <= MAX_DESCRIPTION:
        return markdown
    tail = f"\n\n… (truncated; the full card is {where})"
    head = markdown[: MAX_DESCRIPTION - len(tail)]
    cut = head.rfind("\n## ")
    return (head[:cut] if cut > 0 else head) + tail


def log_model_card(client: MlflowClient | str, name: str, version: str, markdown: str) -> None:
    """Log the card as `model_card.md` on the version's run and put it in the version's description."""
    client = models._client(client)
    mv = models._model_version(client, name, str(version))
    where = "the MLflow UI's version page"
    if mv.run_id:
        client.log_text(mv.run_id, markdown, CARD_FILE)
        where = f"artifact {CARD_FILE} of run {mv.run_id}"
    client.update_model_version(name, str(version), description=description_summary(markdown, where))
