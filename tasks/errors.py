"""How a failure is told: the exception's type and message, or, when the message is empty
(a bare `assert` in a library), where it was raised. Used for the console line and the
`peft_bench.error` tag alike, and it never raises itself: the error path must not fail."""
from __future__ import annotations

import traceback
from pathlib import Path

from tasks.secrets import redact


def where_raised(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    if not frames:
        return "raised with no traceback"
    f = frames[-1]
    return f"raised at {Path(f.filename).name}:{f.lineno} in {f.name}"


def describe(error: BaseException, one_line: bool = False, limit: int = 5000) -> str:
    """`Type: message` (credentials masked); `Type (raised at file:line in function)` when
    the message is empty; the first line only with `one_line`."""
    try:
        name = type(error).__name__
        text = redact(str(error)).strip()
        if not text:
            return f"{name} ({where_raised(error)}, with no message)"
        if one_line:
            text = text.splitlines()[0]
        return f"{name}: {text}"[:limit]
    except Exception:  # a broken __str__, a redaction failure: still say what failed
        return f"{type(error).__name__} (its message could not be read)"
