"""The policy: the default model-selection matrix, profiles, and validation of policy files."""

from __future__ import annotations

from pathlib import Path

import pytest

from stanchion.handlers.classify.policy import PREDICATES, default_policy, load_classifier_policy
from stanchion.handlers.errors import ConfigError
from stanchion.handlers.policy import Policy, load_policy
from stanchion.handlers.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def settings(**values: object) -> Settings:
    """Settings from these values only: explicit values win over whatever the environment holds."""
    unset = {"openai_api_key": None, "anthropic_api_key": None, "openai_base_url": None, "profile": "auto"}
    return Settings.model_validate({"nats_url": "nats://127.0.0.1:1", **unset, **values})


def test_production_profile_routes_simple_to_fast_and_complex_to_strong_with_a_backup() -> None:
    """With both keys: simple events try fast then backup, complex ones strong then backup then fast."""
    policy = default_policy(settings(openai_api_key="sk-a", anthropic_api_key="sk-b"))
    assert [m.name for m in policy.models] == ["fast", "strong", "backup"]
    assert policy.routes is not None
    assert policy.routes["default"].models == ["fast", "backup"]
    assert policy.routes["complex"].models == ["strong", "backup", "fast"]
    assert policy.routes is not None and all(route.heuristic for route in policy.routes.values())
    assert policy.rules is not None
    [rule] = policy.rules
    assert (rule.route, rule.predicate) == ("complex", "complex")
    assert rule.predicate in PREDICATES


def test_local_profile_uses_ollama_when_no_key_is_set() -> None:
    """Without keys the local profile sends every event to the Ollama model, in native JSON output mode."""
    policy = default_policy(settings(ollama_base_url="http://127.0.0.1:11434/v1"))
    [model] = policy.models
    assert (model.name, model.provider, model.output_mode) == ("local", "ollama", "native")
    assert model.base_url == "http://127.0.0.1:11434/v1"
    assert policy.routes is not None
    assert policy.routes["default"].models == policy.routes["complex"].models == ["local"]


def test_an_explicit_local_profile_ignores_keys() -> None:
    """STANCHION_PROFILE=local picks the local model even when a key is set."""
    policy = default_policy(settings(profile="local", openai_api_key="sk-a"))
    assert [m.name for m in policy.models] == ["local"]


def test_openai_base_url_is_respected() -> None:
    """OPENAI_BASE_URL points the OpenAI candidates at any compatible server."""
    policy = default_policy(settings(openai_api_key="sk-a", openai_base_url="http://127.0.0.1:8000/v1"))
    assert {m.base_url for m in policy.models} == {"http://127.0.0.1:8000/v1"}


@pytest.mark.parametrize("mode", ["tool", "native", "prompted"])
def test_stanchion_output_mode_sets_the_output_mode_of_every_default_model(mode: str) -> None:
    """STANCHION_OUTPUT_MODE chooses the default policy's output mode, for the cloud and the local profile alike."""
    for values in ({"openai_api_key": "sk-a", "anthropic_api_key": "sk-b"}, {"profile": "local"}):
        policy = default_policy(settings(output_mode=mode, **values))
        assert {m.output_mode for m in policy.models} == {mode}
    assert {m.output_mode for m in default_policy(settings(openai_api_key="sk-a")).models} == {"tool"}


def test_the_readme_example_policy_loads() -> None:
    """examples/policy.toml (the README's example) is a valid policy."""
    policy = load_policy(ROOT / "examples/policy.toml")
    assert [(m.name, m.output_mode) for m in policy.models] == [("primary", "tool"), ("backup", "native")]
    assert policy.section(None).routes["default"].models == ["primary", "backup"]


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ('[[models]]\nname = "a"\nmodel = "openai-chat:m"\noutput_mode = "json"\n', "models.0.output_mode"),
        ('[[models]]\nname = "a"\nmodel = "gpt-4o"\n', "provider:model"),
        ('[routes.default]\nmodels = ["ghost"]\n', "ghost"),
        ('[[rules]]\nroute = "nowhere"\n', "nowhere"),
        ("[routes.default]\nretry = { attempts = 0 }\n", "routes.default.retry.attempts"),
        ("[breaker]\nmin_calls = 30\nwindow = 10\n", "min_calls"),
        ("[routes.default]\nmodels = [\n", "not valid TOML"),
        ("unknown_key = 1\n", "unknown_key"),
        ("", "defines no [[models]]"),
        ("[routes.default]\nmodels = []\n", "defines no [[models]]"),
        (
            '[[models]]\nname = "a"\nmodel = "openai-chat:m"\n[[models]]\nname = "a"\nmodel = "openai-chat:n"\n',
            "duplicate",
        ),
    ],
)
def test_a_bad_policy_file_is_refused_naming_the_key(toml: str, names: str, tmp_path: Path) -> None:
    """Each mistake in a policy file raises ConfigError on one line naming the file and the key."""
    path = tmp_path / "policy.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as raised:
        load_policy(path)
    message = str(raised.value)
    assert "STANCHION_POLICY" in message and names in message
    assert "\n" not in message


POLICY_WITH_SECTIONS = """
[[models]]
name = "primary"
model = "openai-chat:m"
base_url = "http://127.0.0.1:9/v1"
base_url_env = "TEST_PRIMARY_URL"

[[models]]
name = "backup"
model = "openai-chat:n"

[routes.default]
models = ["backup"]

[handlers.refund]
deadline_s = 12

[handlers.refund.routes.default]
models = ["primary", "backup"]
heuristic = false
retry = { attempts = 1 }
"""


def test_a_handler_section_overrides_the_top_level_for_that_handler_only(tmp_path: Path) -> None:
    """``[handlers.refund]`` gives refund its own routes and deadline; any other handler reads the top level."""
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_WITH_SECTIONS)
    policy = load_policy(path)
    refund, other = policy.section("refund"), policy.section("classify")
    assert refund.routes["default"].models == ["primary", "backup"]
    assert not refund.routes["default"].heuristic and refund.routes["default"].retry.attempts == 1
    assert refund.deadline_s == 12
    assert other.routes["default"].models == ["backup"] and other.deadline_s is None


def test_without_routes_every_model_is_tried_in_the_file_order() -> None:
    """A policy that lists models and no routes has one route trying each model in turn, then the heuristic."""
    policy = Policy.model_validate(
        {"models": [{"name": "a", "model": "openai-chat:m"}, {"name": "b", "model": "openai-chat:n"}]}
    )
    default = policy.section(None).routes["default"]
    assert (default.models, default.heuristic) == (["a", "b"], True)


def test_a_base_url_may_come_from_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``base_url_env`` wins over ``base_url`` when that variable is set and not empty."""
    model = Policy.model_validate(
        {"models": [{"name": "a", "model": "openai-chat:m", "base_url": "http://a/v1", "base_url_env": "TEST_A_URL"}]}
    ).models[0]
    monkeypatch.delenv("TEST_A_URL", raising=False)
    assert model.resolved_base_url() == "http://a/v1"
    monkeypatch.setenv("TEST_A_URL", "http://127.0.0.1:7/v1")
    assert model.resolved_base_url() == "http://127.0.0.1:7/v1"


def test_a_handler_section_naming_an_unknown_model_is_refused(tmp_path: Path) -> None:
    """Model names in a handler's routes are checked like the top level's, and the error names the section."""
    path = tmp_path / "policy.toml"
    path.write_text('[handlers.refund.routes.default]\nmodels = ["ghost"]\n')
    with pytest.raises(ConfigError, match=r"handlers\.refund\.routes\.default\.models .*ghost"):
        load_policy(path)


def test_older_classifier_rules_become_predicates(tmp_path: Path) -> None:
    """``[[rules]]`` with ``kinds`` / ``min_text_length`` (today's files) still route the classifier's events."""
    from stanchion.contracts import TaskEvent

    path = tmp_path / "policy.toml"
    path.write_text(
        '[[models]]\nname = "m"\nmodel = "openai-chat:m"\n'
        "[routes.default]\nmodels = []\n[routes.slow]\nmodels = []\n"
        '[[rules]]\nroute = "slow"\nkinds = ["degrade"]\nmin_text_length = 50\n'
    )
    policy, predicates = load_classifier_policy(path)
    assert policy.rules is not None
    [rule] = policy.rules
    when = predicates[rule.predicate]
    assert when(TaskEvent(id="1", text="x", kind="degrade")) == "kind is degrade"
    assert when(TaskEvent(id="2", text="y" * 50)) == "text length 50 >= 50"
    assert not when(TaskEvent(id="3", text="short"))


@pytest.mark.parametrize(
    ("value", "delays"),
    [("5", (5.0,)), ("2,10,30", (2.0, 10.0, 30.0)), ("2 10", (2.0, 10.0)), ("[1, 2.5]", (1.0, 2.5))],
)
def test_the_nak_backoff_takes_one_number_a_list_or_json(
    value: str, delays: tuple[float, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """STANCHION_NAK_BACKOFF_S reads as people write it: ``5``, ``2,10,30`` or ``[2, 10, 30]``."""
    monkeypatch.setenv("STANCHION_NAK_BACKOFF_S", value)
    assert load_settings().nak_backoff_s == delays


def test_a_bad_nak_backoff_names_the_setting_and_the_expected_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANCHION_NAK_BACKOFF_S", "soon")
    with pytest.raises(ConfigError, match=r"STANCHION_NAK_BACKOFF_S: expected seconds by delivery, like 2,10,30,60"):
        load_settings()


def test_a_probe_lease_in_the_policy_reaches_the_breaker_and_a_short_one_is_warned_about_when_shared() -> None:
    """breaker.probe_lease_s sets how long a half-open probe holds its slot; with a shared store a lease shorter
    than the attempt timeout is a start-up warning naming the model."""
    import structlog.testing

    from stanchion.handlers.models.stack import breaker_policy, build_stack
    from stanchion.handlers.nats.breakers import KeyValueBreakerStore
    from stanchion.middleware import Candidate

    policy = Policy.model_validate(
        {"models": [{"name": "m", "model": "openai-chat:x", "breaker": {"open_s": 30, "probe_lease_s": 5}}]}
    )
    config = policy.models[0].breaker
    assert config is not None and breaker_policy(config).lease == 5

    # A shared store, never started (nothing here talks to NATS).
    store = KeyValueBreakerStore(lambda: NotImplemented, "unused")

    async def terminal(call: object) -> str:
        return "ok"

    with structlog.testing.capture_logs() as logs:
        build_stack(policy.section(None), terminal, {"m": Candidate("m")}, attempt_timeout_s=20, breaker_store=store)
    [warning] = [e for e in logs if "outlive its lease" in e["event"]]
    assert warning["candidate"] == "m" and warning["lease_s"] == 5
