"""One way for every stage to start and to fail.

``raise SystemExit(run_stage(main, "decode"))`` in each stage script: one log format, and a failure
the stage foresaw (bad params, bad or missing input, a model that learnt nothing, a download that
failed) ends as one ERROR log line naming the stage, and exit code 1, instead of a traceback. What
the stage did not foresee (a bug: ``TypeError``, ``KeyError``...) keeps its traceback. A ValueError
is how the library reports bad params and bad input, but a bug can raise one too: with
``CLICKDOG_TRACEBACK=1`` every failure also logs its traceback. Stages still raise their own
exceptions, so tests call ``main`` and assert on them.

Light on purpose (logging and os only): every stage imports it, the download stage included.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
TRACEBACK_ENV = "CLICKDOG_TRACEBACK"  # 1: a foreseen failure's ERROR line also carries its traceback


class StageFailure(RuntimeError):
    """A failure a stage foresees and explains in its message (the base of DecodeError, FetchError,
    ModelAtChanceError, NonFiniteLossError): reported in one line, not as a traceback."""


# ConfigError, ModelFileError, TooManyPixels... are ValueErrors; a missing or unreadable file an OSError
EXPECTED = (ValueError, OSError, StageFailure)


def one_line(message: str, name: str) -> str:
    """``message`` on one line, prefixed with the stage's name once."""
    text = " ".join(message.split())
    return text if text.startswith(f"{name}:") else f"{name}: {text}"


def run_stage(main: Callable[[], int | None], name: str) -> int:
    """Run a stage's ``main`` with the shared log format; its exit code."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    log = logging.getLogger(name)
    try:
        return int(main() or 0)
    except SystemExit as exc:  # argparse's usage errors (code 2) and a stage's own SystemExit(message)
        if isinstance(exc.code, str):
            log.error("%s", one_line(exc.code, name))
            return 1
        return exc.code or 0
    except EXPECTED as exc:
        log.error("%s", one_line(str(exc) or type(exc).__name__, name), exc_info=os.environ.get(TRACEBACK_ENV) == "1")
        return 1

