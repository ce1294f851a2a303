{
  description = "narfs: keep every Nix build in a mountable, signed, zstd-seekable binary cache";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # narfs needs FUSE and inotify: Linux only.
      systems = lib.filter (lib.hasSuffix "-linux") lib.systems.flakeExposed;
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./package.nix { };
      });

      overlays.default = final: prev: {
        narfs = final.callPackage ./package.nix { };
      };

      # services.narfs, with the package from this flake unless the configuration sets one.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./systemd/narfs.nix ];
          services.narfs.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
    };
}
