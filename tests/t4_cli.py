"""The command line as Nix and coreutils users expect it (issue 16): flags before or after the
command, no prefix matching, a help line for everything, one-line errors."""

from __future__ import annotations

import argparse

import pytest

from narfs import cli
from narfs.progress import plural


@pytest.mark.parametrize("argv", [
    ["-v", "--cache", "/c", "-q", "status"],
    ["status", "-v", "--cache", "/c", "-q"],
    ["--cache", "/c", "ls", "-v", "-q"],
    ["-q", "mount", "--cache", "/c", "-v", "/mnt/x"],
])
def test_common_flags_before_or_after_the_command(argv: list[str]) -> None:
    args = cli.parse_args(argv)
    assert (args.cache_dir, args.verbose, args.quiet) == ("/c", 1, True)


def test_flags_given_before_are_kept_when_absent_after() -> None:
    args = cli.parse_args(["-vv", "--cache", "/c", "verify"])
    assert (args.cache_dir, args.verbose, args.quiet) == ("/c", 2, False)
    args = cli.parse_args(["verify"])
    assert (args.cache_dir, args.verbose, args.quiet) == (None, 0, False)


@pytest.mark.parametrize("argv", [
    ["archive", "--al"],            # --all
    ["restore", "--dry", "x"],      # --dry-run
    ["--verb", "status"],           # --verbose
    ["status", "--cach", "/c"],     # --cache
    ["gc", "--older", "1d"],        # --older-than
    ["stat"],                       # status: commands are not prefixes either
])
def test_no_prefix_matching(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("narfs: error: ")


@pytest.mark.parametrize("argv, hint", [
    ([], "narfs --help"),
    (["bogus"], "narfs --help"),
    (["restore"], "narfs restore --help"),
    (["archive", "--bogus"], "narfs archive --help"),
    (["ls", "--cache"], "narfs ls --help"),
    (["mount", "--bogus"], "narfs mount --help"),
])
def test_argparse_errors_are_one_line(argv: list[str], hint: str,
                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert hint in err


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("narfs", parser), *((f"narfs {n}", p) for n, p in sub.choices.items())]


def test_every_command_and_argument_has_a_help_line() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {a.dest for a in sub._choices_actions}
    assert listed == set(sub.choices) == set(cli.COMMANDS)
    assert all(a.help for a in sub._choices_actions)
    for prog, p in _parsers():
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, \
                f"{prog} {'/'.join(action.option_strings) or action.dest}: no help line"
        assert not p.allow_abbrev, prog


def test_plural() -> None:
    assert plural(1, "path") == "1 path"
    assert [plural(n, "path") for n in (0, 2)] == ["0 paths", "2 paths"]
    assert plural(1, "entry", "entries") == "1 entry"
    assert plural(3, "entry", "entries") == "3 entries"
