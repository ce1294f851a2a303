"""Exceptions that reach the user as one line."""


class NarfsError(Exception):
    """A problem the user can act on; the CLI prints str(self) as one line and exits non-zero."""


class CorruptError(NarfsError):
    """Untrusted data (a NAR, narinfo, listing, seek table) is malformed or lies."""
