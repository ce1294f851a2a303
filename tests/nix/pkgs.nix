# A stand-in for nixpkgs' `pkgs`, with only names nixpkgs really has: enough to evaluate
# package.nix, flake.nix and systemd/narfs.nix without building (or fetching) anything.
# A package is a derivation-shaped attrset whose outPath is a made-up store path, so it
# interpolates like the real one; `bin` maps a package to a real prefix on this machine where
# a test runs what the expression points at (e.g. { dash = "/usr"; }).
{
  lib,
  bin ? { },
  # tells apart two instances: the system's pkgs and a flake's nixpkgs input
  tag ? "",
}:

let
  fakePath =
    name: "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" (tag + name))}-${name}";
  drv =
    name: attrs:
    {
      type = "derivation";
      inherit name;
      outPath = bin.${name} or (fakePath name);
    }
    // attrs;

  # python3Packages: the attribute names are nixpkgs' (pkgs/top-level/python-packages.nix).
  pythonPackage =
    pname: attrs:
    drv pname (
      {
        inherit pname;
        patches = [ ];
        overridePythonAttrs =
          f:
          let
            old = pythonPackage pname attrs;
          in
          pythonPackage pname (attrs // (if builtins.isFunction f then f old else f));
      }
      // attrs
    );
  python3Packages = {
    # The arguments it was called with ride along in `args`, for the tests to read.
    buildPythonApplication = args: drv "${args.pname}-${args.version}" { inherit args; };
    setuptools = pythonPackage "setuptools" { };
    pyfuse3 = pythonPackage "pyfuse3" { };
    trio = pythonPackage "trio" { };
    zstandard = pythonPackage "zstandard" { };
    sqlitedict = pythonPackage "sqlitedict" { };
    pynacl = pythonPackage "pynacl" { };
    inotify-simple = pythonPackage "inotify-simple" { };
    tqdm = pythonPackage "tqdm" { };
    urllib3 = pythonPackage "urllib3" { };
  };

  pkgs = {
    inherit lib python3Packages;
    callPackage = lib.callPackageWith pkgs;
    stdenv.hostPlatform.system = "x86_64-linux";
    system = "x86_64-linux";
    nix = drv "nix" { };
    fuse3 = drv "fuse3" { };
    coreutils = drv "coreutils" { };
    util-linux = drv "util-linux" { };
    dash = drv "dash" { };
    runtimeShell = "${drv "bash" { }}/bin/bash";
    # The script's text rides along in `text`.
    writeScript = name: text: drv name { inherit text; };
    writeShellScript = name: text: drv name { text = "#!${pkgs.runtimeShell}\n" + text; };
  };
in
pkgs
