"""Service settings, read once at start-up from the environment (and ``.env``).

Standard names where they exist (``NATS_URL``, ``OPENAI_API_KEY``...); everything else is
``STANCHION_*``. A bad value raises ``ConfigError`` naming the variable.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from stanchion.handlers.errors import ConfigError

_STANDARD_NAMES = {
    "nats_url": "NATS_URL",
    "openai_api_key": "OPENAI_API_KEY",
    "openai_base_url": "OPENAI_BASE_URL",
    "anthropic_api_key": "ANTHROPIC_API_KEY",
    "ollama_base_url": "OLLAMA_BASE_URL",
    "otel_endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT",
    "otel_service_name": "OTEL_SERVICE_NAME",
    "nats_token": "NATS_TOKEN",
    "nats_user": "NATS_USER",
    "nats_password": "NATS_PASSWORD",
    "nats_creds": "NATS_CREDS",
    "nats_ca": "NATS_CA",
    "nats_cert": "NATS_CERT",
    "nats_key": "NATS_KEY",
}


def _std(field_name: str) -> AliasChoices:
    return AliasChoices(_STANDARD_NAMES[field_name])


class Settings(BaseSettings):
    """Everything the service reads from its environment. See the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="STANCHION_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # Standard names.
    nats_url: str | None = Field(default=None, validation_alias=_std("nats_url"))
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=_std("openai_api_key"))
    openai_base_url: str | None = Field(default=None, validation_alias=_std("openai_base_url"))
    anthropic_api_key: SecretStr | None = Field(default=None, validation_alias=_std("anthropic_api_key"))
    ollama_base_url: str = Field(default="http://localhost:11434/v1", validation_alias=_std("ollama_base_url"))
    otel_endpoint: str | None = Field(default=None, validation_alias=_std("otel_endpoint"))
    otel_service_name: str = Field(default="stanchion", validation_alias=_std("otel_service_name"))
    # NATS connection security, under the names the nats CLI uses.
    nats_token: SecretStr | None = Field(default=None, validation_alias=_std("nats_token"))
    nats_user: str | None = Field(default=None, validation_alias=_std("nats_user"))
    nats_password: SecretStr | None = Field(default=None, validation_alias=_std("nats_password"))
    nats_creds: Path | None = Field(default=None, validation_alias=_std("nats_creds"))
    nats_ca: Path | None = Field(default=None, validation_alias=_std("nats_ca"))
    nats_cert: Path | None = Field(default=None, validation_alias=_std("nats_cert"))
    nats_key: Path | None = Field(default=None, validation_alias=_std("nats_key"))

    # STANCHION_*
    policy: Path | None = None
    profile: Literal["auto", "production", "local"] = "auto"
    input_subject: str = "tasks.classify"
    output_subject: str = "tasks.classified"
    dlq_subject: str = "dlq.tasks.classify"
    input_stream: str = "STANCHION_TASKS"
    output_stream: str = "STANCHION_RESULTS"
    dlq_stream: str = "STANCHION_DLQ"
    durable: str = "stanchion-classifier"
    max_in_flight: int = Field(default=16, ge=1, le=10_000)
    replicas: int = Field(default=1, ge=1, le=1000)
    max_deliver: int = Field(default=5, ge=1)
    ack_wait_s: float = Field(default=5.0, gt=0)
    deadline_s: float = Field(default=60.0, gt=0)
    attempt_timeout_s: float = Field(default=20.0, gt=0)
    output_retries: int = Field(default=1, ge=0, le=10)
    max_payload_bytes: int = Field(default=64 * 1024, ge=256)
    dedup_window_s: float = Field(default=3600.0, gt=0)
    nak_backoff_s: Annotated[tuple[float, ...], NoDecode] = (2.0, 10.0, 30.0, 60.0)
    """Seconds, by delivery: ``2,10,30,60``, ``[2, 10, 30, 60]`` or one number."""
    result_bucket: str = "stanchion_results"
    breaker_bucket: str = "stanchion_breakers"
    """The KV bucket of the breakers' shared state (used with ``STANCHION_BREAKER_STORE=kv``)."""
    breaker_store: Literal["auto", "memory", "kv"] = "auto"
    """Where breaker state lives: ``kv`` shares it between replicas, ``memory`` keeps it per process; ``auto``:
    ``kv`` when ``STANCHION_REPLICAS`` > 1."""
    stream_replicas: int = Field(default=1, ge=1, le=5)
    """Replication factor of every stream and bucket the service creates (3 on a three-node cluster)."""
    output_mode: Literal["tool", "native", "prompted"] | None = None
    """Output mode of the built-in default policy's models (unset: ``tool``, ``native`` for the local profile)."""
    health_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve ``/livez`` and ``/readyz`` over HTTP on this port (unset: no HTTP endpoint)."""
    health_host: str = "0.0.0.0"
    result_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    max_pause_s: float = Field(default=60.0, gt=0)
    input_max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    input_retention: Literal["limits", "workqueue", "interest"] = "limits"
    output_max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """How long the output streams keep results (their duplicate window must fit in it)."""
    output_max_bytes: int = Field(default=-1, ge=-1)
    """Size cap of each output stream, oldest results dropped first (-1: none)."""
    dlq_max_age_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    """How long the dead-letter streams keep dead letters."""
    dlq_max_bytes: int = Field(default=-1, ge=-1)
    retry_redeliveries: bool = False
    shutdown_grace_s: float = Field(default=30.0, gt=0)
    nats_server_bin: Path | None = None
    nats_store_dir: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["console", "json"] = "console"
    trace_content: bool = False
    budget_usd: float | None = Field(default=None, gt=0)
    gc_threshold: int = Field(default=10_000, ge=0)
    """Python's generation-0 GC threshold once the service has started (0: leave Python's); see ``tune_gc``."""

    @field_validator("nak_backoff_s", mode="before")
    @classmethod
    def _delays(cls, value: object) -> object:
        """One number, a comma-separated list or a JSON list, as the environment gives it."""
        if isinstance(value, int | float):
            return (value,)
        if not isinstance(value, str):
            return value
        text = value.strip()
        try:
            parsed = json.loads(text) if text.startswith("[") else [p for p in text.replace(",", " ").split() if p]
            delays = tuple(float(p) for p in parsed)
        except (ValueError, TypeError):
            raise ValueError(f"expected seconds by delivery, like 2,10,30,60 (got {value!r})") from None
        if any(d < 0 for d in delays):
            raise ValueError(f"delays must not be negative (got {value!r})")
        return delays

    @field_validator("policy")
    @classmethod
    def _policy_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"policy file {str(value)!r} does not exist")
        return value

    @field_validator("nats_creds", "nats_ca", "nats_cert", "nats_key")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @field_validator(
        "nats_url", "openai_base_url", "otel_endpoint", "budget_usd", "output_mode", "health_port", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _windows(self) -> Settings:
        if self.dedup_window_s > min(self.output_max_age_s, self.dlq_max_age_s):
            raise ValueError(
                f"STANCHION_DEDUP_WINDOW_S ({self.dedup_window_s:g}) must not exceed STANCHION_OUTPUT_MAX_AGE_S "
                f"({self.output_max_age_s:g}) or STANCHION_DLQ_MAX_AGE_S ({self.dlq_max_age_s:g})"
            )
        if self.dedup_window_s <= self.ack_wait_s:
            # A result republished after a crash must still fall inside the window to be dropped as a duplicate.
            raise ValueError(
                f"STANCHION_DEDUP_WINDOW_S ({self.dedup_window_s:g}) must be more than "
                f"STANCHION_ACK_WAIT_S ({self.ack_wait_s:g})"
            )
        return self

    @property
    def shared_breakers(self) -> bool:
        """Whether breaker state lives in the KV bucket, shared by every replica."""
        return self.breaker_store == "kv" or (self.breaker_store == "auto" and self.replicas > 1)

    def secrets(self) -> list[str]:
        """Every secret value known to the settings, for redaction."""
        secrets = (self.openai_api_key, self.anthropic_api_key, self.nats_token, self.nats_password)
        values = [s.get_secret_value() for s in secrets if s is not None]
        # OTLP exporter headers usually carry a collector's API key ("authorization=Bearer ...,x-api-key=...").
        for signal in ("", "TRACES_", "METRICS_"):
            for pair in os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}HEADERS", "").split(","):
                value = urllib.parse.unquote(pair.partition("=")[2]).strip()
                values += [value, *value.split()[1:]]  # "Bearer xyz": the whole value and the token alone
        return [v for v in values if v]


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return _STANDARD_NAMES.get(field_name, f"STANCHION_{field_name.upper()}")


def load_settings(only: Collection[str] | None = None) -> Settings:
    """Read and validate the settings; raises ``ConfigError`` naming the first bad variable.

    Args:
        only: The fields a command needs (``None``: all). A bad value of any other field is left at its default, so
            that e.g. ``stanchion report`` does not refuse to start over a service setting it never reads.
    """
    ignored: dict[str, Any] = {}
    while True:  # each round leaves one more field at its default, or raises
        try:
            return Settings(**ignored)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = str(first["loc"][0]) if first["loc"] else ""
            field = _field_of(loc)
            if only is not None and field is not None and field not in only and field not in ignored:
                ignored[field] = Settings.model_fields[field].get_default(call_default_factory=True)
                continue
            name = loc if loc.isupper() or not loc else env_name(loc)
            message = first["msg"].removeprefix("Value error, ")
            secret = any(word in name for word in ("KEY", "TOKEN", "PASSWORD"))
            shown = "" if secret or first["type"] == "value_error" else f" (got {first.get('input')!r})"
            raise ConfigError(f"{name}: {message}{shown}" if name else f"{message}{shown}") from None


def _field_of(loc: str) -> str | None:
    """The field an error's location names (a field name, or the standard variable of one)."""
    if loc in Settings.model_fields:
        return loc
    return next((field for field, name in _STANDARD_NAMES.items() if name == loc), None)


NATS_CONNECTION = frozenset(
    {
        "nats_url",
        "nats_token",
        "nats_user",
        "nats_password",
        "nats_creds",
        "nats_ca",
        "nats_cert",
        "nats_key",
        "log_level",
        "log_format",
    }
)
"""What every command talking to NATS reads."""
