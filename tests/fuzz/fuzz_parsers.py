"""Coverage-guided fuzzing (atheris/libFuzzer) of every parser that reads a cache.

    python tests/fuzz/fuzz_parsers.py TARGET [libFuzzer flags, e.g. -max_total_time=60 CORPUS]

TARGET is one of nar, narinfo, seektable, listing. The contract (DESIGN 5): untrusted bytes
produce a result or a CorruptError, never another exception, and memory stays bounded
(run with -rss_limit_mb to hold it to that).
"""

from __future__ import annotations

import io
import sys

import atheris

with atheris.instrument_imports():
    from narfs import listing, nar, narinfo, zstdseek
    from narfs.errors import CorruptError

MAX_FRAMES_READ = 4  # enough to reach every path of read_frame without slow inputs


def fuzz_nar(data: bytes) -> None:
    nar.parse(io.BytesIO(data), nar.ListingBuilder(), len(data))


def fuzz_narinfo(data: bytes) -> None:
    info = narinfo.parse(data)
    # Whatever parses must render and parse back to the same thing.
    again = narinfo.parse(info.render().encode())
    assert again == info, (info, again)


def fuzz_seektable(data: bytes) -> None:
    f = io.BytesIO(data)
    table = zstdseek.read_table(f, len(data))
    if table is None:
        return
    for frame in table.frames[:MAX_FRAMES_READ]:
        if frame.size <= 1 << 20:
            zstdseek.read_frame(f, frame)


def fuzz_listing(data: bytes) -> None:
    listing.parse(data, nar_size=1 << 40)


TARGETS = {"nar": fuzz_nar, "narinfo": fuzz_narinfo, "seektable": fuzz_seektable,
           "listing": fuzz_listing}


def main() -> None:
    target = TARGETS[sys.argv.pop(1)]

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except CorruptError:
            pass

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
