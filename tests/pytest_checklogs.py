"""A test fails when narfs logs an ERROR it did not expect (S3QL's tests/pytest_checklogs.py).

An error narfs logs and then recovers from is still a bug or a user's problem worth a line: a
test that passes while narfs logs one hides it. Each test's records from the `narfs` loggers at
ERROR or above, from its setup and its call, fail it unless the test declares them:

    @pytest.mark.expect_log_errors                  # any error is expected
    @pytest.mark.expect_log_errors("not a directory", r"refusing .* NAR")  # each must match one

This sees what narfs logs in the test's own process (the pure layers, tests that call narfs's
functions). Tests that run `python -m narfs.cli` in a subprocess get its log on that process's
stderr, which this does not read: those tests check the output they expect themselves.

The handler hangs on the `narfs` logger itself rather than on the root logger, so
`cli.setup_logging` (basicConfig(force=True), which replaces the root's handlers) does not
take it away in tests that run the CLI in-process.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator

import pytest

MARK = "expect_log_errors"
_records = pytest.StashKey[list[logging.LogRecord]]()
_handler = pytest.StashKey[logging.Handler]()


class _Collect(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARK}(*patterns): the test expects narfs to log errors (each matching "
        "one of the regular expressions, when given); tests/pytest_checklogs.py")


def unexpected(records: list[logging.LogRecord], mark: pytest.Mark | None) -> list[str]:
    """The messages of `records` the test's mark does not allow."""
    if mark is not None and not mark.args:
        return []
    patterns = [re.compile(p) for p in (mark.args if mark is not None else ())]
    messages = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in records]
    return [m for m in messages if not any(p.search(m) for p in patterns)]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    records: list[logging.LogRecord] = []
    item.stash[_records] = records
    handler = _Collect(records)
    item.stash[_handler] = handler
    logging.getLogger("narfs").addHandler(handler)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    result = yield  # a test that failed already keeps its own failure
    found = unexpected(item.stash.get(_records, []), item.get_closest_marker(MARK))
    if found:
        pytest.fail("narfs logged errors the test does not expect (mark it "
                    f"@pytest.mark.{MARK}(pattern) if they are right):\n  "
                    + "\n  ".join(found), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        handler = item.stash.get(_handler, None)
        if handler is not None:
            logging.getLogger("narfs").removeHandler(handler)
