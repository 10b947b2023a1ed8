"""The policy: the default model-selection matrix, profiles, and validation of policy files."""

from __future__ import annotations

from pathlib import Path

import pytest

from stanchion.handlers.errors import ConfigError
from stanchion.handlers.policy import default_policy, load_policy
from stanchion.handlers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def settings(**values: object) -> Settings:
    """Settings from these values only: explicit values win over whatever the environment holds."""
    unset = {"openai_api_key": None, "anthropic_api_key": None, "openai_base_url": None, "profile": "auto"}
    return Settings.model_validate({"nats_url": "nats://127.0.0.1:1", **unset, **values})


def test_production_profile_routes_simple_to_fast_and_complex_to_strong_with_a_backup() -> None:
    """With both keys: simple events try fast then backup, complex ones strong then backup then fast."""
    policy = default_policy(settings(openai_api_key="sk-a", anthropic_api_key="sk-b"))
    assert [m.name for m in policy.models] == ["fast", "strong", "backup"]
    assert policy.routes["default"].models == ["fast", "backup"]
    assert policy.routes["complex"].models == ["strong", "backup", "fast"]
    assert all(route.heuristic for route in policy.routes.values())
    [rule] = policy.rules
    assert (rule.route, rule.kinds, rule.min_text_length) == ("complex", ["complex"], 600)


def test_local_profile_uses_ollama_when_no_key_is_set() -> None:
    """Without keys the local profile sends every event to the Ollama model, in native JSON output mode."""
    policy = default_policy(settings(ollama_base_url="http://127.0.0.1:11434/v1"))
    [model] = policy.models
    assert (model.name, model.provider, model.output_mode) == ("local", "ollama", "native")
    assert model.base_url == "http://127.0.0.1:11434/v1"
    assert policy.routes["default"].models == policy.routes["complex"].models == ["local"]


def test_an_explicit_local_profile_ignores_keys() -> None:
    """STANCHION_PROFILE=local picks the local model even when a key is set."""
    policy = default_policy(settings(profile="local", openai_api_key="sk-a"))
    assert [m.name for m in policy.models] == ["local"]


def test_openai_base_url_is_respected() -> None:
    """OPENAI_BASE_URL points the OpenAI candidates at any compatible server."""
    policy = default_policy(settings(openai_api_key="sk-a", openai_base_url="http://127.0.0.1:8000/v1"))
    assert {m.base_url for m in policy.models} == {"http://127.0.0.1:8000/v1"}


def test_the_readme_example_policy_loads() -> None:
    """examples/policy.toml (the README's example) is a valid policy."""
    policy = load_policy(ROOT / "examples/policy.toml")
    assert [(m.name, m.output_mode) for m in policy.models] == [("primary", "tool"), ("backup", "native")]
    assert policy.routes["default"].models == ["primary", "backup"]


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
