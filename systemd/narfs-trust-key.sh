# narfs-trust-key.sh KEY_FILE CONF [PUBLIC_KEY]: run by narfs.nix's narfs-init after
# `narfs init`, to make Nix trust the key narfs signs with (the NixOS module only; on other
# systems `narfs init` prints the nix.conf line to add).
#
# Without PUBLIC_KEY (services.narfs.publicKey unset), the key file's public key goes to CONF
# as "extra-trusted-public-keys = ...", a file nix.conf "!include"s; when that line changes,
# nix-daemon, which reads nix.conf only when it starts, is restarted if it runs. With
# PUBLIC_KEY, a key file that does not match it is an error: Nix would refuse every path.
set -eu
key_file=$1 conf=$2 expected=${3:-}
public=$(nix --extra-experimental-features nix-command key convert-secret-to-public <"$key_file")
if [ -n "$expected" ]; then
    if [ "$public" != "$expected" ]; then
        echo "narfs: $key_file is the key of $public, not of services.narfs.publicKey ($expected): set publicKey to $public, or leave it unset" >&2
        exit 1
    fi
    exit 0
fi
line="extra-trusted-public-keys = $public"
if [ "$(cat -- "$conf" 2>/dev/null || true)" != "$line" ]; then
    printf '%s\n' "$line" >"$conf.tmp"
    mv -f -- "$conf.tmp" "$conf"
    echo "narfs: Nix trusts $public from now on ($conf); restarting nix-daemon if it runs"
    # --no-block: at boot, nix-daemon may be waiting for this very unit to finish.
    systemctl --no-block try-restart nix-daemon.service
fi
