# NixOS module for narfs: every local build is pinned by narfs-hook, archived
# into a signed Nix binary cache by narfs-watch, browsable at a mountpoint,
# retired by a daily narfs-gc, and optionally served to other machines by nginx.
#
#   imports = [ ./narfs.nix ];
#   services.narfs = {
#     enable = true;
#     package = pkgs.callPackage ./narfs-package.nix { };  # provides bin/narfs, bin/narfs-hook
#     publicKey = "myhost-narfs-1:...";                   # what `narfs init` printed
#   };
#
# The units mirror narfs-*.service in this directory; see the comments there for
# why the hardening stops where it does.
{ config, lib, pkgs, ... }:

let
  inherit (lib)
    concatStringsSep escapeShellArg literalExpression mkEnableOption mkIf
    mkMerge mkOption optional optionalString types;

  cfg = config.services.narfs;

  defaultRootsDir = "/nix/var/nix/gcroots/narfs";

  # Nix runs the hook with its own environment (the daemon's, or the calling
  # user's without a daemon), so a non-default roots dir is set here rather
  # than left to whoever runs the build.
  hook =
    if cfg.rootsDir == defaultRootsDir then "${cfg.package}/bin/narfs-hook"
    else pkgs.writeScript "narfs-hook" ''
      #!${pkgs.dash}/bin/dash
      export NARFS_ROOTS=${escapeShellArg cfg.rootsDir}
      exec ${cfg.package}/bin/narfs-hook
    '';

  configFile = "/etc/narfs/narfs.toml";

  gcArgs = concatStringsSep " " (
    [ "--older-than" (escapeShellArg cfg.gc.olderThan) ]
    ++ optional (cfg.gc.maxSize != null) "--max-size ${escapeShellArg cfg.gc.maxSize}");

  # Shared by narfs-watch and narfs-gc. The watch talks to nix-daemon
  # (NIX_REMOTE=daemon below), so unlike the generic units it needs neither
  # /nix/var writable nor its own remount of /nix/store.
  hardening = {
    UMask = "0022";
    StateDirectory = "narfs";
    StateDirectoryMode = "0755";
    ProtectSystem = "strict";
    ReadWritePaths = [ cfg.cacheDir cfg.rootsDir ];
    PrivateTmp = true;
    ProtectHome = "read-only";
    NoNewPrivileges = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    LockPersonality = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    RestrictNamespaces = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" ];
    SystemCallErrorNumber = "EPERM";
    RestrictAddressFamilies = [ "AF_UNIX" ];
    IPAddressDeny = "any";
  };

  nixDaemonEnv = {
    NARFS_CONFIG = configFile;
    NIX_REMOTE = "daemon";
  };
in
{
  options.services.narfs = {
    enable = mkEnableOption "narfs, the automatic local Nix archive";

    package = mkOption {
      type = types.package;
      default = pkgs.narfs or (throw "services.narfs.package: set it to the narfs package");
      defaultText = literalExpression "pkgs.narfs";
      description = "The narfs package; it must provide bin/narfs and bin/narfs-hook.";
    };

    cacheDir = mkOption {
      type = types.str;
      default = "/var/lib/narfs/cache";
      description = "The Nix binary cache narfs writes (cache_dir).";
    };

    secretKeyFile = mkOption {
      type = types.str;
      default = "/var/lib/narfs/secret.key";
      description = ''
        Signing key (secret_key_file), as nix-store --generate-binary-cache-key
        writes it; `narfs init` creates it. Only root may read it.
      '';
    };

    publicKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "myhost-narfs-1:u+Hmral+Ufo+TMLr4PMzQ2+rsvHFxOpor1rzRZhdQOQ=";
      description = ''
        The public half of secretKeyFile, as `narfs init` prints it. Added to
        nix.settings.trusted-public-keys; without it Nix will not substitute
        from the archive.
      '';
    };

    priority = mkOption {
      type = types.int;
      default = 10;
      description = "Substituter priority of the archive; lower wins (cache.nixos.org is 40).";
    };

    rootsDir = mkOption {
      type = types.str;
      default = defaultRootsDir;
      description = ''
        Where narfs-hook pins builds and narfs watch picks them up (roots_dir).
        Must be under /nix/var/nix/gcroots for the pins to be GC roots.
      '';
    };

    mountpoint = mkOption {
      type = types.nullOr types.str;
      default = "/mnt/nar-archive";
      description = "Where to mount the archive read-only; null for no mount.";
    };

    gc = {
      olderThan = mkOption {
        type = types.str;
        default = "365d";
        description = "Retire entries not accessed for this long (narfs gc --older-than).";
      };
      maxSize = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "500G";
        description = "Then retire the least recently used until the cache fits (narfs gc --max-size).";
      };
      dates = mkOption {
        type = types.str;
        default = "daily";
        description = "When narfs gc runs (systemd OnCalendar= syntax).";
      };
    };

    nginx = {
      enable = mkEnableOption "serving the archive to other machines with nginx";
      virtualHost = mkOption {
        type = types.str;
        default = "nix-archive";
        description = "Name of the nginx virtual host serving cacheDir.";
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      environment.systemPackages = [ cfg.package ];

      environment.etc."narfs/narfs.toml".text = ''
        cache_dir = "${cfg.cacheDir}"
        secret_key_file = "${cfg.secretKeyFile}"
        roots_dir = "${cfg.rootsDir}"
      '' + optionalString (cfg.mountpoint != null) ''
        mountpoint = "${cfg.mountpoint}"
      '';

      nix.settings = {
        post-build-hook = "${hook}";
        substituters = [ "file://${cfg.cacheDir}?priority=${toString cfg.priority}" ];
        trusted-public-keys = optional (cfg.publicKey != null) cfg.publicKey;
      };

      # ReadWritePaths= needs them to exist before the first build is pinned.
      systemd.tmpfiles.rules = [
        "d ${cfg.rootsDir} 0755 root root -"
        "d ${cfg.cacheDir} 0755 root root -"
      ];

      systemd.services.narfs-watch = {
        description = "narfs: archive pinned Nix builds into the NAR cache";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" "nix-daemon.service" ];
        requires = [ "nix-daemon.socket" ];
        path = [ config.nix.package ];
        environment = nixDaemonEnv;
        serviceConfig = hardening // {
          Type = "notify";
          # Creates the cache dir's nix-cache-info and the signing key on first
          # start (and prints the public key to the journal); a no-op afterwards.
          ExecStartPre = "${cfg.package}/bin/narfs init";
          ExecStart = "${cfg.package}/bin/narfs watch";
          Restart = "always";
          RestartSec = "5s";
          TimeoutStopSec = 30;
          Nice = 10;
          CPUSchedulingPolicy = "batch";
          IOSchedulingClass = "best-effort";
          IOSchedulingPriority = 7;
        };
      };

      systemd.services.narfs-gc = {
        description = "narfs: retire old entries from the NAR cache";
        after = [ "local-fs.target" "nix-daemon.service" ];
        path = [ config.nix.package ];
        environment = nixDaemonEnv;
        serviceConfig = hardening // {
          Type = "oneshot";
          ExecStart = "${cfg.package}/bin/narfs gc ${gcArgs}";
          Nice = 19;
          IOSchedulingClass = "idle";
        };
      };

      systemd.timers.narfs-gc = {
        description = "narfs: daily retirement of old NAR cache entries";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = cfg.gc.dates;
          Persistent = true;
          RandomizedDelaySec = "1h";
          AccuracySec = "15min";
        };
      };
    }

    (mkIf (cfg.mountpoint != null) {
      # No namespacing options here: a FUSE mount made in a private mount
      # namespace would be invisible to everyone else.
      systemd.services.narfs-mount = {
        description = "narfs: mount the NAR archive at ${cfg.mountpoint}";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" "modprobe@fuse.service" ];
        wants = [ "modprobe@fuse.service" ];
        path = [ pkgs.fuse3 ];
        environment.NARFS_CONFIG = configFile;
        serviceConfig = {
          Type = "notify";
          ExecStartPre = "${pkgs.coreutils}/bin/mkdir -p ${escapeShellArg cfg.mountpoint}";
          ExecStart = "${cfg.package}/bin/narfs mount --foreground ${escapeShellArg cfg.mountpoint}";
          ExecStopPost = "-${pkgs.util-linux}/bin/umount --lazy ${escapeShellArg cfg.mountpoint}";
          Restart = "on-failure";
          RestartSec = "5s";
          TimeoutStopSec = 30;
          NoNewPrivileges = true;
          LockPersonality = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          RestrictNamespaces = true;
          SystemCallArchitectures = "native";
          RestrictAddressFamilies = [ "AF_UNIX" ];
          IPAddressDeny = "any";
        };
      };
    })

    (mkIf cfg.nginx.enable {
      # Only what a Nix client asks for is served; anything else in cacheDir
      # (.narfs/ with the catalog, .narfs-tmp-* temporaries) and every
      # directory listing is a 404.
      # Same rules as nginx-narfs.conf.
      services.nginx = {
        enable = true;
        virtualHosts.${cfg.nginx.virtualHost} = {
          root = cfg.cacheDir;
          extraConfig = ''
            autoindex off;
          '';
          locations = {
            "= /nix-cache-info".extraConfig = ''
              types { }
              default_type text/x-nix-cache-info;
            '';
            "~ \"^/[0-9a-df-np-sv-z]{32}\\.narinfo$\"".extraConfig = ''
              types { }
              default_type text/x-nix-narinfo;
            '';
            "~ \"^/[0-9a-df-np-sv-z]{32}\\.ls$\"".extraConfig = ''
              types { }
              default_type application/json;
            '';
            "~ \"^/nar/[0-9a-df-np-sv-z]{52}\\.nar(\\.(xz|zst|bz2|br|gz|lz4|lzip))?$\"".extraConfig = ''
              types { }
              default_type application/x-nix-nar;
              add_header Cache-Control "public, max-age=31536000, immutable";
            '';
            "/".return = "404";
          };
        };
      };
    })
  ]);
}
