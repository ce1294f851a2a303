"""narfs: a cold tier for the Nix store that feels like a filesystem.

Code map, lowest layer first: a module imports from its own group and the groups listed before
it (and tests/t0_imports.py checks that no command module imports another):

formats (pure: bytes in, values out; everything read is untrusted)
    errors        NarfsError (one line for the user), CorruptError (untrusted data refused)
    nix32, storepath, signing, narinfo
                  Nix's base 32, store path names, Ed25519 keys and Sig lines, .narinfo
    nar, listing, narstream, zstdseek
                  the NAR format (serialiser, validating parser), .ls listings, a NAR read back
                  from a cache file, the zstd seekable format
    tree          store paths as inode trees (numbering, compact trees of big paths)
the cache directory and narfs's derived data
    cache         layout, locks, reading untrusted files, the one temporary-then-rename helper
    frameauth     signed frame hashes (<hash>.auth): what a remote mount checks every frame and
                  listing against
    catalog       the catalog (.narfs/catalog.sqlite) and how commands open it
    pathindex     the published index of archived paths (narfs-index.zst) remote mounts poll
    disklru       files kept on disk, least recently used out (hot tier, fetched ranges)
    retire        removing entries closure-safe (gc, verify --repair)
    quarantine    entries verify --repair took out without deleting them
    watchstate    what narfs watch leaves for others: watch.json, the pins waiting
    mounttable    live narfs mounts (/proc/mounts, .narfs/mount-<pid>.json), FUSE usability
Nix and the host
    nixversions   every difference between the Nix versions narfs supports
    nixquery      what narfs asks Nix (path-info, validity)
    config, notify, progress
                  settings (and the key they trust), sd_notify, progress bars and how counts,
                  sizes and times print
the mount (a FUSE filesystem over the cache)
    backend       where a mount's bytes come from (LocalBackend: the cache directory)
    http          HTTP ranges from an untrusted server (urllib3: one pool, timeouts, retries)
    remote        the HTTP backend: a partial mirror of a remote cache, checked against
                  trusted keys and signed frame hashes
    reader        the read path: bytes at an offset of a NAR (frame cache, hot tier)
    treecache     the trees of a mount's paths, loaded (tree file, catalog, .ls, NAR) and
                  kept: lookup counts, the idle LRU; what the model uses of catalog and backend
    view          the mount's model, no FUSE: the paths shown, .by-name, listings by cursor,
                  access records, prefetch candidates
    fs            the pyfuse3 adapter over the view: attributes, errnos, file handles, fast
                  and stock mode, the kernel's notify calls
the archiver
    archive       store closures into the cache (NAR, listing, signed narinfo; commit order)
commands (cli.COMMANDS runs each; none imports another)
    cli           parsing, logging, one-line errors; init, archive and quarantine themselves
    watch, mount, restore, gc, verify, status, ls, doctor
                  `narfs <command>` each

What the mount's and the watch service's threads may touch, and where they rely on trio's
cooperative scheduling: docs/concurrency.md.
"""

__version__ = "0.1.0"
