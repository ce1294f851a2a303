# Evaluates systemd/narfs.nix (or flake.nix's nixosModules.default) with nixpkgs' real
# module system (lib.evalModules) against nixos-options.nix and the stand-in pkgs.nix, and
# returns plain data for the tests (tests/nixeval.py runs it):
#   nix-instantiate --eval --strict --json tests/nix/eval.nix --argstr libPath .../lib ...
{
  libPath,
  # JSON: a NixOS configuration (services.narfs = ..., and anything else declared)
  configJSON ? "{}",
  # Nix files holding more modules, e.g. what `narfs init` prints
  modulePaths ? [ ],
  # "module": systemd/narfs.nix alone; "flake": flake.nix's nixosModules.default
  via ? "module",
  # a directory to stand for the narfs package (it has bin/narfs-hook), instead of the default
  packageDir ? null,
  # name -> real prefix for stand-in packages whose files a test runs
  binJSON ? "{}",
  # JSON: the repository's files (relative paths), for the package's source filter
  filesJSON ? "[]",
}:

let
  lib = import libPath;
  repo = ../..;
  pkgs = import ./pkgs.nix {
    inherit lib;
    bin = builtins.fromJSON binJSON;
  };

  flakePkgs = import ./pkgs.nix {
    inherit lib;
    tag = "flake";
  };
  flake = import (repo + "/flake.nix");
  flakeOutputs = flake.outputs {
    self = flakeOutputs // {
      outPath = repo;
    };
    nixpkgs = {
      inherit lib;
      legacyPackages = lib.genAttrs (lib.filter (lib.hasSuffix "-linux") lib.systems.flakeExposed) (
        _: flakePkgs
      );
    };
  };

  narfsModule =
    if via == "flake" then
      flakeOutputs.nixosModules.default
    else
      repo + "/systemd/narfs.nix";

  eval = lib.evalModules {
    modules = [
      ./nixos-options.nix
      narfsModule
      { _module.args.pkgs = pkgs; }
      { nix.package = lib.mkDefault pkgs.nix; }
      (builtins.fromJSON configJSON)
    ]
    ++ lib.optional (packageDir != null) {
      services.narfs.package = {
        type = "derivation";
        name = "narfs-under-test";
        outPath = packageDir;
      };
    }
    ++ map import modulePaths;
  };
  cfg = eval.config;

  # A package as the tests see it: its store path, and what buildPythonApplication was given.
  package =
    p:
    {
      path = "${p}";
    }
    // lib.optionalAttrs (p ? args) {
      inherit (p.args)
        pname
        version
        pyproject
        doCheck
        pythonImportsCheck
        postPatch
        makeWrapperArgs
        ;
      inherit (p.args.meta) mainProgram;
      license = p.args.meta.license.spdxId;
      linux = builtins.elem "x86_64-linux" p.args.meta.platforms;
      buildSystem = map (d: d.pname) p.args.build-system;
      dependencies = map (d: {
        inherit (d) pname;
        patches = map toString d.patches;
      }) p.args.dependencies;
      srcRoot = toString p.args.src.origSrc;
      # Which of `files` the source filter keeps, as builtins.path applies it: a file is in
      # when it and every directory above it pass (nothing is copied to the store here).
      srcFiles = lib.filter (
        f:
        let
          parts = lib.splitString "/" f;
          dirs = lib.genList (n: lib.concatStringsSep "/" (lib.take (n + 1) parts)) (
            builtins.length parts - 1
          );
          keep = rel: type: p.args.src.filter (toString repo + "/" + rel) type;
        in
        lib.all (d: keep d "directory") dirs && keep f "regular"
      ) (builtins.fromJSON filesJSON);
    };

  unit =
    u:
    {
      inherit (u)
        enable
        description
        documentation
        wantedBy
        requiredBy
        before
        after
        wants
        requires
        unitConfig
        ;
    }
    // lib.optionalAttrs (u ? serviceConfig) {
      inherit (u) serviceConfig environment;
      path = map toString u.path;
    }
    // lib.optionalAttrs (u ? timerConfig) { inherit (u) timerConfig; };

  hook = cfg.nix.settings.post-build-hook or null;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
  inherit (cfg.environment) etc;
  systemPackages = map toString cfg.environment.systemPackages;
  services = lib.mapAttrs (_: unit) cfg.systemd.services;
  timers = lib.mapAttrs (_: unit) cfg.systemd.timers;
  tmpfiles = cfg.systemd.tmpfiles.rules;
  nixSettings = cfg.nix.settings // {
    post-build-hook = if hook == null then null else "${hook}";
  };
  hookText = if hook != null && hook ? text then hook.text else null;
  nixExtraOptions = cfg.nix.extraOptions;
  nginx = cfg.services.nginx;
  firewallTCP = cfg.networking.firewall.allowedTCPPorts;
  narfsPackage = package cfg.services.narfs.package;
  flakePackage = package flakeOutputs.packages.x86_64-linux.default;
  overlayPackage = package ((flakeOutputs.overlays.default pkgs pkgs).narfs);
  defaultNixPackage = package (import (repo + "/default.nix") { inherit pkgs; });
}
