# A project small enough to build on a fresh machine in a second, without nixpkgs or a
# download: the builder is the host's /bin/sh with coreutils, which Debian's Nix (no sandbox)
# lets a build use. tools/install-debian builds it to show narfs's whole loop.
derivation {
  name = "narfs-hello-1.0";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  src = ./hello.sh;
  args = [ "-c" ''
    set -e
    /bin/mkdir -p $out/bin $out/share/doc/narfs-hello
    /bin/cp $src $out/bin/narfs-hello
    /bin/chmod 0555 $out/bin/narfs-hello
    echo "narfs-hello: archived by narfs, readable after the GC" >$out/share/doc/narfs-hello/README
  '' ];
}
