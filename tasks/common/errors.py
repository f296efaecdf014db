"""How a failure is told: the exception's type and message, or, when the message is empty
(a bare `assert` in a library), where it was raised. Used for the console line and the
`peft_bench.error` tag alike, and it never raises itself: the error path must not fail."""
from __future__ import annotations

import traceback
from pathlib import Path

from tasks.common.secrets import redact


def where_raised(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    if not frames:
        return "raised with no traceback"
    f = frames[-1]
    return f"raised at {Path(f.filename).name}:{f.lineno} in {f.name}"


def stopped_by(error: BaseException) -> str | None:
    """The reason for a run stopped from outside: SIGTERM (Prefect's TerminationSignal and the
    CLI's own, both carry `.signal`) or Ctrl-C; None for any other error."""
    import signal

    sig = getattr(error, "signal", None)
    if isinstance(sig, int) and isinstance(error, BaseException):
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return (f"terminated by {name}: stopped from outside (kill, systemd, Docker, "
                "Kubernetes or a Prefect cancellation); resume it with `peft-bench run "
                "--resume <parent run id>`")
    if isinstance(error, KeyboardInterrupt) and not str(error):
        return "interrupted (Ctrl-C); resume it with `peft-bench run --resume <parent run id>`"
    return None


def describe(error: BaseException, one_line: bool = False, limit: int = 5000) -> str:
    """`Type: message` (credentials masked); `Type (raised at file:line in function)` when
    the message is empty; the first line only with `one_line`."""
    try:
        if (stop := stopped_by(error)) is not None:
            return stop
        name = type(error).__name__
        text = redact(str(error)).strip()
        if not text:
            return f"{name} ({where_raised(error)}, with no message)"
        if one_line:
            text = text.splitlines()[0]
        return f"{name}: {text}"[:limit]
    except Exception:  # a broken __str__, a redaction failure: still say what failed
        return f"{type(error).__name__} (its message could not be read)"
