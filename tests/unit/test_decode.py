"""Decoder: bytes to any event model, or the poison reason; the event id read by field name or function."""

from __future__ import annotations

from pydantic import BaseModel, Field

from stanchion.handlers.runtime.dead_letters import DeadLetters
from stanchion.handlers.runtime.decode import Decoder, Poison, id_field


class Email(BaseModel):
    id: str
    body: str = Field(min_length=1)


class Keyed(BaseModel):
    ref: int
    text: str


def test_a_valid_payload_becomes_the_event() -> None:
    decode = Decoder(Email, id_field(), 1024)
    event = decode(b'{"id": "e1", "body": "hello"}')
    assert event == Email(id="e1", body="hello")
    assert decode.id_of(b'{"id": "e1", "body": "hello"}') == "e1"


def test_each_kind_of_poison_is_named_with_a_reason() -> None:
    """Too large, empty, not UTF-8, not JSON, not the model: each its own error type and a readable reason."""
    decode = Decoder(Email, id_field(), 64)
    cases = {
        b"x" * 65: "poison.too_large",
        b"  ": "poison.empty",
        b"\xff\xfe": "poison.encoding",
        b"{nope": "poison.json",
        b'{"id": "e2"}': "poison.schema",
    }
    for data, error_type in cases.items():
        poison = decode(data)
        assert isinstance(poison, Poison) and poison.error_type == error_type, data
        assert poison.reason
    schema = decode(b'{"id": "e2"}')
    assert isinstance(schema, Poison) and "not a Email" in schema.reason and "body" in schema.reason
    assert schema.event_id == "e2"


def test_the_id_may_come_from_any_field_or_function() -> None:
    """An event without an ``id`` field is keyed by the function the handler gives."""
    by_field = Decoder(Keyed, id_field("ref"), 1024)
    by_function = Decoder(Keyed, lambda e: f"k-{e.ref}", 1024)
    data = b'{"ref": 7, "text": "t"}'
    assert by_field.id_of(data) == "7"
    assert by_function.id_of(data) == "k-7"


def test_an_id_function_that_fails_or_gives_nothing_is_poison() -> None:
    empty = Decoder(Keyed, lambda e: "", 1024)(b'{"ref": 1, "text": "t"}')
    failing = Decoder(Keyed, lambda e: e.missing, 1024)(b'{"ref": 1, "text": "t"}')
    assert isinstance(empty, Poison) and empty.error_type == "poison.id"
    assert isinstance(failing, Poison) and failing.error_type == "poison.id" and "AttributeError" in failing.reason


def test_ids_that_cannot_survive_a_header_or_json_are_poison() -> None:
    """CR, LF, NUL and other control characters, a lone surrogate, an over-long id: ``poison.id`` with the reason."""
    decode = Decoder(Email, id_field(), 64 * 1024)
    cases = {
        '"a\\nb"': "control character ('\\n') at 1",
        '"a\\rb"': "control character ('\\r') at 1",
        '"nul\\u0000"': "control character ('\\x00') at 3",
        '"sur-\\ud800"': "lone surrogate at 4",
        '"' + "x" * 10_000 + '"': "10000 characters long",
    }
    for raw_id, reason in cases.items():
        poison = decode(f'{{"id": {raw_id}, "body": "hello"}}'.encode())
        assert isinstance(poison, Poison) and poison.error_type == "poison.id", raw_id
        assert reason in poison.reason and poison.event_id is None
    assert decode(b'{"id": "a b", "body": "hello"}') == Email(id="a b", body="hello")


def test_a_dead_letter_always_serialises_even_with_a_lone_surrogate_in_its_texts() -> None:
    """Exception texts may carry lone surrogates: the dead letter escapes them instead of failing to serialise."""
    dead = DeadLetters("h", str).build(
        b"{}", subject="s", error_type="internal", reason="bad \ud800 text", errors=["cause \udfff"], event_id="e"
    )
    body = dead.model_dump_json()
    assert "bad \\\\ud800 text" in body and "cause \\\\udfff" in body
