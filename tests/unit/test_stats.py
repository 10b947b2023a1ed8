"""Rolling statistics: percentiles within a bucket of the exact ones, exact merges, bounded memory."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import random

import pytest
import structlog
from rich.console import Console

from stanchion.contracts import Usage
from stanchion.handlers.errors import ConfigError
from stanchion.handlers.observability.logs import configure_logging
from stanchion.handlers.observability.report import combine, render
from stanchion.handlers.observability.stats import Histogram, ServiceStats
from stanchion.handlers.settings import NATS_CONNECTION, Settings, load_settings
from stanchion.middleware import AttemptRecord, Call


def exact(values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def test_histogram_percentiles_are_within_five_percent_of_the_exact_ones() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(4, 1.2) for _ in range(20_000)]  # ms, long-tailed like model latencies
    histogram = Histogram()
    for value in values:
        histogram.add(value)
    for q in (0.5, 0.95, 0.99):
        got = histogram.percentile(q)
        assert got is not None
        assert exact(values, q) <= got <= exact(values, q) * 1.05 + 1e-9, q
    assert histogram.count == len(values)
    assert len(histogram.buckets) < 400  # bounded by range, not by traffic


def test_merging_histograms_equals_one_histogram_of_everything() -> None:
    rng = random.Random(3)
    a, b, both = Histogram(), Histogram(), Histogram()
    for i in range(5000):
        value = rng.expovariate(1 / 200)
        (a if i % 3 else b).add(value)
        both.add(value)
    a.merge(Histogram.from_dict(json.loads(json.dumps(b.to_dict()))))
    assert a.buckets == both.buckets and a.count == both.count
    assert [a.percentile(q) for q in (0.5, 0.95, 0.99)] == [both.percentile(q) for q in (0.5, 0.95, 0.99)]


def test_an_empty_histogram_has_no_percentiles() -> None:
    assert Histogram().percentile(0.5) is None


def record(candidate: str, outcome: str, latency_s: float, cost: float | None = 0.001) -> AttemptRecord:
    return AttemptRecord(
        candidate=candidate,
        model=f"openai:{candidate}",
        route="default",
        attempt=1,
        delivery=1,
        outcome=outcome,
        latency_s=latency_s,
        usage=Usage(input_tokens=100, output_tokens=20, requests=1) if outcome == "ok" else Usage(),
        cost_usd=cost if outcome == "ok" else None,
    )


def replica(name: str, ok_calls: int, failed_calls: int) -> ServiceStats:
    stats = ServiceStats(replica=name, started_at=1.0)
    call = Call(event=None)
    for _ in range(ok_calls):
        stats.attempt_finished(call, record("fast", "ok", 0.2))
        stats.event_finished(outcome="answered", latency_s=0.25, call=call)
    degraded = Call(event=None)
    degraded.degraded = True
    degraded.decide("fallback", "503", model="fast")
    for _ in range(failed_calls):
        stats.attempt_finished(degraded, record("fast", "transient", 1.0))
        stats.event_finished(outcome="answered", latency_s=1.1, call=degraded)
    stats.event_finished(outcome="dead_letter", latency_s=0.0, error_type="poison.json")
    stats.breaker_changed("fast", "open" if failed_calls else "closed")
    return stats


def test_replicas_merge_into_sums_and_the_worst_breaker_state() -> None:
    a, b = replica("a", ok_calls=30, failed_calls=10), replica("b", ok_calls=50, failed_calls=0)
    wire = [ServiceStats.from_dict(json.loads(json.dumps(s.to_dict()))) for s in (a, b)]  # as over NATS
    total = combine(wire)
    assert total.replicas == 2
    assert total.answered == 90 and total.degraded == 10 and total.dead_letters == {"poison.json": 2}
    fast = total.models["fast"]
    assert (fast.calls, fast.ok, dict(fast.errors)) == (90, 80, {"transient": 10})
    assert fast.input_tokens == 8000 and abs(fast.cost_usd - 0.08) < 1e-9 and fast.priced_calls == 80
    assert total.fallbacks == 10 and total.fell_back == 10
    assert total.breakers == {"fast": "open"}
    assert 200 <= (fast.latency.percentile(0.5) or 0) <= 210
    assert (fast.latency.percentile(0.95) or 0) >= 1000


def test_the_report_prints_each_replica_then_the_sum_against_the_budget() -> None:
    a, b = replica("aaa", ok_calls=3, failed_calls=1), replica("bbb", ok_calls=5, failed_calls=0)
    buffer = io.StringIO()
    render([a, b], Console(file=buffer, width=200), budget_usd=0.02)
    text = buffer.getvalue()
    assert "replica aaa" in text and "replica bbb" in text and "combined: 2 replicas" in text
    combined = text.split("combined:")[1]
    assert "$0.008 of $0.02 budget (40.0%)" in combined
    assert "9 answered" in combined and "1 degraded" in combined


def test_log_lines_mask_secret_fields_and_known_secrets() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("info", "json", ["sk-known-secret-123"], stream=stream)
    try:
        log = structlog.get_logger("t")
        log.info("calling", api_key="abc-unknown", nats_token="t0ken", input_tokens=12, detail="sk-known-secret-123!")
        logging.getLogger("foreign").warning("stdlib line with sk-known-secret-123")
    finally:
        root.handlers[:], root.level = handlers, level
        structlog.reset_defaults()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["api_key"] == "***" and first["nats_token"] == "***"
    assert first["input_tokens"] == 12 and first["detail"] == "***!"
    assert "sk-known-secret-123" not in second["event"] and "stdlib line with ***" in second["event"]


def test_otlp_header_values_are_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20collector-token-xyz,x-team=abc123")
    secrets = Settings(nats_url="nats://127.0.0.1:1").secrets()
    assert "collector-token-xyz" in secrets and "Bearer collector-token-xyz" in secrets and "abc123" in secrets


def test_the_tokens_and_cost_of_failed_calls_are_counted_and_shown_beside_the_total() -> None:
    """A call that failed after a response (invalid output) cost tokens: they count in the totals, and the report
    says how much of the cost went on failed calls; replicas merge it."""
    stats = ServiceStats(replica="a", started_at=1.0)
    call = Call(event=None)
    stats.attempt_finished(call, record("fast", "ok", 0.2, cost=0.001))
    invalid = AttemptRecord(
        candidate="fast",
        model="openai:fast",
        route="default",
        attempt=1,
        delivery=1,
        outcome="permanent",
        latency_s=0.5,
        usage=Usage(input_tokens=300, output_tokens=60, requests=2),
        cost_usd=0.003,
    )
    stats.attempt_finished(call, invalid)
    wire = ServiceStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    total = combine([wire, ServiceStats.from_dict(stats.to_dict())])
    fast = total.models["fast"]
    assert (fast.input_tokens, fast.failed_input_tokens, fast.failed_output_tokens) == (800, 600, 120)
    assert total.cost_usd == pytest.approx(0.008) and total.failed_cost_usd == pytest.approx(0.006)
    buffer = io.StringIO()
    render([stats], Console(file=buffer, width=200), budget_usd=None)
    assert "of which $0.003 on failed calls" in buffer.getvalue()


def test_a_cost_no_price_is_known_for_is_unknown_not_zero() -> None:
    """Model calls without any known price: the report's cost line says unknown rather than $0."""
    stats = ServiceStats(replica="a", started_at=1.0)
    stats.attempt_finished(Call(event=None), record("local", "ok", 0.2, cost=None))
    buffer = io.StringIO()
    render([stats], Console(file=buffer, width=200), budget_usd=None)
    assert "cost: unknown (no price known for these models)" in buffer.getvalue()


def test_at_80_columns_every_name_and_figure_is_printed_whole() -> None:
    """Names too long for the table at 80 columns: each model gets a line of words instead, wrapped between
    words, so no name is cut ("smol-nati…") and every figure is there."""
    stats = ServiceStats(replica="a", started_at=1.0, handler="refund-extraction-for-emails")
    names = {"smol-native-json-schema": "openai-chat:SmolLM2-135M-Instruct-Q8_0", "openai-chat-backup": "openai:gpt-4o"}
    for name, model in names.items():
        stats.attempt_finished(Call(event=None), dataclasses.replace(record(name, "ok", 0.3), model=model))
    stats.breaker_changed("refund-extraction-for-emails/smol-native-json-schema", "open")
    buffer = io.StringIO()
    render([stats], Console(file=buffer, width=80), budget_usd=None)
    text = buffer.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    words = {word.strip("(),:;") for word in text.split()}
    assert set(names) | set(names.values()) | {"refund-extraction-for-emails/smol-native-json-schema"} <= words
    assert "$0.001 per call" in text and "all models" in text

    wide = io.StringIO()
    render([stats], Console(file=wide, width=200), budget_usd=None)
    assert "p50/p95/p99 ms" in wide.getvalue()  # wide enough: the table


def test_commands_reading_few_settings_ignore_bad_values_of_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """`stanchion report` reads the connection and the budget: a bad STANCHION_MAX_IN_FLIGHT leaves it unmoved (at
    its default), while a bad value it reads still stops it, naming the variable."""
    monkeypatch.setenv("STANCHION_MAX_IN_FLIGHT", "abc")
    monkeypatch.setenv("STANCHION_NAK_BACKOFF_S", "soon")
    settings = load_settings(NATS_CONNECTION | {"budget_usd"})
    assert settings.max_in_flight == 16 and settings.nak_backoff_s == (2.0, 10.0, 30.0, 60.0)
    with pytest.raises(ConfigError, match="STANCHION_MAX_IN_FLIGHT"):
        load_settings()
    monkeypatch.setenv("STANCHION_BUDGET_USD", "lots")
    with pytest.raises(ConfigError, match="STANCHION_BUDGET_USD"):
        load_settings(NATS_CONNECTION | {"budget_usd"})
