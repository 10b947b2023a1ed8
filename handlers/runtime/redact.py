"""Keeps secrets out of logs, spans and dead letters."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|sk-ant-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,})")
_KEY_PREFIXES = ("sk-", "Bearer")  # every match of _KEY_LIKE contains one of these


SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_PASSWORD", "_SECRET")


def environment_secrets(environ: Iterable[tuple[str, str]] | None = None) -> list[str]:
    """Values of every variable whose name says it is a secret (``*_API_KEY``, ``*_TOKEN``...), for redaction."""
    items = environ if environ is not None else os.environ.items()
    return [value for name, value in items if name.upper().endswith(SECRET_SUFFIXES) and value]


class Redactor:
    """Replaces every known secret, and anything shaped like an API key, with ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        # Whatever is masked below holds a secret's first four characters or one of the key shapes' literal
        # prefixes: one search for those literals lets most texts (which hold none) pass unchanged.
        literals = {secret[:4] for secret in self.secrets} | set(_KEY_PREFIXES)
        self._suspect = re.compile("|".join(sorted(map(re.escape, literals))))

    def __call__(self, text: str) -> str:
        if self._suspect.search(text) is None:
            return text
        for secret in self.secrets:
            text = text.replace(secret, "***")
            # A secret cut off by a truncation upstream leaves a prefix at the very end: mask that too.
            tail_start = max(0, len(text) - len(secret) + 1)
            start = text.find(secret[:4], tail_start)
            while start != -1:
                if secret.startswith(text[start:]):
                    text = text[:start] + "***"
                    break
                start = text.find(secret[:4], start + 1)
        return _KEY_LIKE.sub("***", text)
