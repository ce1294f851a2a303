# narfs as a Nix package: `nix build` (flake.nix), `nix-build` (default.nix), or
# `pkgs.callPackage ./package.nix { }` anywhere else. Provides bin/narfs and bin/narfs-hook.
{
  lib,
  python3Packages,
  fuse3,
  nix,
  coreutils,
  dash,
}:

let
  # narfs's patch to pyfuse3 (patches/pyfuse3-fast.patch: lets OPEN/OPENDIR answer ENOSYS
  # and keeps the inode in read/readdir, so the kernel caches opens and listings). Applied
  # when the file is in the tree; until then pyfuse3 is nixpkgs' own, which narfs also runs on.
  pyfuse3Patch = ./patches/pyfuse3-fast.patch;
  pyfuse3 = python3Packages.pyfuse3.overridePythonAttrs (old: {
    patches = (old.patches or [ ]) ++ lib.optional (builtins.pathExists pyfuse3Patch) pyfuse3Patch;
  });
in
python3Packages.buildPythonApplication {
  pname = "narfs";
  version = (lib.importTOML ./pyproject.toml).project.version;
  pyproject = true;

  # Only what the wheel is built from: editing tests or docs does not rebuild narfs.
  # (lib.sourceByRegex rather than lib.fileset, which needs Nix 2.14 to evaluate.)
  src = lib.sourceByRegex ./. [
    "pyproject\\.toml"
    "README\\.md"
    "narfs(/[a-z0-9][a-z0-9_]*)*" # packages, not __pycache__
    "narfs(/[a-z0-9_]+)*\\.py"
    "systemd"
    "systemd/narfs-hook"
  ];

  # The hook runs once per build while Nix waits (systemd/narfs-hook): dash, not bash, and
  # coreutils found even when the daemon's PATH is bare.
  postPatch = ''
    substituteInPlace systemd/narfs-hook \
      --replace-fail '#!/bin/sh' '#!${dash}/bin/dash' \
      --replace-fail 'PATH=''${PATH:+$PATH:}' 'PATH=''${PATH:+$PATH:}${coreutils}/bin:'
  '';

  build-system = [ python3Packages.setuptools ];

  dependencies = [
    pyfuse3
  ]
  ++ (with python3Packages; [
    trio
    zstandard
    sqlitedict
    pynacl
    inotify-simple
    tqdm
    urllib3
  ]);

  # narfs runs nix, nix-store and fusermount3. Appended, not prepended: the system's own Nix
  # (on NixOS nix.package, maybe newer, or Lix) and /run/wrappers' setuid fusermount3 win
  # where the caller has them; these are the fallback.
  makeWrapperArgs = [
    "--suffix"
    "PATH"
    ":"
    (lib.makeBinPath [
      fuse3
      nix
    ])
  ];

  # The suite needs a writable /nix/store, FUSE and nginx; it runs in the repository's CI.
  doCheck = false;
  pythonImportsCheck = [
    "narfs"
    "narfs.cli"
  ];

  meta = {
    description = "Keep every Nix build in a cold tier: a signed, zstd-seekable binary cache you can mount, restore from and serve";
    license = lib.licenses.mit;
    mainProgram = "narfs";
    platforms = lib.platforms.linux;
  };
}
