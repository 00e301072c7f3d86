"""MonitorConfig: defaults, YAML/TOML files, dicts and TRAINMON_* environment overrides.

Every section is a small validated model with documented fields. An invalid
config fails here, at load time, with the dotted key and what was expected,
never later in the middle of a run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from monitor.schema import no_bool_for_a_number

log = logging.getLogger("trainmon")


class ConfigError(ValueError):
    """A configuration problem; the message names the key (dotted path) and the source."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _numbers = field_validator("*", mode="before")(classmethod(no_bool_for_a_number))


class MetricsConfig(_Section):
    """The per-process Prometheus endpoint."""

    # The password: `monitor config` and run.json show "**********", errors never the input.
    model_config = ConfigDict(hide_input_in_errors=True)

    enabled: bool = Field(True, description="Serve /metrics from the training process.")
    host: str = Field(
        "127.0.0.1", description="Address to bind; loopback by default. 0.0.0.0 (or ::) binds every interface, "
        "for a Prometheus on another host.",
    )
    port: int = Field(
        9740, ge=0, le=65535,
        description="Base port; each process binds port + LOCAL_RANK, or the next free one. 0 picks any free port.",
    )
    port_search: int = Field(50, ge=1, description="How many consecutive ports to try on conflict.")
    advertise: str | None = Field(
        None, description="host[:port] Prometheus scrapes this endpoint at, written into targets.json, the shared "
        ".trainmon-targets/ and run.json. Default: the bind address when it is loopback or one address of this "
        "machine; the node's fully qualified name when `host` binds every interface (0.0.0.0, ::). A port given "
        "here (a NAT or hostPort mapping) is offset by LOCAL_RANK like the bind port; without one, the bound "
        "port is advertised.",
    )
    tls_cert_file: str | None = Field(
        None, description="Serve /metrics over HTTPS with this PEM certificate (chain); needs tls_key_file. The "
        "exported scrape config then says `scheme: https`. Files that do not load leave the rank without an "
        "endpoint (warned), never on plain HTTP.",
    )
    tls_key_file: str | None = Field(None, description="The PEM private key of tls_cert_file.")
    tls_client_ca_file: str | None = Field(
        None, description="Require client certificates signed by this CA (mutual TLS); the exported scrape config "
        "then names Prometheus's client certificate and key (`tls_config.cert_file`/`key_file`).",
    )
    tls_ca_file: str | None = Field(
        None, description="For the exported scrape config only: the CA Prometheus verifies the endpoints with "
        "(`tls_config.ca_file`); default tls_cert_file itself (a self-signed certificate).",
    )
    basic_auth_user: str | None = Field(
        None, description="Require HTTP basic auth with this user name (and basic_auth_password or "
        "basic_auth_password_hash); the exported scrape config carries `basic_auth`. Use it with TLS: basic "
        "auth sends the password in clear otherwise.",
    )
    basic_auth_password: SecretStr | None = Field(
        None, description="The basic auth password (kept secret: shown as ********** by `monitor config` and in "
        "run.json).",
    )
    basic_auth_password_hash: str | None = Field(
        None, description="The password's hash instead of the password, so the config holds no secret: "
        "pbkdf2_sha256$... from monitor.exporters.prometheus.hash_password, or bcrypt $2b$... (with the "
        "bcrypt package).",
    )
    extremes_window_seconds: float = Field(
        60.0, gt=0, description="trainmon_loss_max, trainmon_grad_norm_max and trainmon_loss_scale_min span the "
        "steps of this many seconds, so a one-step spike is still there at the next scrape: keep it above "
        "Prometheus's scrape interval.",
    )

    @field_validator("advertise", "basic_auth_user", "basic_auth_password", "basic_auth_password_hash",
                     mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        # TRAINMON_* values are JSON-parsed: a numeric password or host name arrives as a number.
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("advertise")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            from monitor.exporters.endpoint import split_hostport

            split_hostport(v)  # ValueError: no host, or a port that is no number in 1..65535
        return v

    @field_validator("basic_auth_password")
    @classmethod
    def _not_redacted(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value() == "**********":
            raise ValueError("is redacted (run.json and `monitor config` hide it): give the password itself")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> MetricsConfig:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        given = (self.basic_auth_password is not None) + (self.basic_auth_password_hash is not None)
        if self.basic_auth_user and given != 1:
            raise ValueError("basic_auth_user needs one of basic_auth_password and basic_auth_password_hash")
        if not self.basic_auth_user and given:
            raise ValueError("basic_auth_password and basic_auth_password_hash need basic_auth_user")
        if self.basic_auth_password_hash:
            from monitor.exporters.endpoint import parse_password_hash

            try:
                parse_password_hash(self.basic_auth_password_hash)
            except ValueError as e:
                raise ValueError(f"basic_auth_password_hash: {e}") from None
        return self


class TensorBoardConfig(_Section):
    """Per-rank TensorBoard event files in the run directory."""

    enabled: bool = Field(True, description="Write events.out.tfevents.* files.")
    flush_secs: float = Field(2.0, gt=0, description="Flush interval, so tailers and TensorBoard see steps promptly.")
    param_norms_every: int = Field(
        50, ge=0, description="Also chart per-parameter gradient norms as scalar series every N steps (0: never; "
        "they are many series). The complete vector is stored with every step that has it, compactly.",
    )


class CollectorConfig(_Section):
    """What the training thread gathers per optimizer step."""

    queue_size: int = Field(
        1024, ge=1, description="Records buffered for the publisher; beyond this they are dropped and counted.",
    )
    param_norms_every: int = Field(
        50, ge=0,
        description="Compute per-parameter gradient norms every N optimizer steps, step 0 included (0: never). "
        "Every step costs a read of every gradient and per-tensor work on the training thread and the publisher "
        "(benchmarks/results/hostcost.md); every 50, as TensorBoard charts them, it is a few us per step. Rules "
        "use the steps that have them: grad.vanishing examines those among every `stride`-th step (at 50, a dead "
        "parameter is named after 20 x 50 steps), the spike and divergence rules name the parameters that moved "
        "most when the step has them. Lower it (10, or 1 for every step) for short runs or that evidence.",
    )
    count_tokens: bool = Field(True, description="Count integer input elements of the model's forward as tokens.")


class _HttpSink(_Section):
    # Secret: run.json and `monitor config` show "**********", logs scheme://host/***, errors never the input.
    model_config = ConfigDict(hide_input_in_errors=True)

    url: SecretStr = Field(description="Where to POST (kept secret: logged as scheme://host/*** only).")
    timeout: float = Field(5.0, gt=0, description="Seconds per HTTP attempt.")
    retries: int = Field(3, ge=0, description="Retries after a failed attempt (connection error, 429, 5xx).")
    backoff: float = Field(1.0, ge=0, description="Seconds before the first retry; doubled for each further one.")
    queue_size: int = Field(256, ge=1, description="Alerts waiting for delivery; beyond this they are dropped and counted.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: SecretStr) -> SecretStr:
        url = v.get_secret_value()
        if url == "**********":  # copied from run.json or `monitor config`, which hide it
            raise ValueError("is redacted (run.json and `monitor config` hide it): give the URL itself")
        if not url.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        from urllib.parse import urlsplit

        try:  # the URL's parts as delivery reads them; the error never quotes it (it may hold a token)
            parts = urlsplit(url)
            parts.port  # noqa: B018 (parsed when read: a port that is no number raises here)
        except ValueError:
            raise ValueError("is not a valid URL (a bracketed IPv6 host not closed, a port that is no number?)") from None
        if not parts.hostname:
            raise ValueError("has no host")
        return v


class WebhookConfig(_HttpSink):
    """A Slack-compatible incoming webhook (or anything that accepts its JSON)."""

    min_severity: Literal["info", "warning", "critical"] = Field("warning", description="Least severe alert sent.")


class AlertmanagerConfig(_HttpSink):
    """Alertmanager's v2 API; `url` is its base address, e.g. http://alertmanager:9093."""

    min_severity: Literal["info", "warning", "critical"] = Field("info", description="Least severe alert sent.")
    resend_seconds: float = Field(
        60.0, gt=0, description="Re-post active alerts this often (Alertmanager resolves alerts it stops hearing about).",
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every alert (e.g. cluster).")
    runbook_base: str | None = Field(
        None, description="docs/rules.md as a URL (e.g. your copy of the repository's): each alert then carries a "
        "runbook_url annotation to its rule's section, as the exported Prometheus rules do. None: no link.",
    )


class SinksConfig(_Section):
    """Alert destinations besides the console, alerts.jsonl and /metrics."""

    webhook: WebhookConfig | None = None
    alertmanager: AlertmanagerConfig | None = None


class DdpConfig(_Section):
    """How ranks compare notes (through the job's key-value store, never a collective)."""

    exchange_every: int = Field(
        10, ge=0, description="Every N optimizer steps each rank posts its parameter fingerprint and step phase "
        "times (input, compute, collective wait); rank 0 compares them (ddp.desync, ddp.straggler). 0: off.",
    )
    exchange_timeout: float = Field(60.0, gt=0, description="Seconds rank 0 waits for the other ranks' posts.")
    halt_margin_seconds: float = Field(
        5.0, gt=0, description="With halt_on: every rank stops at the same optimizer step, this many seconds of "
        "steps (at least 3) after the alert, so each rank hears of it in time; a rank halting alone would leave "
        "the others blocked in their next all-reduce.",
    )
    local_grad_norm: bool = Field(
        True, description="Measure each rank's gradient norm before the all-reduce (a DDP communication hook; "
        "left out when the model has a hook of its own).",
    )


class WatchdogConfig(_Section):
    """The in-process stall watchdog (run.stalled)."""

    enabled: bool = Field(True, description="Let run.stalled look at the clock even while the loop is stuck.")
    interval_seconds: float = Field(5.0, gt=0, description="How often the watchdog looks.")
    dump_stacks: bool = Field(True, description="On a stall, write every thread's Python stack to the run directory.")


class AttemptsConfig(_Section):
    """Attempts: each attach into a run directory is one (a resume, a restart); see the README's "Resuming"."""

    warm_start: bool = Field(
        True, description="A resumed process's rules first replay the directory's records before the resume step "
        "(loss window, grad-norm baseline, warmup facts), delivering nothing.",
    )
    heartbeat_seconds: float = Field(
        30.0, gt=0, description="How often rank 0 refreshes its attempt's heartbeat in run.json (how a process on "
        "another host tells that the run directory is still being written).",
    )
    stale_after_seconds: float = Field(
        120.0, gt=0, description="A heartbeat older than this means the attempt on another host is gone: a new "
        "process may write the directory. On the same host the process id decides.",
    )

    @model_validator(mode="after")
    def _stale_after_beats(self) -> AttemptsConfig:
        if self.stale_after_seconds <= self.heartbeat_seconds:
            raise ValueError(f"stale_after_seconds ({self.stale_after_seconds}) must exceed heartbeat_seconds "
                             f"({self.heartbeat_seconds})")
        return self


class ExitConfig(_Section):
    """How the process's end is handled: a SIGTERM (what schedulers and torchrun send) and `close()`."""

    handle_sigterm: bool = Field(
        True, description="On SIGTERM, flush what the monitor holds (queued steps, event files, run.json's end "
        "summary, targets) within `flush_seconds`, then hand the signal to the handler that was there before.",
    )
    flush_seconds: float = Field(
        10.0, gt=0, description="The most `close()` (and the SIGTERM flush) may take in all: local files first, "
        "network deliveries last with what is left.",
    )


class AttentionConfig(_Section):
    """The attention probe: per-layer entropy and max logit on sampled steps (rank 0)."""

    enabled: bool = Field(
        True, description="Probe F.scaled_dot_product_attention and F.multi_head_attention_forward calls in the "
        "model's forward on sampled steps. Off for torch.compile'd models: use mon.observe_attention there.",
    )
    every: int = Field(10, ge=1, description="Probe one optimizer step in this many (its first micro-batch).")
    max_every: int = Field(1000, ge=1, description="The longest interval the cost control may stretch `every` to.")
    budget: float = Field(
        0.0025, gt=0, le=1, description="Share of training time the probe may take (its measured cost / "
        "(interval x step time)); above it the interval doubles, well below it the interval shrinks back to "
        "`every`. A quarter of the 1% the defaults may add in all: the hooks take the rest.",
    )
    rows: int = Field(64, ge=1, description="Query rows recomputed per call (evenly spaced, all keys and heads).")
    batch: int = Field(2, ge=1, description="Sequences of the batch recomputed per call.")
    prometheus_layers: int = Field(
        8, ge=0, description="Per-layer Prometheus series: the layers at highest risk (lowest entropy, largest "
        "logit) up to this many; 0 exports every layer. TensorBoard and the rules always get all layers.",
    )

    @model_validator(mode="after")
    def _interval_order(self) -> AttentionConfig:
        if self.max_every < self.every:
            raise ValueError(f"max_every ({self.max_every}) must be >= every ({self.every})")
        return self


class ConsoleConfig(_Section):
    """Alerts printed by the process that raises them."""

    enabled: bool = Field(True, description="Print each alert as one line on stderr.")


class MonitorConfig(_Section):
    """Configuration of `monitor.attach` (and of the rules in `monitor check`)."""

    run_name: str | None = Field(None, description="Run id; defaults to the run directory's name.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    collector: CollectorConfig = Field(default_factory=CollectorConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    ddp: DdpConfig = Field(default_factory=DdpConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    attempts: AttemptsConfig = Field(default_factory=AttemptsConfig)
    exit: ExitConfig = Field(default_factory=ExitConfig)
    rules: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-rule options by rule id, e.g. {'loss.spike': {'z_critical': 9}, 'amp.overflow': {'enabled': False}}.",
    )
    halt_on: Literal["warning", "critical"] | None = Field(
        None, description="Raise monitor.TrainingHalted at the next optimizer.step() after an alert this severe.",
    )
    on_alert: Callable[[Any], Any] | None = Field(
        None, description="Called with each Alert on the publisher thread (preflight findings: inside attach; "
        "run.stalled: on the watchdog thread); errors are caught and counted.",
        exclude=True,
    )

    @field_validator("rules", mode="before")
    @classmethod
    def _rules_mapping(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ValueError("must be a mapping of rule id to options")
        for rule_id, opts in v.items():
            if opts is not None and not isinstance(opts, Mapping):
                raise ValueError(f"options of rule {rule_id!r} must be a mapping")
        return {k: dict(o or {}) for k, o in v.items()}

    @model_validator(mode="after")
    def _validate_rule_options(self) -> MonitorConfig:
        # Rule options are validated against each rule's own config model, so a
        # typo in a threshold fails here. Lazy import: rules depend on config, not
        # the other way round at import time.
        from monitor.rules.registry import validate_rule_options

        validate_rule_options(self.rules)
        return self


def load_config(
    source: MonitorConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    warn: bool = True,
) -> MonitorConfig:
    """Build a validated MonitorConfig from a config object, a dict, or a YAML/TOML/JSON path.

    TRAINMON_* environment variables override what the source says; `$TRAINMON_CONFIG`
    names a file used when no source is given. Raises ConfigError naming the key (and the
    variable, when one set it). TRAINMON_* names that are no config key are ignored, never
    fatal, and so are the old MONITOR_* config variables; with `warn`, a warning names them
    (once per process; not the Service links Kubernetes injects).
    """
    from monitor.config_load import load

    return load(source, environ=environ, warn=warn)
