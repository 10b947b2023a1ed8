"""Property-based fuzzing of what publishers may send: every input gets exactly one result or one dead letter."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stanchion.contracts import DeadLetter, TaskEvent
from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.runtime.dead_letters import MAX_DEAD_PAYLOAD
from stanchion.handlers.runtime.decode import id_problem
from tests.conftest import RunningService, policy_for, running_service
from tests.fake_openai import FakeOpenAI

MAX_PAYLOAD = 8192
"""STANCHION_MAX_PAYLOAD_BYTES for these tests: small, so over-large payloads stay cheap to generate."""

QUIET_S = 0.2
"""How long to keep listening once every input is accounted for, so a second answer would be seen."""

# Bytes that never occur in UTF-8, wherever they stand.
NEVER_UTF8 = [bytes([b]) for b in (0xC0, 0xC1, *range(0xF5, 0x100))]


@dataclass(frozen=True)
class Valid:
    """A valid TaskEvent; its id is given when it is published, so ids are unique across examples."""

    text: str
    kind: str


@dataclass(frozen=True)
class Poison:
    """Bytes the service must dead-letter, with the error type and event id the dead letter must carry."""

    data: bytes
    error_type: str
    event_id: str | None = None


Input = Valid | Poison


def _is_event(raw: object) -> bool:
    try:
        TaskEvent.model_validate(raw)
    except ValidationError:
        return False
    return True


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _unredacted(data: bytes) -> bool:
    # Dead letters redact key-shaped text (sk-..., Bearer ...); keep such text out so payloads compare exactly.
    return b"sk-" not in data and b"Bearer" not in data


def _schema(raws: st.SearchStrategy[Any]) -> st.SearchStrategy[Poison]:
    """JSON the contract refuses, serialised as ASCII or as raw UTF-8; the dead letter keeps a usable string id."""

    def poison(raw: Any, ascii: bool) -> Poison:
        event_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
        if id_problem(event_id) is not None:
            event_id = None  # an id that cannot travel (control characters, lone surrogates) is not kept
        return Poison(json.dumps(raw, ensure_ascii=ascii).encode(), "poison.schema", event_id)

    return st.builds(poison, raws, st.booleans())


scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64) | st.floats() | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
event_fields = ("schema_version", "id", "text", "source", "kind", "created_at", "deadline_ms")
junk_keys = st.text(max_size=10).filter(lambda k: k not in event_fields)

empty = st.text(alphabet=" \t\r\n\x0b\x0c", max_size=40).map(lambda s: Poison(s.encode(), "poison.empty"))
not_utf8 = st.builds(
    lambda head, bad, tail: Poison(head + bad + tail, "poison.encoding"),
    st.binary(max_size=300),
    st.sampled_from(NEVER_UTF8),
    st.binary(max_size=300),
)
not_json = st.one_of(
    st.text(min_size=1, max_size=300).filter(lambda t: bool(t.encode().strip()) and not _parses(t)),
    # A proper prefix of a JSON object never parses.
    st.builds(
        lambda raw, cut: json.dumps(raw)[: max(1, int(len(json.dumps(raw)) * cut))],
        st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=4),
        st.floats(0, 0.99),
    ),
).map(lambda t: Poison(t.encode(), "poison.json"))
not_an_object = _schema(st.one_of(scalars, st.lists(json_values, max_size=5)))
wrong_types = _schema(
    st.builds(
        lambda field, value, text: {"id": "fuzz-wrong-type", "text": text, field: value},
        st.sampled_from(event_fields),
        json_values | st.text(min_size=51, max_size=300),
        st.text(min_size=1, max_size=100).filter(str.strip),
    ).filter(lambda raw: not _is_event(raw))
)
missing_fields = _schema(
    st.builds(
        lambda known, junk: {**junk, **known},
        st.fixed_dictionaries(
            {},
            optional={
                "id": st.text(max_size=20),
                "text": st.text(max_size=60),
                "source": st.text(max_size=20),
                "kind": st.sampled_from(["simple", "complex"]),
            },
        ),
        st.dictionaries(junk_keys, json_values, max_size=3),
    ).filter(lambda raw: not _is_event(raw))
)
too_large = st.builds(
    lambda size, fill, head: Poison((head + fill * size)[:size], "poison.too_large"),
    st.integers(min_value=MAX_PAYLOAD + 1, max_value=3 * MAX_PAYLOAD),
    st.sampled_from([b"x", b" ", b"\xff", b"{", b"\xc3\xa9"]),
    st.sampled_from([b"", b'{"id": "fuzz-big", "text": "']),
)
poison = st.one_of(empty, not_utf8, not_json, not_an_object, wrong_types, missing_fields, too_large).filter(
    lambda p: _unredacted(p.data) and (len(p.data) <= MAX_PAYLOAD) == (p.error_type != "poison.too_large")
)
valid = st.builds(Valid, st.text(min_size=1, max_size=200).filter(str.strip), st.sampled_from(["simple", "complex"]))
batches = st.lists(st.one_of(valid, poison), min_size=1, max_size=30)

ONE_OF_EACH: list[Input] = [
    Valid("the export button crashes", "simple"),
    Poison(b"", "poison.empty"),
    Poison(b" \r\n", "poison.empty"),
    Poison(b"\xff\xfe\x00garbage", "poison.encoding"),
    Poison(b"{not json", "poison.json"),
    Valid("please add SSO", "complex"),
    Poison(b"[1, 2, 3]", "poison.schema"),
    Poison(b'"just a string"', "poison.schema"),
    Poison(b"null", "poison.schema"),
    Poison(b'{"id": "fuzz-missing-text"}', "poison.schema", "fuzz-missing-text"),
    Poison(b'{"id": 7, "text": "id is a number"}', "poison.schema"),
    Poison(b'{"id": "fuzz-bad-deadline", "text": "t", "deadline_ms": -1}', "poison.schema", "fuzz-bad-deadline"),
    Poison(b"x" * (MAX_PAYLOAD + 1), "poison.too_large"),
    Valid("how do I rotate keys?", "simple"),
]


def _bytes_of(dead: DeadLetter) -> bytes:
    return base64.b64decode(dead.payload) if dead.payload_encoding == "base64" else dead.payload.encode()


def _readable(reason: str) -> bool:
    return bool(reason.strip()) and reason.isprintable() and len(reason) < 2000


async def _exchange(svc: RunningService, batch: list[Input], ids: Iterator[str]) -> None:
    """Publish one batch, wait until every input is accounted for, and check each was answered exactly once."""
    collector = svc.collector
    first_result, first_dead = len(collector.results), len(collector.dead)
    valid_ids: list[str] = []
    expected: Counter[tuple[bytes, bool, str, str | None]] = Counter()
    for item in batch:
        if isinstance(item, Valid):
            valid_ids.append(next(ids))
            await svc.publish({"id": valid_ids[-1], "text": item.text, "kind": item.kind})
        else:
            kept, truncated = item.data[:MAX_DEAD_PAYLOAD], len(item.data) > MAX_DEAD_PAYLOAD
            expected[(kept, truncated, item.error_type, item.event_id)] += 1
            await svc.publish(item.data)
    with contextlib.suppress(TimeoutError):  # the comparisons below say what is missing
        await collector.wait_for(results=first_result + len(valid_ids), dead=first_dead + expected.total(), timeout=15)
    await asyncio.sleep(QUIET_S)
    answered = Counter(r["event_id"] for r in collector.results[first_result:])
    assert answered == Counter(valid_ids), (
        f"missing {Counter(valid_ids) - answered}, extra {answered - Counter(valid_ids)}"
    )
    dead = [DeadLetter.model_validate(d) for d in collector.dead[first_dead:]]
    got = Counter((_bytes_of(d), d.payload_truncated, d.error_type, d.event_id) for d in dead)
    assert got == expected, f"not dead-lettered: {expected - got}; unexpected: {got - expected}"
    assert all(_readable(d.reason) for d in dead), [d.reason for d in dead if not _readable(d.reason)]
    assert all(d.error_type.startswith("poison.") for d in dead)
    assert all(d.subject == svc.settings.input_subject and d.deliveries == 1 for d in dead)


@dataclass
class Fuzzed:
    """One service (model: a fake OpenAI server) shared by every example, and the ids given to valid events."""

    svc: RunningService
    provider: FakeOpenAI
    ids: Iterator[str]


@pytest_asyncio.fixture(scope="module")
async def fuzzed(nats_server: EmbeddedNats) -> AsyncIterator[Fuzzed]:
    """The service under fuzz, with a small payload limit; max_deliver=1, so a handler crash is dead-lettered at once
    (as "internal") instead of being retried for half a minute."""
    run = uuid.uuid4().hex[:8]
    with FakeOpenAI() as provider:
        policy = policy_for(("primary", provider))
        async with running_service(nats_server.url, policy, max_payload_bytes=MAX_PAYLOAD, max_deliver=1) as svc:
            yield Fuzzed(svc, provider, (f"fuzz-{run}-{n}" for n in itertools.count()))


# No shrinking: it would replay batches against a service that already answered earlier ones; report as found.
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example),
)
@example(batch=ONE_OF_EACH)
@given(batch=batches)
async def test_every_fuzzed_payload_becomes_one_dead_letter_while_valid_events_are_answered(
    fuzzed: Fuzzed, batch: list[Input]
) -> None:
    """Poison of every kind interleaved with valid events: one readable poison dead letter per poison payload, one
    result per valid event, nothing twice, from one service that keeps answering throughout."""
    requests = fuzzed.provider.count
    await _exchange(fuzzed.svc, batch, fuzzed.ids)
    assert fuzzed.provider.count - requests == sum(isinstance(i, Valid) for i in batch)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"[" * 3000 + b"]" * 3000, id="deeply-nested-arrays"),
        pytest.param(b'{"a":' * 1500 + b"1" + b"}" * 1500, id="deeply-nested-objects"),
        pytest.param(b"1" * 5000, id="integer-beyond-python-digit-limit"),
        pytest.param(
            b'{"id": "fuzz-long-int", "text": "t", "deadline_ms": 1' + b"0" * 5000 + b"}", id="long-int-field"
        ),
    ],
)
async def test_json_that_python_refuses_to_parse_is_poison_not_an_internal_error(
    nats_server: EmbeddedNats, payload: bytes
) -> None:
    """Well-formed but pathological JSON (deep nesting, over-long integers) under the size limit is one poison
    dead letter on its first delivery, not a handler crash."""
    async with running_service(nats_server.url, policy_for(), max_payload_bytes=4 * MAX_PAYLOAD, max_deliver=1) as svc:
        await svc.publish(payload)
        await svc.publish({"id": f"after-{uuid.uuid4().hex[:8]}", "text": "how do I rotate keys?"})
        await svc.collector.wait_for(results=1, dead=1, timeout=15)
    [dead] = [DeadLetter.model_validate(d) for d in svc.collector.dead]
    assert dead.error_type.startswith("poison."), (dead.error_type, dead.reason)
    assert _readable(dead.reason)
    assert _bytes_of(dead) == payload
