"""Credentials never leave the process that was given them: not in MLflow params or tags, not on
the console or in logs, not in Prefect flow-run parameters, not in error messages.

`redact(text)` hides what looks like a credential: the password in `scheme://user:password@`
(and in `user:password@` inside a path), and the values of query parameters such as `token`,
`password`, `key`, `secret` or `signature`. Whatever is shown or stored goes through it.

A redacted config still has to reach the store in-process: `register(real)` remembers the real
value under its redacted form and `reveal(value)` gives it back. That covers child flows run in
the same process; with `dispatch: deployments` a worker cannot know a secret the parent held,
so credentials must come from the worker's environment (MLFLOW_TRACKING_URI, HF_TOKEN), and a
config that holds them inline is refused for deployments (`check_deployable`).
"""
from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# user:password@ in a URI authority (or in a path: a hub mirror, a mounted share).
_USERINFO = re.compile(r"(?P<user>[^\s/:@?#]+):(?P<secret>[^\s/@?#]+)@")
# ?token=..., &password=..., access_key=... ; the name is kept, the value hidden.
_QUERY = re.compile(r"(?P<name>[?&;](?:[\w.-]*?(?:token|password|passwd|pwd|secret|key|"
                    r"signature|sig|credential|auth)[\w.-]*))=(?P<secret>[^&;#\s'\"]+)",
                    re.IGNORECASE)
_registry: dict[str, str] = {}


def redact(text: Any) -> Any:
    """The text with credentials masked; non-strings are returned as they are."""
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['user']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['name']}={MASK}", text)


def has_secret(text: Any) -> bool:
    return isinstance(text, str) and redact(text) != text


def redact_tree(tree: Any) -> Any:
    """A copy of a JSON-like tree (config dumps, parameters) with every string redacted."""
    if isinstance(tree, dict):
        return {k: redact_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v) for v in tree]
    return redact(tree)


def register(real: Any) -> Any:
    """Remember `real` under its redacted form, for `reveal` in this process. Returns the
    redacted form (what may be stored and shown)."""
    masked = redact(real)
    if masked != real:
        _registry[masked] = real
    return masked


def reveal(value: Any) -> Any:
    """The real value behind a redacted one registered in this process (else unchanged)."""
    return _registry.get(value, value) if isinstance(value, str) else value


class RedactingFilter(logging.Filter):
    """Masks credentials in every record that passes a handler (our logs and Prefect's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is not ours to fix here
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def install_log_filter() -> None:
    """Attach the filter to every handler of the root, Prefect and MLflow loggers."""
    f = RedactingFilter()
    for name in ("", "prefect", "mlflow", "peft_bench"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not any(isinstance(x, RedactingFilter) for x in handler.filters):
                handler.addFilter(f)
        if not any(isinstance(x, RedactingFilter) for x in logger.filters):
            logger.addFilter(f)
