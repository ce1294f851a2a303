"""The `narfs` command: argument parsing, settings, logging, and one-line errors.

Each command lives in the module that holds its logic and is imported only when run, so
`narfs status` does not pay for pyfuse3 and the hook path never touches Python at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, NoReturn

import trio

from . import __version__, config, nixquery, nixversions, pathindex, signing
from .archive import Archiver
from .cache import Cache
from .config import Settings
from .errors import NarfsError
from .progress import when
from .storepath import user_store_path

log = logging.getLogger("narfs")

# command → (module, function); each function is `main(args, settings) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("narfs.cli", "cmd_init"),
    "archive": ("narfs.cli", "cmd_archive"),
    "watch": ("narfs.watch", "main"),
    "mount": ("narfs.mount", "main"),
    "umount": ("narfs.mount", "umount_main"),
    "restore": ("narfs.restore", "main"),
    "gc": ("narfs.gc", "main"),
    "verify": ("narfs.verify", "main"),
    "quarantine": ("narfs.cli", "cmd_quarantine"),
    "status": ("narfs.status", "main"),
    "ls": ("narfs.ls", "main"),
    "doctor": ("narfs.doctor", "main"),
}


class JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set) prefix sd-daemon priorities so journald keeps levels."""

    PRIORITY: ClassVar[dict[int, int]] = {
        logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
        logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("narfs: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if not verbose:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


class Parser(argparse.ArgumentParser):
    """argparse with Nix's habits: no prefix matching of options, one-line errors."""

    def __init__(self, *args, **kw) -> None:
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message: str) -> NoReturn:
        # argparse prints its usage block first; a user's mistake is one line, like Nix's.
        self.exit(2, f"narfs: error: {message}; see `{self.prog} --help`\n")


def _common_flags(p: argparse.ArgumentParser, default: object) -> None:
    """-v, -q and --cache, accepted before and after the command (`default` SUPPRESS on the
    commands, so one given before the command is not reset by the command's parser)."""
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="debug output (log every step)")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="only warnings and errors")
    p.add_argument("--cache", dest="cache_dir", metavar="DIR", default=default,
                   help="the cache directory (default: cache_dir from the config file)")


def _key_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--secret-key", dest="secret_key_file", metavar="FILE",
                   help="Ed25519 secret key file (name:base64) to sign narinfos with")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="narfs", description=(
        "Keep every Nix build in a cold tier: a signed, zstd-seekable binary cache that you "
        "can mount, restore from and serve."))
    parser.add_argument("--version", action="version", version=f"narfs {__version__}",
                        help="print the version and exit")
    _common_flags(parser, None)
    parser.set_defaults(verbose=0, quiet=False)
    common = Parser(add_help=False)
    _common_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=Parser)

    def command(name: str, help: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common], description=kw.pop(
            "description", help[0].upper() + help[1:] + "."), **kw)

    p = command("init", "create the cache, a signing key and print nix.conf lines")
    _key_flag(p)

    p = command("archive", "archive the closures of store paths now")
    _key_flag(p)
    p.add_argument("--all", action="store_true", help="every valid path in the store")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="a store path, or an out-link such as ./result")

    p = command("watch", "the service: archive what the roots dir pins, then unpin")
    _key_flag(p)
    p.add_argument("--roots", dest="roots_dir", metavar="DIR",
                   help="the roots dir narfs-hook pins builds in (default: roots_dir)")

    p = command("mount", "mount the archive as a read-only filesystem")
    p.add_argument("--foreground", action="store_true", help="stay attached (for systemd)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT",
                   help="mount options, comma-separated: allow_other, ro, nonempty")
    p.add_argument("--fuse-mode", dest="fuse_mode", choices=("auto", "fast", "stock"),
                   help="fast: zero-message opens and cached directories (needs pyfuse3 with "
                   "narfs's patch); stock: what stock pyfuse3 allows; auto (default): fast "
                   "when available")
    p.add_argument("source", nargs="?", metavar="URL",
                   help="a remote cache, http(s)://host/path (default: cache_dir, or --cache)")
    p.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                   help="where to mount (default: mountpoint from the config file)")
    p.add_argument("--path", dest="paths", action="append", default=[], metavar="STOREPATH",
                   help="with the URL of a cache that has no narfs path index (written by nix "
                   "copy, cache.nixos.org): a store path to show (repeatable)")

    p = command("umount", "unmount a narfs mount")
    p.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                   help="the mount (default: mountpoint from the config file)")

    p = command("restore", "bring closures back into /nix/store")
    p.add_argument("--dry-run", action="store_true", help="list what would come back")
    p.add_argument("--add-root", metavar="LINK", help="register a GC root for the target")
    p.add_argument("--to", metavar="DIR", help="unpack one path's tree into DIR, without Nix")
    p.add_argument("--no-check-sigs", action="store_true",
                   help="skip signature checks (explicit: you trust the cache directory)")
    p.add_argument("targets", nargs="+", metavar="TARGET", help=(
        "a store path, a hash, a name (the newest archived), an out-link such as ./result, "
        "or a file inside a narfs mount"))

    p = command("gc", "retire archived paths by last access", description=(
        "Retire archived paths by last access: the latest of archive time, reads through a "
        "narfs mount and narfs restore. Downloads served straight from the directory (nginx, "
        "file:// substituters) are not seen as accesses. A path a kept path refers to is "
        "kept. Without --older-than or --max-size: --older-than 365d."))
    p.add_argument("--older-than", metavar="AGE", help=(
        "with a unit: 365d, 12h, 90min, 2w, 1y (s, min, h, d, w, y; no bare numbers, no m)"))
    p.add_argument("--max-size", metavar="SIZE", help="e.g. 500G")
    p.add_argument("--dry-run", action="store_true", help="list what would be retired")
    p.add_argument("--yes", action="store_true", help=(
        "retire even when that is more than half the archive (needed then without --max-size)"))

    p = command("verify", "check every entry of the cache")
    p.add_argument("--repair", action="store_true", help=(
        "un-publish entries whose data is damaged; quarantine the rest it takes out"))
    p.add_argument("--adopt", action="append", metavar="KEYNAME", help=(
        "sign with your key the entries signed by KEYNAME whose NAR matches its NarHash "
        "(e.g. your own key from before a reinstall); repeatable"))
    _key_flag(p)

    p = command("quarantine", "list what verify --repair set aside, or restore it")
    p.add_argument("--restore", nargs="+", metavar="TARGET",
                   help="publish again: store paths, hashes, names, or `all`")

    command("status", "totals, pins waiting, last error, mount state")
    p = command("ls", "archived paths with size, date and last access")
    p.add_argument("pattern", nargs="?", metavar="PATTERN", help=(
        "a shell-style pattern (*, ?, [...]) matched against <hash>-<name>; without one, a "
        "substring of it"))
    command("doctor", "check the whole setup and name the fix for each problem")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's parser, so the hint points at its --help
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    cache = Cache(settings.cache_dir)
    created = cache.init()
    if created:  # mountable over HTTP before its first archive; an existing cache is left alone
        pathindex.publish(cache)
    print(f"{'created' if created else 'unchanged'}: binary cache {cache.root}")
    key_file = settings.secret_key_file or config.DEFAULT_KEY
    if os.path.exists(key_file):
        key = signing.load_secret_key(key_file)
        print(f"unchanged: signing key {key_file}")
    else:
        name, taken = new_key_name(cache, socket.gethostname())
        os.makedirs(os.path.dirname(os.path.abspath(key_file)), mode=0o700, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(signing.generate_secret_key(name))
        key = signing.load_secret_key(key_file)
        print(f"created: signing key {key_file} named {name} (mode 0600)")
        if taken:
            print(f"note: {taken} already sign entries in {cache.root} with keys this machine "
                  f"does not hold, so the new key is {name}; keep their public keys in "
                  "trusted-public-keys, or re-sign those entries with `narfs verify --adopt "
                  "NAME`")
    cache.record_key(key.public)
    cfg = config.config_path()
    if not os.path.exists(cfg):
        os.makedirs(os.path.dirname(os.path.abspath(cfg)), exist_ok=True)
        settings = dataclasses.replace(settings, secret_key_file=key_file)
        with open(cfg, "w") as f:
            f.write(config.render(settings, ("roots_dir", "cache_dir", "secret_key_file")))
        print(f"created: config {cfg}")
    else:
        current = config.load()
        if os.path.abspath(current.cache_dir) != cache.root:
            print(f"note: {cfg} names cache_dir {current.cache_dir}; pass --cache {cache.root} "
                  "to other commands or edit the file")
        else:
            print(f"unchanged: config {cfg}")
    hook = config.hook_path()
    if nixversions.file_store_url(cache.root) is None:
        log.warning("%s: Nix reads file:// URLs of a path with characters other than letters, "
                    "digits and /._- differently from version to version, so the substituter "
                    "line below may name another directory; give Nix a plain-named symlink to "
                    "the cache instead (narfs's own commands handle it)", cache.root)
    print("\n# Add to /etc/nix/nix.conf, then restart nix-daemon:")
    print(f"extra-substituters = file://{cache.root}")
    print(f"extra-trusted-public-keys = {key.public.text()}")
    print(f"post-build-hook = {hook}")
    # The same for NixOS, where nix.conf is generated: the module (systemd/narfs.nix) sets
    # all three from these options, its own hook included.
    nixos = {"cacheDir": cache.root, "secretKeyFile": os.path.abspath(key_file),
             "publicKey": key.public.text()}
    if settings.roots_dir != Settings.roots_dir:
        nixos["rootsDir"] = settings.roots_dir
    print("\n# NixOS: in configuration.nix, with the narfs module imported (README, NixOS):")
    print("services.narfs = {\n  enable = true;")
    for name, value in nixos.items():
        for plain, escaped in (("\\", "\\\\"), ('"', '\\"'), ("${", "\\${"), ("\n", "\\n")):
            value = value.replace(plain, escaped)
        print(f'  {name} = "{value}";')
    print("};")
    return 0


def new_key_name(cache: Cache, host: str) -> tuple[str, str]:
    """`<host>-narfs-<n>` with the lowest serial no signature in the cache, and no key narfs
    recorded there, uses: a new key under an old name would make every entry that name signed
    look forged. Returns the name and the names passed over ("" when none)."""
    used = set(cache.signature_names()) | {k.name for k in cache.recorded_keys()}
    serial = 1
    while f"{host}-narfs-{serial}" in used:
        serial += 1
    taken = [f"{host}-narfs-{n}" for n in range(1, serial)]
    return f"{host}-narfs-{serial}", ", ".join(taken)


async def _archive(args: argparse.Namespace, settings: Settings) -> int:
    if not args.all and not args.paths:
        raise NarfsError("archive: name store paths to archive, or --all for the whole store")
    paths = list(dict.fromkeys(user_store_path(p) for p in args.paths))
    if sys.stderr.isatty():  # the progress bar says it; per-path lines are for logs
        logging.getLogger("narfs.archive").setLevel(logging.WARNING)
    invalid = await nixquery.invalid_paths(paths)
    if invalid:
        raise NarfsError(f"{invalid[0]}: not a valid path in the Nix store; build or "
                         f"substitute it first ({len(invalid)} invalid in all)")
    if Cache(settings.cache_dir).init_if_new():
        log.info("created the binary cache %s", os.path.abspath(settings.cache_dir))
    with ThreadPoolExecutor(settings.threads, thread_name_prefix="zstd") as executor:
        archiver = Archiver.from_settings(settings, executor)
        with archiver.cache.writer():
            if args.all:
                result = await archiver.archive_infos(await nixquery.all_infos())
            else:
                result = await archiver.archive(paths)
    print(result.summary())
    for path, reason in result.failed.items():
        print(f"narfs: error: {path}: {reason}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_archive(args: argparse.Namespace, settings: Settings) -> int:
    return trio.run(_archive, args, settings)


def cmd_quarantine(args: argparse.Namespace, settings: Settings) -> int:
    from . import quarantine  # imported only when run, like every command's module
    cache = Cache(settings.cache_dir)
    cache.check()
    if not args.restore:
        entries = quarantine.held(cache)
        for e in entries:
            print(f"{e.store_path}: {e.why} (quarantined {when(e.since)})")
        hint = (f"; `{quarantine.RESTORE_HINT}` or `narfs quarantine --restore PATH` puts them "
                "back" if entries else "")
        print(f"{len(entries)} entries in {cache.root}/.narfs/{quarantine.DIRNAME}{hint}")
        return 0
    # the cache's key signs the frame hashes of an entry held without them
    key = signing.load_secret_key(settings.secret_key_file) \
        if settings.secret_key_file and os.path.isfile(settings.secret_key_file) else None
    with cache.writer():
        chosen = quarantine.select(quarantine.held(cache), args.restore)
        lines, left = quarantine.restore(cache, chosen, key)
    for line in lines:
        print(line)
    print(f"{len(chosen) - left} restored, {left} still in the quarantine")
    return 1 if left else 0


def resolve(command: str) -> Callable[[argparse.Namespace, Settings], int]:
    module, func = COMMANDS[command]
    return getattr(importlib.import_module(module), func)


def user_error(group: BaseExceptionGroup) -> BaseException:
    """The first NarfsError in a group whose every leaf is one (others are bugs: re-raised)."""
    rest = group.split((NarfsError, KeyboardInterrupt))[1]
    if rest is not None:
        return group
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    overrides = {k: getattr(args, k, None) for k in ("cache_dir", "secret_key_file", "roots_dir",
                                                     "fuse_mode")}
    try:
        try:
            settings = config.load(overrides, must_exist=args.command != "init")
            rc = resolve(args.command)(args, settings)
            sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
            return rc
        except BaseExceptionGroup as group:
            # trio nurseries wrap what their tasks raise; a user's error stays one line.
            raise user_error(group) from None
    except NarfsError as e:
        print(f"narfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("narfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `narfs ls | head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except PermissionError as e:
        print(f"narfs: error: {e.filename}: permission denied; run as root or as the owner "
              "of the cache", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
