"""Exceptions that reach the user as one line."""


class NarfsError(Exception):
    """A problem the user can act on; the CLI prints str(self) as one line and exits non-zero."""


class CorruptError(NarfsError):
    """Untrusted data (a NAR, narinfo, listing, seek table) is malformed or lies."""


class Unavailable(OSError):
    """Where bytes come from could not be asked now (a server down, refusing or too slow): this
    request fails with EIO, and nothing is concluded about the data (a path is not marked
    broken for it, and no other source on the same server is tried instead)."""
