"""What a `peft-bench run` shows on the console: our progress and results, credentials masked,
and no tracebacks for the errors we expect and explain (a diverged run, bad data, a flagged
regression): Prefect's engine logs every exception with its traceback, which for these says
nothing the one-line message does not. The traceback still reaches Prefect's API and UI."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from tasks.common.secrets import RedactingFilter


def expected_errors() -> tuple[type[BaseException], ...]:
    from flows.benchmark import AllRunsFailed, RegressionError
    from tasks.config.schema import ConfigError
    from tasks.data.labels import DataError
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


class _Console(logging.Handler):
    """Prints through tqdm, so lines do not tear the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - a console that is gone must not stop the run
            self.handleError(record)


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.common.names import PROGRESS_LOGGER as LOGGER

        return record.name == LOGGER


_handlers: list[logging.Handler] = []
_removed: list[tuple[logging.Logger, logging.Handler]] = []
_root_level: list[int] = []  # the root logger's level before the first call


def quiet_other_libraries(log_file: Path, verbose: bool) -> None:
    """Everything (Prefect's task lines, MLflow's, transformers' load reports and progress bars,
    bitsandbytes' kernel notice, Python warnings) goes to `log_file`; the console shows our
    progress lines only, or with `verbose` everything as well. Call it before the checks, and
    again once Prefect is imported: Prefect configures logging on import, replacing the root
    logger's handlers."""
    import transformers

    if not _handlers:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        to_file.addFilter(RedactingFilter())
        console = _Console()
        console.setFormatter(logging.Formatter("%(message)s"))
        console.addFilter(RedactingFilter())
        if not verbose:
            console.addFilter(_OursOnly())
            transformers.utils.logging.disable_progress_bar()
        _handlers.extend([to_file, console])
    logging.captureWarnings(True)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    for name in ("", "prefect", "mlflow"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if handler not in _handlers and (verbose is False) and not isinstance(
                    handler, logging.FileHandler) and isinstance(handler, logging.StreamHandler):
                logger.removeHandler(handler)
                _removed.append((logger, handler))
        if name == "" or not logger.propagate:
            for handler in _handlers if name == "" else _handlers[:1]:
                if handler not in logger.handlers:
                    logger.addHandler(handler)
    root = logging.getLogger()
    if not _root_level:
        _root_level.append(root.level)
    root.setLevel(logging.INFO)
    logging.getLogger("peft_bench").setLevel(logging.INFO)
    if _handlers and isinstance(_handlers[0], logging.FileHandler):
        _handlers[0].addFilter(ExpectedErrorFilter(expected_errors()))


def log_path() -> Optional[Path]:
    return Path(_handlers[0].baseFilename) if _handlers else None


def restore() -> None:
    """Undo `quiet_other_libraries` (the CLI calls it when a run ends, so a process that goes
    on, a test session say, gets its logging back)."""
    for name in ("", "prefect", "mlflow"):
        logger = logging.getLogger(name)
        for handler in _handlers:
            logger.removeHandler(handler)
    for handler in _handlers:
        handler.close()
    for logger, handler in _removed:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    _handlers.clear()
    # Back to the level before: left at INFO, the handlers put back above would print every
    # library's INFO lines after the run, e.g. httpx's "HTTP Request: POST .../api/logs/" as
    # Prefect's log worker flushes at exit.
    if _root_level:
        logging.getLogger().setLevel(_root_level.pop())
    _removed.clear()
    import transformers

    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.disable_propagation()
    transformers.utils.logging.enable_progress_bar()
