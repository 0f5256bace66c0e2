"""Redaction: secret-looking config entries before a config is logged anywhere (wandb, files, console), and
the text of prompts and responses in the rows a run writes when ``logging.redact_text`` is on."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"

# A key is secret-looking when one of its words (split on non-alphanumerics and camelCase) is one of these,
# or when the key squashed to lowercase letters ends with one ("HFToken", "apikey"). Whole-word matching keeps
# ``max_new_tokens``, ``tokenizer`` and ``num_keys`` visible while catching ``hf_token``, ``api_key``, ``apiKey``,
# ``WANDB_API_KEY``, ``aws_secret_access_key``, ``db_password``.
SECRET_WORDS = frozenset({"token", "key", "apikey", "secret", "password", "passwd", "credential", "credentials"})


def is_secret_key(key: object) -> bool:
    """True when a config key looks like it holds a credential."""
    text = str(key)
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text).lower())
    if any(word in SECRET_WORDS for word in words):
        return True
    squashed = re.sub(r"[^a-z0-9]", "", text.lower())
    return any(squashed.endswith(word) for word in SECRET_WORDS)


def redact(config: Any) -> Any:
    """A copy of ``config`` (nested mappings, lists, tuples) with secret-looking keys' values replaced.

    The input is never modified. Values of secret keys become :data:`REDACTED` (``None`` stays ``None`` so
    "not set" is still visible); everything else is copied through unchanged.
    """
    if isinstance(config, Mapping):
        return {
            key: (value if value is None else REDACTED) if is_secret_key(key) else redact(value)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [redact(item) for item in config]
    if isinstance(config, tuple):
        return tuple(redact(item) for item in config)
    return config


def redact_argv(argv: list[str]) -> list[str]:
    """A copy of a command line with secret-looking options' values replaced.

    Handles ``--hf-token=VALUE``, ``--hf-token VALUE`` and ``key=value`` overrides (``trainer.api_key=VALUE``).
    wandb stores ``sys.argv`` in every run's metadata, so this is applied while a run starts.
    """
    out: list[str] = []
    redact_next = False
    for arg in argv:
        if redact_next and not arg.startswith("-"):
            out.append(REDACTED)
            redact_next = False
            continue
        redact_next = False
        name, eq, _ = arg.lstrip("-").partition("=")
        if name and is_secret_key(name) and (eq or arg.startswith("-")):
            if eq:
                out.append(arg[: len(arg) - len(arg.lstrip("-"))] + name + "=" + REDACTED)
            else:
                out.append(arg)
                redact_next = True
            continue
        out.append(arg)
    return out


# what can carry patient data in a sample or prediction row: the texts, the gold answer, the images' paths and
# what was extracted from a response
TEXT_FIELDS = frozenset({"prompt", "response", "answer", "images", "extracted", "messages", "target"})


def without_text(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` without its :data:`TEXT_FIELDS` (ids, scores, rewards, lengths and finish reasons stay)."""
    return {k: v for k, v in row.items() if k not in TEXT_FIELDS}
