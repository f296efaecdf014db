"""What a `peft-bench run` shows on the console: our progress and results, credentials masked,
and no tracebacks for the errors we expect and explain (a diverged run, bad data, a flagged
regression): Prefect's engine logs every exception with its traceback, which for these says
nothing the one-line message does not. The traceback still reaches Prefect's API and UI."""
from __future__ import annotations

import logging

from tasks.secrets import RedactingFilter


def expected_errors() -> tuple[type[BaseException], ...]:
    from flows.benchmark import AllRunsFailed, RegressionError
    from tasks.config import ConfigError
    from tasks.dataset import DataError
    from tasks.train import NonFiniteError

    return (NonFiniteError, DataError, ConfigError, AllRunsFailed, RegressionError)


class ExpectedErrorFilter(logging.Filter):
    def __init__(self, kinds: tuple[type[BaseException], ...]):
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        if exc and exc[0] is not None and issubclass(exc[0], self.kinds):
            record.exc_info, record.exc_text = None, None
        return True


def _is_console(handler: logging.Handler) -> bool:
    return hasattr(handler, "console") or type(handler) is logging.StreamHandler


def install() -> None:
    """Attach the filters to the console handlers of the root and Prefect loggers."""
    filters = [ExpectedErrorFilter(expected_errors()), RedactingFilter()]
    for name in ("", "prefect"):  # the flow- and task-run loggers propagate to "prefect"
        for handler in logging.getLogger(name).handlers:
            if _is_console(handler):
                for f in filters:
                    if not any(type(x) is type(f) for x in handler.filters):
                        handler.addFilter(f)
