"""The model registry: Hugging Face checkpoint directories in MLflow; the registry is the one truth
about which version is champion, whoever moves the alias.

    v = register_checkpoint(client, "flywheel-chat", ckpt_dir, run_id, lineage_tags)  # alias challenger
    expected = champion_version(client, "flywheel-chat")       # read BEFORE evaluating against it
    verdicts = [gate.paired_verdict(spec, ...) for spec in specs]   # registry/gate.py
    promote_if_passed(client, "flywheel-chat", v, verdicts, expected=expected)  # gate -> champion (CAS)
    promote(client, "flywheel-chat", "4", force=True, reason="hotfix")           # a person decides
    rollback(client, "flywheel-chat")                         # back one step in the champion history
    download_version(client, "flywheel-chat", "4", dst)       # -> local HF dir

A checkpoint is registered unchanged: its files are logged as the run's `hf_model` artifact folder
and a model version points at `runs:/<run_id>/hf_model` (`mlflow.register_model` fails on a plain
directory and `mlflow.transformers.log_model` is broken with transformers 5). Stages are
deprecated in MLflow: the lifecycle is two aliases ("challenger" = newest registered, "champion" =
what serves) plus tags.

Registered-model tags (the champion history, a stack):
- `champion.history.<6-digit seq>`: compact JSON of one change of `champion`: action (`promote`,
  `forced`, `rollback`, `outside`), by (`gate`, `flywheel models promote`, ..., `outside flywheel`),
  from, to, at (UTC), gate verdict of the new champion, reason, user. Promotions and hand moves
  push, rollbacks pop: rolling back twice goes back two promotions. Values stay far below the 5,000
  characters of the SQL store's registered-model tag column (reasons are cut at 500).

Version tags:
- `gate.passed`, `gate.reason`, `gate.champion_version`, `gate.metrics` (JSON list), `gate.at`, and
  per metric `gate.<metric>.{value,diff,stderr,ci_low,ci_high,n,margin,floor,confidence,
  higher_is_better,passed,reason}`: the last gate decision for this version (registry/gate.py);
- `champion.flagged`: this version served without a passed gate (forced, or moved by hand), why;
  `champion.forced`, `champion.forced_reason`; `rolled_back`: it was champion and was rolled back;
- `metric.<name>` and `stage`: copied from the checkpoint's meta.json for the `models list` table;
- `monitor.alarms`: the reward-hacking monitor alarms the version carries, one line,
  `<source>:<metric>=<value>><threshold>; ...` (source: the training stage whose meta.json recorded it,
  anywhere in the parent chain, or `evaluate` via `record_alarms`). A version with alarms fails its
  gate (`promote_if_passed` adds a failing `monitor/alarms` verdict) and is refused by `promote` and
  `set_champion` unless forced with a reason, which flags it.

Hand moves in the MLflow UI or API cannot be prevented or locked out, so every read path calls
`sync_history`, which records them as `outside` entries (and flags an ungated champion) the first
time flywheel sees the alias disagree with the history. Every function takes an `MlflowClient` or a
tracking URI (which also serves as registry URI).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from infra.settings import load_settings
from registry.gate import GateVerdict, all_passed, monitor_verdict
from stages.monitors import Alarm

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
ARTIFACT_PATH = "hf_model"
HISTORY_PREFIX = "champion.history."
FLAGGED = "champion.flagged"
FORCED = "champion.forced"
FORCED_REASON = "champion.forced_reason"
ROLLED_BACK = "rolled_back"
MONITOR_ALARMS = "monitor.alarms"
MAX_ALARMS = 2000  # chars of the alarms tag: a handful of alarms, far below the tag column's 5,000
OUTSIDE = "outside flywheel"
MAX_REASON = 500  # keeps a history entry far below the 5,000-char registered-model tag column
LOCK_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------- errors (one line each)


class RegistryError(Exception):
    """A registry request that cannot be done as asked; the message is one line for a person."""


class ModelNotFound(RegistryError, LookupError):
    pass


class VersionNotFound(RegistryError, LookupError):
    pass


class NothingToRollBack(RegistryError, LookupError):
    pass


class ChampionChanged(RegistryError):
    """The champion at write time is not the one the decision was taken against: nothing moved."""

    def __init__(self, name: str, expected: str | None, actual: str | None):
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(f"champion of {name!r} changed since the decision: expected {_v(expected)}, "
                         f"found {_v(actual)}; nothing moved, decide again against {_v(actual)}")


class GateNotPassed(RegistryError):
    pass


class MonitorAlarmed(GateNotPassed):
    """The version carries reward-hacking monitor alarms (a GateNotPassed: whoever handles that handles this)."""


class ReasonRequired(RegistryError, ValueError):
    pass


def _v(version: str | None) -> str:
    return "no champion" if version is None else f"v{version}"


# ----------------------------------------------------------------------------- small helpers


def _client(client_or_uri: MlflowClient | str) -> MlflowClient:
    if isinstance(client_or_uri, MlflowClient):
        return client_or_uri
    return MlflowClient(tracking_uri=client_or_uri, registry_uri=client_or_uri)


def _is(err: MlflowException, code: int) -> bool:
    return err.error_code == ErrorCode.Name(code)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if _is(err, RESOURCE_DOES_NOT_EXIST):
            raise ModelNotFound(f"model {name!r} is not registered in {client.tracking_uri}") from None
        raise


def _model_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if _is(err, RESOURCE_DOES_NOT_EXIST) or "INVALID_PARAMETER_VALUE" in str(err.error_code):
            _registered_model(client, name)  # the model itself missing is the clearer message
            raise VersionNotFound(f"model {name!r} has no version {version!r} in {client.tracking_uri}") from None
        raise


def _alias(rm: RegisteredModel, alias: str = CHAMPION) -> str | None:
    # Read the alias map rather than catching get_model_version_by_alias's error: its error code
    # for a missing alias differs between stores (INVALID_PARAMETER_VALUE on SQL stores).
    version = rm.aliases.get(alias)
    return None if version is None else str(version)


# ----------------------------------------------------------------------------- registering


def _alarm_text(source: str, alarm: Alarm | dict | str) -> str:
    """`<source>:<metric>=<value>><threshold>`; a string is taken as already written `metric=v>t`."""
    if isinstance(alarm, str):
        short = alarm.strip()
    else:
        short = (alarm if isinstance(alarm, Alarm) else Alarm.from_dict(alarm)).short()
    return f"{source}:{short}" if source else short


def meta_alarms(meta: dict) -> list[str]:
    """Monitor alarms recorded in a meta.json (`monitors: {"alarms": [...]}`) and in its parent chain.

    An ancestor's alarm counts: a policy that gamed its reward in GRPO passes that on to the stages
    trained from it (rejection sampling keeps its samples). Oldest stage first; each names its stage.
    """
    chain, node = [], meta
    while isinstance(node, dict) and node:
        chain.append(node)
        node = node.get("parent_meta")
    out: list[str] = []
    for node in reversed(chain):
        for alarm in ((node.get("monitors") or {}).get("alarms") or []):
            text = _alarm_text(str(node.get("stage") or "?"), alarm)
            if text not in out:
                out.append(text)
    return out


def monitor_alarms(tags: dict[str, str]) -> list[str]:
    """The alarms a version carries, read back from its `monitor.alarms` tag."""
    return [a.strip() for a in tags.get(MONITOR_ALARMS, "").split(";") if a.strip()]


def _alarms_tag(alarms: Sequence[str]) -> str:
    text = "; ".join(alarms)
    return text if len(text) <= MAX_ALARMS else text[: MAX_ALARMS - 24].rsplit(";", 1)[0] + f"; ... ({len(alarms)} in all)"


def _meta_tags(checkpoint: Path) -> dict[str, str]:
    """`stage`, numeric `metric.<name>` and `monitor.alarms` tags from the checkpoint's meta.json, if any."""
    meta_file = checkpoint / "meta.json"
    if not meta_file.is_file():
        return {}
    meta = json.loads(meta_file.read_text())
    tags = {}
    if isinstance(meta.get("stage"), str):
        tags["stage"] = meta["stage"]
    for key, value in (meta.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[f"metric.{key}"] = repr(float(value))
    alarms = meta_alarms(meta)
    if alarms:
        tags[MONITOR_ALARMS] = _alarms_tag(alarms)
    return tags


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if not _is(err, RESOURCE_DOES_NOT_EXIST):
            raise
    description = (
        "Hugging Face checkpoint directories (save_pretrained + meta.json) registered by llm-flywheel. "
        f"Alias '{CHAMPION}' is the served model, '{CHALLENGER}' the newest registered version; "
        f"every change of '{CHAMPION}' is recorded in the '{HISTORY_PREFIX}*' tags (hand moves too, "
        "when flywheel next reads the registry); gate decisions and lineage are version tags."
    )
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:  # created concurrently by another process: fine
        if not _is(err, RESOURCE_ALREADY_EXISTS):
            raise


def register_checkpoint(
    client: MlflowClient | str, name: str, checkpoint: Path, run_id: str, tags: dict[str, str]
) -> str:
    """Log `checkpoint` unchanged as the run's `hf_model` artifacts, register it, alias it challenger.

    `tags` are the lineage tags (data.dvc_md5, tokenizer.run_id, parent runs, git.commit, ...);
    `stage`, `metric.*` and `monitor.alarms` tags from meta.json are added (explicit `tags` win).
    Returns the version.
    """
    client = _client(client)
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a Hugging Face checkpoint (no config.json)")
    client.log_artifacts(run_id, str(checkpoint), artifact_path=ARTIFACT_PATH)
    _ensure_registered_model(client, name)
    all_tags = {**_meta_tags(checkpoint), **{k: str(v) for k, v in tags.items()}}
    mv = client.create_model_version(
        name, source=f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id, tags=all_tags
    )
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


def record_alarms(client: MlflowClient | str, name: str, version: str, alarms: Sequence[Alarm | dict | str],
                  source: str = "evaluate") -> list[str]:
    """Add monitor alarms (e.g. evaluation.json's `alarms`) to the version's `monitor.alarms` tag.

    Call it before the gate: a version carrying alarms fails it. Alarms already there are kept, a repeat
    is not added twice; returns every alarm the version now carries.
    """
    client = _client(client)
    tags = dict(_model_version(client, name, str(version)).tags)
    now = monitor_alarms(tags)
    for alarm in alarms:
        text = _alarm_text(source, alarm)
        if text not in now:
            now.append(text)
    if now:
        client.set_model_version_tag(name, str(version), MONITOR_ALARMS, _alarms_tag(now))
    return now


# ----------------------------------------------------------------------------- gate records


def _num(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def _opt_float(s: str | None) -> float | None:
    return float(s) if s not in (None, "") else None


def record_gate(client: MlflowClient | str, name: str, version: str, verdicts: Sequence[GateVerdict],
                champion_version: str | None) -> None:
    """Write the gate decision as `gate.*` tags on `version` (overall and per metric).

    `gate.passed` is set to false first and to its final value last, so a crash half-way never
    leaves a stale "true" beside new per-metric tags. No verdicts at all is a failed gate.
    """
    client = _client(client)
    version = str(version)
    passed = all_passed(verdicts)
    reason = "; ".join(v.reason for v in verdicts) or "no gate metrics were given: fails"
    client.set_model_version_tag(name, version, "gate.passed", "false")
    tags = {"gate.reason": reason, "gate.champion_version": champion_version or "",
            "gate.metrics": json.dumps([v.metric for v in verdicts]), "gate.at": _now()}
    for v in verdicts:
        p = f"gate.{v.metric}."
        tags |= {p + "value": _num(v.value), p + "diff": _num(v.diff), p + "stderr": _num(v.stderr),
                 p + "ci_low": _num(v.ci_low), p + "ci_high": _num(v.ci_high), p + "n": str(v.n),
                 p + "margin": _num(v.margin), p + "floor": _num(v.floor), p + "confidence": _num(v.confidence),
                 p + "higher_is_better": str(v.higher_is_better).lower(), p + "passed": str(v.passed).lower(),
                 p + "reason": v.reason}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, "gate.passed", str(passed).lower())


def gate_state(tags: dict[str, str]) -> str:
    """"passed", "failed" or "none" (never gated) from a version's tags."""
    return {"true": "passed", "false": "failed"}.get(tags.get("gate.passed", ""), "none")


def recorded_verdicts(tags: dict[str, str]) -> list[GateVerdict]:
    """The per-metric verdicts `record_gate` wrote, read back from a version's tags."""
    try:
        metrics = json.loads(tags.get("gate.metrics", "[]"))
    except json.JSONDecodeError:
        return []
    champion = tags.get("gate.champion_version") or None
    out = []
    for metric in metrics:
        p = f"gate.{metric}."
        if p + "passed" not in tags:
            continue
        n = int(tags.get(p + "n") or 0)
        out.append(GateVerdict(
            metric=metric, passed=tags[p + "passed"] == "true", value=float(tags.get(p + "value") or "nan"),
            higher_is_better=tags.get(p + "higher_is_better") != "false",
            margin=float(tags.get(p + "margin") or 0), floor=_opt_float(tags.get(p + "floor")),
            confidence=float(tags.get(p + "confidence") or 0.95), champion_version=champion if n else None,
            n=n, diff=_opt_float(tags.get(p + "diff")), stderr=_opt_float(tags.get(p + "stderr")),
            ci_low=_opt_float(tags.get(p + "ci_low")), ci_high=_opt_float(tags.get(p + "ci_high")),
            reason=tags.get(p + "reason", ""),
        ))
    return out


def _gate_refusal(name: str, version: str, tags: dict[str, str]) -> str:
    state = gate_state(tags)
    alarms = monitor_alarms(tags)
    if state == "none":
        text = f"v{version} of {name!r} has no recorded gate result"
    else:
        failing = [v.reason for v in recorded_verdicts(tags) if not v.passed] or [tags.get("gate.reason", "")]
        text = f"v{version} of {name!r} failed its gate: " + "; ".join(failing)
    if alarms and "; ".join(alarms) not in text:
        text += f"; it carries reward-hacking monitor alarms: {'; '.join(alarms)}"
    return text


# ----------------------------------------------------------------------------- champion history


@dataclass(frozen=True)
class ChampionEvent:
    seq: int
    action: str  # "promote" | "forced" | "rollback" | "outside"
    by: str  # "gate", "flywheel models promote", "flywheel models rollback", "outside flywheel", ...
    from_version: str | None
    to_version: str | None  # None: the alias was removed (by hand)
    at: str  # UTC ISO time; for "outside": when flywheel noticed, not when the hand moved it
    gate: str  # the new champion's recorded gate: "passed" | "failed" | "none"
    reason: str = ""
    user: str = ""

    def as_json(self) -> str:
        return json.dumps({"action": self.action, "by": self.by, "from": self.from_version, "to": self.to_version,
                           "at": self.at, "gate": self.gate, "reason": self.reason, "user": self.user},
                          separators=(",", ":"))


def _history(rm: RegisteredModel) -> tuple[list[ChampionEvent], int]:
    """The recorded events in order, and the next free sequence number."""
    entries = {}
    for key, value in rm.tags.items():
        suffix = key.removeprefix(HISTORY_PREFIX)
        if key.startswith(HISTORY_PREFIX) and suffix.isdigit():
            entries[int(suffix)] = value
    events = []
    for seq in sorted(entries):
        try:
            d = json.loads(entries[seq])
            events.append(ChampionEvent(seq, d["action"], d["by"], d.get("from"), d.get("to"), d["at"],
                                        d.get("gate", "none"), d.get("reason", ""), d.get("user", "")))
        except (ValueError, KeyError, TypeError):  # edited by hand into something else: skip, say so
            log.warning("%s: ignoring unreadable history tag %s%06d=%r", rm.name, HISTORY_PREFIX, seq, entries[seq])
    return events, max(entries, default=0) + 1


def _stack(events: list[ChampionEvent]) -> list[str | None]:
    """Champions in order, newest last: promotions and hand moves push, rollbacks pop."""
    stack: list[str | None] = []
    for e in events:
        if e.action == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(e.to_version)
    return stack


def _append(client: MlflowClient, name: str, seq: int, **fields) -> ChampionEvent:
    fields["reason"] = " ".join(str(fields.get("reason", "")).split())[:MAX_REASON]  # one line, bounded
    event = ChampionEvent(seq=seq, at=_now(), **fields)
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{seq:06d}", event.as_json())
    return event


def _gate_of(client: MlflowClient, name: str, version: str | None) -> tuple[str, dict[str, str]]:
    if version is None:
        return "none", {}
    tags = dict(_model_version(client, name, version).tags)
    return gate_state(tags), tags


def _flag(client: MlflowClient, name: str, version: str, state: str, how: str, alarms: Sequence[str] = ()) -> None:
    what = [] if state == "passed" else ["a failed gate" if state == "failed" else "no recorded gate"]
    if alarms:
        what.append(f"monitor alarms ({'; '.join(alarms)})")
    if what:
        client.set_model_version_tag(name, version, FLAGGED, f"{how} over {' and '.join(what)}")


@contextlib.contextmanager
def champion_lock(name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive cross-process lock for changing `name`'s champion (fcntl.flock on a state-root file).

    flock locks belong to an open file description, so threads of one process exclude each other
    too (each call opens the file anew). Not re-entrant: take it once, use the `_locked` helpers.
    """
    locks = load_settings().locks_dir
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"champion-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
    deadline = time.monotonic() + timeout
    with path.open("a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another flywheel process holds {path} for over {timeout:.0f} s") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sync_locked(client: MlflowClient, name: str
                 ) -> tuple[RegisteredModel, list[ChampionEvent], int, ChampionEvent | None]:
    """Record a hand move if the alias disagrees with the history.

    Returns the registered model, the history (with that entry), the next sequence number, and the
    entry recorded now (None if the history already agreed).
    """
    rm = _registered_model(client, name)
    events, seq = _history(rm)
    current = _alias(rm)
    last = events[-1].to_version if events else None
    if current == last:
        return rm, events, seq, None
    state, tags = _gate_of(client, name, current)
    events.append(_append(
        client, name, seq, action="outside", by=OUTSIDE, from_version=last, to_version=current, gate=state,
        reason="champion alias moved outside flywheel (MLflow UI or API); recorded when flywheel next read the "
               "registry", user="unknown"))
    if current is not None:
        _flag(client, name, current, state, "moved by hand outside flywheel", monitor_alarms(tags))
    log.warning("%s: champion moved outside flywheel: %s -> %s (gate %s)", name, _v(last), _v(current), state)
    return rm, events, seq + 1, events[-1]


def sync_history(client: MlflowClient | str, name: str) -> ChampionEvent | None:
    """Append an `outside` entry when the champion alias differs from the last recorded one.

    Returns that entry, or None when the history already agrees. Call it on every read path (list,
    show, rollback, promote, the serving watcher): MLflow cannot tell us of a hand move in the UI
    unless webhooks are set up, so this is how hand moves get into the history. A move that is
    undone before anyone reads the registry (A -> B -> A) leaves no trace.
    """
    client = _client(client)
    with champion_lock(name):
        return _sync_locked(client, name)[3]


def champion_history(client: MlflowClient | str, name: str) -> list[ChampionEvent]:
    """Every recorded change of champion, oldest first (after recording any hand move)."""
    client = _client(client)
    with champion_lock(name):
        return _sync_locked(client, name)[1]


def champion_version(client: MlflowClient | str, name: str) -> str | None:
    """The current champion (None if there is none), after recording any hand move.

    Read this before evaluating the challenger against the champion and pass it as `expected`.
    """
    client = _client(client)
    with champion_lock(name):
        return _alias(_sync_locked(client, name)[0])


# ----------------------------------------------------------------------------- moving the champion


def set_champion(client: MlflowClient | str, name: str, version: str, *, by: str, reason: str = "",
                 expected: str | None, forced: bool = False) -> ChampionEvent | None:
    """Make `version` champion if, at write time, the champion is still `expected` (compare-and-set).

    `expected` is the champion the decision was taken against (None = there was none); if another
    promotion, a rollback or a hand move changed it since, raise ChampionChanged and move nothing.
    A version whose recorded gate did not pass is refused (GateNotPassed), and so is one carrying
    reward-hacking monitor alarms (MonitorAlarmed, a GateNotPassed), unless `forced`, which needs a
    `reason` and flags the version. Returns the history entry, or None if `version` already
    is the champion.

    Guarantee: MLflow has no compare-and-set on aliases, so the re-read, compare, alias write and
    history append run under `champion_lock`, an fcntl lock in the state root. Among flywheel
    processes that share that state root (and so the same lock file) and the same MLflow, two
    promotions decided against the same champion cannot both win: the second sees the first's
    champion and gets ChampionChanged. Not guaranteed: a hand move in the MLflow UI/API, or a
    flywheel process on another machine with a different state root, does not take the lock; the
    former is recorded afterwards by `sync_history`. The alias is written before the history
    entry: a crash in between leaves a mismatch that the next sync records as an `outside` move,
    so no change is ever lost, only mislabelled.
    """
    client = _client(client)
    version, expected = str(version), None if expected is None else str(expected)
    if forced and not reason.strip():
        raise ReasonRequired(f"forcing v{version} of {name!r} past its gate needs a reason")
    with champion_lock(name):
        rm, _, seq, _ = _sync_locked(client, name)
        current = _alias(rm)
        if current != expected:
            raise ChampionChanged(name, expected, current)
        if current == version:
            return None
        state, tags = _gate_of(client, name, version)
        alarms = monitor_alarms(tags)
        if state != "passed" and not forced:
            raise (MonitorAlarmed if alarms else GateNotPassed)(
                _gate_refusal(name, version, tags) + " (forcing it needs a reason)")
        if alarms and not forced:
            raise MonitorAlarmed(f"v{version} of {name!r} carries reward-hacking monitor alarms: "
                                 f"{'; '.join(alarms)} (forcing it needs a reason)")
        client.set_registered_model_alias(name, CHAMPION, version)
        event = _append(client, name, seq, action="forced" if forced else "promote", by=by, from_version=current,
                        to_version=version, gate=state, reason=reason, user=_user())
    if forced:
        client.set_model_version_tag(name, version, FORCED, "true")
        client.set_model_version_tag(name, version, FORCED_REASON, reason.strip())
        _flag(client, name, version, state, f"forced by {by} ({reason})", alarms)
    return event


def promote(client: MlflowClient | str, name: str, version: str, *, force: bool = False,
            reason: str | None = None, by: str = "flywheel models promote") -> ChampionEvent | None:
    """A person promotes `version`: refused if its recorded gate failed or it carries monitor alarms,
    unless forced with a reason.

    The decision is taken against the champion read here, so it is compared-and-set like a gate's.
    """
    client = _client(client)
    version = str(version)
    _model_version(client, name, version)  # ModelNotFound / VersionNotFound before anything else
    if force and not (reason or "").strip():
        raise ReasonRequired(f"forcing v{version} of {name!r} past its gate needs a reason")
    expected = champion_version(client, name)
    return set_champion(client, name, version, by=by, reason=reason or "", expected=expected, forced=force)


def promote_if_passed(client: MlflowClient | str, name: str, version: str, verdicts: Sequence[GateVerdict], *,
                      expected: str | None, by: str = "gate") -> bool:
    """Record the gate on `version` and, if every verdict passed, make it champion with CAS.

    `expected` is the champion the verdicts were computed against (read with `champion_version`
    before evaluation; None = no champion). Returns whether the gate passed. A failed gate or no
    verdicts never moves champion; a champion changed meanwhile raises ChampionChanged (the
    verdicts compare against a champion that no longer serves: evaluate again). A version carrying
    monitor alarms (`monitor.alarms`) fails: a failing `monitor/alarms` verdict is recorded beside the
    given ones, naming the alarms.
    """
    client = _client(client)
    version, expected = str(version), None if expected is None else str(expected)
    # A pass against another champion (or none) would be a wrong decision; a failure stops it anyway.
    for v in (v for v in verdicts if v.passed):
        against = v.champion_version if v.n else None
        if (expected is None and v.n) or (expected is not None and (not v.n or against not in (None, expected))):
            raise ValueError(f"verdict for {v.metric} was computed against {_v(against)} "
                             f"({v.n} paired items), but the expected champion is {_v(expected)}")
    alarms = monitor_alarms(dict(_model_version(client, name, version).tags))
    if alarms:
        verdicts = [*verdicts, monitor_verdict(alarms)]
    record_gate(client, name, version, verdicts, expected)
    if not all_passed(verdicts):
        return False
    set_champion(client, name, version, by=by, reason="; ".join(v.reason for v in verdicts), expected=expected)
    return True


def rollback(client: MlflowClient | str, name: str, by: str = "flywheel models rollback") -> str:
    """Move champion back one step in the recorded history (a stack); returns the version now serving."""
    client = _client(client)
    with champion_lock(name):
        _, events, seq, _ = _sync_locked(client, name)
        stack = _stack(events)
        current = stack[-1] if stack else None
        if len(stack) < 2:
            raise NothingToRollBack(f"{name!r} has no earlier champion in its history to roll back to "
                                    f"(champion: {_v(current)})")
        target = stack[-2]
        if target is None:
            raise NothingToRollBack(f"before {_v(current)}, {name!r} had no champion: nothing to roll back to")
        try:
            state, _ = _gate_of(client, name, target)
        except VersionNotFound:
            raise NothingToRollBack(f"previous champion v{target} of {name!r} no longer exists") from None
        client.set_registered_model_alias(name, CHAMPION, target)
        _append(client, name, seq, action="rollback", by=by, from_version=current, to_version=target, gate=state,
                reason=f"rolled back from {_v(current)}", user=_user())
    if current is not None:
        client.set_model_version_tag(name, current, ROLLED_BACK, "true")
    return target


# ----------------------------------------------------------------------------- reading


def resolve(client_or_uri: MlflowClient | str, name: str, alias: str = CHAMPION) -> ModelVersion:
    """The model version an alias points at (LookupError if the alias is not set)."""
    client = _client(client_or_uri)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise LookupError(f"model {name!r} has no version with alias {alias!r}: {err.message}") from err


def resolve_version(client_or_uri: MlflowClient | str, name: str, version_or_alias: str) -> str:
    """A version number as given (checked to exist), or the version an alias points at.

    Raises ModelNotFound / VersionNotFound / LookupError, each with a one-line message.
    """
    client = _client(client_or_uri)
    if version_or_alias.isdigit():
        _model_version(client, name, version_or_alias)
        return version_or_alias
    return str(resolve(client, name, version_or_alias).version)


def download_version(client_or_uri: MlflowClient | str, name: str, version: str, dst: Path | None = None) -> Path:
    """Download one specific version's HF directory; returns its local path.

    With `dst=None` and a local artifact store MLflow may return the stored folder itself:
    treat the result as read-only, or pass `dst`.
    """
    client = _client(client_or_uri)
    _model_version(client, name, str(version))
    # Not "models:/name/version": MLflow resolves models:/ URIs against the *global* registry URI
    # (mlflow.get_registry_uri()), ignoring the registry_uri argument, so resolve the source here.
    source = client.get_model_version_download_uri(name, str(version))
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(dst) if dst is not None else None, tracking_uri=client.tracking_uri,
    )
    path = Path(local)
    if not (path / "config.json").is_file() and (path / ARTIFACT_PATH / "config.json").is_file():
        path = path / ARTIFACT_PATH
    return path


def download(
    tracking_uri: MlflowClient | str, name: str, alias: str = CHAMPION, dst: Path | None = None
) -> Path:
    """Download the version `<name>@<alias>` points at; returns the local HF directory."""
    client = _client(tracking_uri)
    return download_version(client, name, str(resolve(client, name, alias).version), dst)


def list_versions(client: MlflowClient | str, name: str) -> list[dict]:
    """One row per version, newest first: aliases, run, gate result, flag, metric tags.

    Records any hand move first (sync_history), so a hand-moved ungated champion shows its flag.
    `flag` is non-empty for a version that served without a passed gate.
    """
    client = _client(client)
    with champion_lock(name):
        rm = _sync_locked(client, name)[0]
    aliases: dict[str, list[str]] = {}
    for alias, version in rm.aliases.items():
        aliases.setdefault(str(version), []).append(alias)

    versions: list[ModelVersion] = []
    token = None
    escaped = name.replace("'", "\\'")
    while True:
        page = client.search_model_versions(f"name='{escaped}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break

    rows = []
    for mv in sorted(versions, key=lambda m: int(m.version), reverse=True):
        tags = dict(mv.tags)
        gates = recorded_verdicts(tags)
        rows.append({
            "version": str(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "run_id": mv.run_id,
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc).isoformat(
                timespec="seconds"
            ),
            "stage": tags.get("stage", ""),
            "gate_passed": tags.get("gate.passed", ""),
            "gate_reason": tags.get("gate.reason", ""),
            "gate_champion_version": tags.get("gate.champion_version", ""),
            "gates": gates,
            # The first gate metric, for one-line tables.
            "gate_metric": gates[0].metric if gates else "",
            "gate_value": repr(gates[0].value) if gates else "",
            "flag": tags.get(FLAGGED, ""),
            "alarms": monitor_alarms(tags),
            "forced": tags.get(FORCED) == "true",
            "rolled_back": tags.get(ROLLED_BACK) == "true",
            "metrics": {k.removeprefix("metric."): v for k, v in tags.items() if k.startswith("metric.")},
            "tags": tags,
        })
    return rows
