"""tests/pytest_checklogs.py: an ERROR narfs logs fails the test that did not expect it."""

from __future__ import annotations

from pathlib import Path

import pytest

PLUGIN = Path(__file__).with_name("pytest_checklogs.py")

TESTS = '''
import logging

import pytest

log = logging.getLogger("narfs.somewhere")


def test_logs_an_unexpected_error():
    log.error("/cache/x.narinfo: cannot read it")


def test_logs_a_critical_one():
    logging.getLogger("narfs").critical("gone")


def test_only_warns():
    log.warning("a warning is no failure")


def test_error_of_another_library():
    logging.getLogger("sqlitedict").error("not narfs's")


@pytest.mark.expect_log_errors
def test_expects_any_error():
    log.error("anything")


@pytest.mark.expect_log_errors("cannot read", "refusing .* NAR")
def test_expects_these():
    log.error("/cache/x.narinfo: cannot read it")
    log.error("refusing its NAR in /cache")


@pytest.mark.expect_log_errors("cannot read")
def test_expects_another():
    log.error("something else went wrong")


def test_survives_basicconfig_force():
    logging.basicConfig(level=logging.INFO, force=True)  # what narfs.cli.setup_logging does
    log.error("logged after the CLI set up logging")
'''


def test_unexpected_errors_fail_the_test(pytester: pytest.Pytester) -> None:
    """In a pytest of its own (the inner tests' errors are not this test's, and one of them
    resets the root logger)."""
    pytester.makepyfile(pytest_checklogs=PLUGIN.read_text(),
                        conftest='pytest_plugins = ["pytest_checklogs"]\n', test_logs=TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    outcomes = {line.split("::")[1].split()[0]: line.split()[0].lower()
                for line in result.stdout.lines if line.startswith(("PASSED ", "FAILED "))}
    assert outcomes == {
        "test_logs_an_unexpected_error": "failed",
        "test_logs_a_critical_one": "failed",
        "test_only_warns": "passed",
        "test_error_of_another_library": "passed",
        "test_expects_any_error": "passed",
        "test_expects_these": "passed",
        "test_expects_another": "failed",
        "test_survives_basicconfig_force": "failed",
    }
    result.stdout.fnmatch_lines(["*narfs logged errors the test does not expect*",
                                 "*ERROR narfs.somewhere: /cache/x.narinfo: cannot read it*"])
