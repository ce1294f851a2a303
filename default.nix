# For users without flakes:
#   nix-build                          builds narfs (./result/bin/narfs, ./result/bin/narfs-hook)
#   nix-env -f . -i                    installs it
#   imports = [ ./systemd/narfs.nix ]  the NixOS module; it builds this same package itself
{
  pkgs ? import <nixpkgs> { },
}:
pkgs.callPackage ./package.nix { }
