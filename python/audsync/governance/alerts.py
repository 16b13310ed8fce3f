"""Alerts (governance.md): ``alerts.yml`` beside ``dbt_project.yml`` (or the file
``AUDSYNC_ALERTS`` names), rendered with ``env_var()`` like ``destinations.yml``::

    channels:
      ops_slack: {type: slack, url: "{{ env_var('SLACK_WEBHOOK_URL') }}"}
      pager:     {type: webhook, url: "https://...", secret: "{{ env_var('ALERT_SECRET') }}"}
    rules:
      - when: [error, blocked]          # run statuses
        channels: [ops_slack, pager]
      - when: row_failure_rate          # rows_failed / rows planned to be sent
        above: 0.05
        channels: [ops_slack]
      - when: size_change               # S's size against the mean of the last N runs
        above: 0.30
        runs: 5
        select: "tag:paid_media"        # dbt-style selection, like --select
        channels: [ops_slack]
    timeout_s: 5                        # per channel; optional

An alert names the sync, the run, the numbers and what to do next. It carries no secret
(channel URLs and secrets are masked everywhere) and no member data (an error message is
cut short and anything shaped like an email is replaced). Sending never fails a run and
takes bounded time: one attempt per channel with a short timeout, within a budget for the
whole run; each attempt is recorded in ``audsync_alerts``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import requests
import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .. import names
from ..errors import ConfigError
from ..redact import redact, register_secrets
from ..state import utcnow
from ..warehouse import Relation

logger = logging.getLogger("audsync.alerts")

ALERTS_ENV = "AUDSYNC_ALERTS"
DEFAULT_FILENAME = "alerts.yml"
ALERTS_TABLE = "audsync_alerts"
ALERT_COLUMNS = ("run_id", "sync_name", "rule", "channel", "status", "error_message", "message", "sent_at")
DEFAULT_TIMEOUT_S = 5.0
BUDGET_S = 15.0
"""Most time all alerts of one run may take, whatever the number of channels."""
STATUSES = ("success", "partial_failure", "error", "aborted", "skipped", "blocked")
METRICS = ("row_failure_rate", "size_change")
_EMAIL = re.compile(r"[^\s@'\"<>()]+@[^\s@'\"<>()]+")


@dataclass(frozen=True)
class Channel:
    name: str
    type: str
    url: str
    secret: str | None = None


@dataclass(frozen=True)
class Rule:
    when: tuple[str, ...]
    channels: tuple[str, ...]
    above: float | None = None
    runs: int = 5
    select: str | None = None

    @property
    def name(self) -> str:
        return self.when[0] if self.when[0] in METRICS else "status:" + ",".join(self.when)


@dataclass
class AlertsConfig:
    channels: dict[str, Channel] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    timeout_s: float = DEFAULT_TIMEOUT_S
    rule_selects: dict[int, str] = field(default_factory=dict)
    """``select`` of each rule by its index in the file (checked against the project by
    :func:`check_alerts`)."""


def find_alerts_file(project_dir: Path) -> Path | None:
    """``AUDSYNC_ALERTS`` when set, else ``alerts.yml`` beside dbt_project.yml when present."""
    if os.environ.get(ALERTS_ENV):
        return Path(os.environ[ALERTS_ENV])
    path = Path(project_dir) / DEFAULT_FILENAME
    return path if path.is_file() else None


def load_alerts(path: Path, env: Mapping[str, str] | None = None) -> AlertsConfig:
    """Parse and validate ``alerts.yml``; errors name the channel or rule and the key.

    Raises :class:`ConfigError` with the first problem (and how many more there are;
    ``audsync check`` lists them all, from :func:`check_alerts`)."""
    config, problems = _parse(Path(path), os.environ if env is None else env)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s); `audsync check` lists them)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    return config


def check_alerts(path: Path, env: Mapping[str, str] | None = None, project=None) -> list[str]:
    """Every problem of ``alerts.yml``, one message each (the file, the entry, the key, the
    value and what was expected); ``[]`` when it is valid. With ``project``, each rule's
    ``select`` is also tried against the project's syncs, as a run would."""
    config, problems = _parse(Path(path), os.environ if env is None else env)
    if project is not None:
        for index, rule in config.rule_selects.items():
            try:
                project.select(rule)
            except ConfigError as error:
                problems.append(f"alerts file {path}: rules[{index}], key 'select' is {rule!r}: {error.message}")
    return problems


class _Problems(Exception):
    """One entry's problem, collected by :func:`_parse`."""


def _parse(path: Path, env: Mapping[str, str]) -> tuple[AlertsConfig, list[str]]:
    """The valid part of ``alerts.yml`` and the list of its problems (the one home of the
    validation: runs load it through :func:`load_alerts`, ``audsync check`` through
    :func:`check_alerts`)."""
    config = AlertsConfig()
    problems: list[str] = []
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        return config, [f"alerts file {path} cannot be read: {error}"]
    except yaml.YAMLError as error:
        return config, [f"alerts file {path}: invalid YAML ({type(error).__name__})"]
    if not isinstance(raw, dict):
        return config, [f"alerts file {path}: expected a mapping with channels and rules"]
    jinja = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)

    def problem(text: str) -> _Problems:
        return _Problems(f"alerts file {path}: {text}")

    def env_var(variable: str, default: Any = None) -> Any:
        if variable in env:
            return env[variable]
        if default is not None:
            return default
        raise _EnvUnset(variable)

    jinja.globals["env_var"] = env_var

    def render(value: Any, where: str) -> Any:
        if isinstance(value, str) and "{" in value:
            try:
                return jinja.from_string(value).render()
            except _EnvUnset as unset:
                raise problem(f"{where}: environment variable {unset.args[0]!r} is not set; set it, "
                              "or give env_var a default") from None
            except Exception as error:  # noqa: BLE001 - named, without the template's text
                raise problem(f"{where} could not be rendered ({type(error).__name__})") from None
        return value

    unknown = set(raw) - {"channels", "rules", "timeout_s"}
    if unknown:
        problems.append(f"alerts file {path}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                        "expected channels, rules, timeout_s")
    timeout = raw.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
        problems.append(f"alerts file {path}: key 'timeout_s' is {timeout!r}; expected seconds, above 0 and at most 60")
    else:
        config.timeout_s = float(timeout)
    channels = raw.get("channels") or {}
    if not isinstance(channels, dict):
        problems.append(f"alerts file {path}: key 'channels' is a {type(channels).__name__}; expected a mapping "
                        "of channel names to {type: slack|webhook, url: ...}")
        channels = {}
    declared = list(channels)  # a rule naming a declared but invalid channel is not a second problem
    for name, spec in channels.items():
        try:
            config.channels[name] = _channel(name, spec, render, problem)
        except _Problems as error:
            problems.append(str(error))
    rules = raw.get("rules") or []
    if not isinstance(rules, list):
        problems.append(f"alerts file {path}: key 'rules' is a {type(rules).__name__}; expected a list of rules")
        rules = []
    for index, spec in enumerate(rules):
        try:
            rule = _rule(f"rules[{index}]", spec, declared, problem)
        except _Problems as error:
            problems.append(str(error))
            continue
        if rule.select is not None:
            config.rule_selects[index] = rule.select
        if all(c in config.channels for c in rule.channels):
            config.rules.append(rule)
    return config, problems


class _EnvUnset(Exception):
    """``env_var()`` of a variable that is not set, without a default."""


def _channel(name: str, spec: Any, render, problem) -> Channel:
    where = f"channel {name!r}"
    if not isinstance(spec, dict):
        raise problem(f"{where} is {spec!r}; expected {{type: slack|webhook, url: ...}}")
    kind = spec.get("type")
    if kind not in ("slack", "webhook"):
        raise problem(f"{where}, key 'type' is {kind!r}; expected slack or webhook")
    unknown = set(spec) - {"type", "url", "secret"}
    if unknown:
        raise problem(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; expected type, url, secret")
    url = render(spec.get("url"), f"{where}, key 'url'")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        # The value is not shown: a rendered URL may be a credential.
        raise problem(f"{where}, key 'url' is not an http(s) URL; expected http://... or https://...")
    secret = render(spec.get("secret"), f"{where}, key 'secret'")
    # A Slack incoming-webhook URL is itself the credential.
    register_secrets([url] + ([str(secret)] if secret else []))
    return Channel(name, kind, url, str(secret) if secret else None)


def _rule(where: str, spec: Any, channel_names: list, problem) -> Rule:
    if not isinstance(spec, dict):
        raise problem(f"{where} is {spec!r}; expected a mapping with when and channels")
    unknown = set(spec) - {"when", "channels", "above", "runs", "select"}
    if unknown:
        raise problem(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                      "expected when, channels, above, runs, select")
    when = spec.get("when")
    when = (when,) if isinstance(when, str) else tuple(when or ()) if isinstance(when, (list, tuple)) else (when,)
    metric = [w for w in when if w in METRICS]
    bad = [w for w in when if w not in STATUSES and w not in METRICS]
    if not when or bad or (metric and len(when) > 1):
        raise problem(f"{where}, key 'when' is {spec.get('when')!r}; expected run statuses "
                      f"({', '.join(STATUSES)}), or one of {', '.join(METRICS)}")
    above = spec.get("above")
    if metric and (isinstance(above, bool) or not isinstance(above, (int, float)) or above < 0):
        raise problem(f"{where}, key 'above' is {above!r}; expected a ratio such as 0.05")
    runs = spec.get("runs", 5)
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise problem(f"{where}, key 'runs' is {runs!r}; expected a whole number, 1 or more")
    channels = spec.get("channels")
    channels = (channels,) if isinstance(channels, str) else tuple(channels or ()) if isinstance(channels, (list, tuple)) else (channels,)
    missing = [c for c in channels if c not in channel_names]
    if not channels or missing:
        raise problem(f"{where}, key 'channels' is {spec.get('channels')!r}; expected names of channels: "
                      f"{', '.join(map(str, channel_names)) or 'none declared'}")
    select = spec.get("select")
    if select is not None and (not isinstance(select, str) or not select.strip()):
        raise problem(f"{where}, key 'select' is {select!r}; expected a selector such as 'tag:paid_media'")
    return Rule(when, channels, None if above is None else float(above), runs, select)


# -- evaluation ----------------------------------------------------------------------------


def scrub(text: str | None, limit: int = 300) -> str:
    """A run's message made fit for an alert: secrets masked, emails replaced, cut short."""
    if not text:
        return ""
    cleaned = _EMAIL.sub("<member>", redact(str(text)))
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


_NEXT = {
    "blocked": "check the model; if the change is intended, run `audsync run {sync} --force` once",
    "error": "see `audsync runs {sync}` and fix the cause; the next run retries what was not sent",
    "aborted": "see `audsync runs {sync}`; the next run sends what was not committed",
    "partial_failure": "see audsync_row_errors for run {run_id}; rejected rows are retried by the next run",
}


def status_text(sync: str, result) -> str:
    """The text of a run-status alert."""
    next_step = _NEXT.get(result.status, "see `audsync runs {sync}`").format(sync=sync, run_id=result.run_id)
    detail = scrub(result.error_message)
    return (f"[audsync] {sync}: run {result.run_id} ended {result.status}."
            + (f" {detail}" if detail else "")
            + f" Next: {next_step}.")


def failure_rate_text(sync: str, result, failed: int, planned: int, rate: float, above: float) -> str:
    return (f"[audsync] {sync}: run {result.run_id} had {failed} of {planned} rows rejected "
            f"({rate:.1%}, above {above:.1%}). Next: see audsync_row_errors for run {result.run_id}.")


def size_change_text(sync: str, result, size: int, mean: float, runs: int, change: float, above: float) -> str:
    return (f"[audsync] {sync}: run {result.run_id}: audience size {size} is {change:+.1%} against the mean "
            f"{mean:.0f} of the last {runs} run(s) (limit {above:.0%}). Next: check the model before the next run.")


def fired(rule: Rule, sync, result, size: int | None, previous_sizes: list[int]) -> str | None:
    """The alert's text when ``rule`` fires for ``result``, else None."""
    kind = rule.when[0]
    if kind == "row_failure_rate":
        planned = result.planned.sent
        failed = result.committed.failed
        if planned and failed / planned > rule.above:
            return failure_rate_text(sync.name, result, failed, planned, failed / planned, rule.above)
        return None
    if kind == "size_change":
        sizes = previous_sizes[: rule.runs]
        if size is None or not sizes:
            return None
        mean = sum(sizes) / len(sizes)
        change = (size - mean) / mean if mean else (0.0 if size == 0 else float("inf"))
        if abs(change) > rule.above:
            return size_change_text(sync.name, result, size, mean, len(sizes), change, rule.above)
        return None
    return status_text(sync.name, result) if result.status in rule.when else None


# -- sending -------------------------------------------------------------------------------


def send(channel: Channel, text: str, payload: dict[str, Any], timeout_s: float) -> None:
    """One attempt to deliver an alert; raises on any failure (the caller records it)."""
    if channel.type == "slack":
        body = json.dumps({"text": text}).encode()
        headers = {"Content-Type": "application/json"}
    else:
        body = json.dumps({**payload, "text": text}, sort_keys=True, default=str).encode()
        headers = {"Content-Type": "application/json"}
        if channel.secret:
            stamp = str(int(time.time()))
            digest = hmac.new(channel.secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            headers.update({"X-Audsync-Timestamp": stamp, "X-Audsync-Signature": f"sha256={digest}"})
    answer = requests.post(channel.url, data=body, headers=headers, timeout=timeout_s, allow_redirects=False)
    if not 200 <= answer.status_code < 300:
        raise ChannelAnswer(f"HTTP {answer.status_code}")


class ChannelAnswer(Exception):
    """The channel answered with a status other than 2xx."""


def _failure(error: BaseException) -> str:
    """What went wrong sending an alert, without the URL or the answer's body."""
    if isinstance(error, ChannelAnswer):
        return str(error)
    if isinstance(error, requests.Timeout):
        return "timeout: the channel did not answer in time"
    if isinstance(error, requests.ConnectionError):
        return "unreachable: the channel refused or dropped the connection"
    return type(error).__name__


def alerts_relation(project) -> Relation | None:
    """The ``audsync_alerts`` state table, from the manifest (None before the package has it)."""
    for node in project.manifest.get("nodes", {}).values():
        if node.get("package_name") == names.PACKAGE and node.get("name") == ALERTS_TABLE:
            return Relation(node.get("database"), node["schema"], node.get("alias") or node["name"])
    return None


def after_run(runner, sync, result) -> None:
    """Record S's size on the run, then send (and record) every alert that fires."""
    warehouse = runner.warehouse
    size: int | None = None
    previous: list[int] = []
    with warehouse.session() as session:
        try:
            size = int(session.scalar(f"select count(*) from {warehouse.relation_sql(sync.relation)}"))
            runner.state.update_run(session, result.run_id, audience_size=size)
        except Exception:  # noqa: BLE001 - a state table without the column: no size history
            logger.debug("could not record the audience size", exc_info=True)
    path = find_alerts_file(runner.project.project_dir)
    if path is None:
        return
    config = load_alerts(path)
    rules = [r for r in config.rules if r.select is None or sync.name in {s.name for s in runner.project.select(r.select)}]
    if not rules:
        return
    if any(r.when[0] == "size_change" for r in rules):
        with warehouse.session() as session:
            rows = session.fetchall(
                f"select audience_size from {runner.state.runs} where sync_name = ? and run_id <> ?"
                " and audience_size is not null and status in ('success', 'partial_failure')"
                " order by started_at desc limit ?",
                (sync.name, result.run_id, max(r.runs for r in rules)),
            )
            previous = [int(r[0]) for r in rows]
    deadline = time.monotonic() + BUDGET_S
    records = []
    payload = {"type": "audsync.alert", "sync": sync.name, "run_id": result.run_id, "status": result.status,
               "planned": result.planned.sent, "rows_failed": result.committed.failed, "audience_size": size}
    for rule in rules:
        text = fired(rule, sync, result, size, previous)
        if text is None:
            continue
        for name in rule.channels:
            channel = config.channels[name]
            left = deadline - time.monotonic()
            status, error = "sent", None
            if left <= 0.05:
                status, error = "skipped", "the run's alert time budget was spent"
            else:
                try:
                    send(channel, text, {**payload, "rule": rule.name}, min(config.timeout_s, left))
                except Exception as exc:  # noqa: BLE001 - logged and recorded, never raised
                    # The kind only: a transport error's text quotes the URL's path, which
                    # for a Slack incoming webhook is the credential.
                    status, error = "failed", _failure(exc)
                    logger.warning("audsync: alert to channel %r failed: %s", name, error)
            records.append((result.run_id, sync.name, rule.name, name, status, error, text, utcnow()))
    relation = alerts_relation(runner.project)
    if records and relation is not None:
        with warehouse.session() as session:
            if session.columns(relation) is not None:
                session.executemany(
                    f"insert into {warehouse.relation_sql(relation)} ({', '.join(ALERT_COLUMNS)})"
                    f" values ({', '.join('?' for _ in ALERT_COLUMNS)})",
                    records,
                )
