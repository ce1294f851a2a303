# NixOS module for narfs: every local build is pinned by narfs-hook, archived into a signed
# Nix binary cache by narfs-watch, browsable at a mountpoint, retired by a daily narfs-gc, and
# optionally served to other machines by nginx. The whole configuration:
#
#   imports = [ narfs.nixosModules.default ];   # flake; or ./systemd/narfs.nix from a checkout
#   services.narfs.enable = true;
#
# Nix then trusts the archive's key: `publicKey` when given (what `narfs init` prints), or else
# the key narfs-init creates on first start, which it writes where nix.conf includes it from.
#
# The units are the ones in this directory (narfs-*.service, narfs-gc.timer) with the same
# hardening; the comments there say why it stops where it does. tests/t4_systemd.py
# evaluates this module with nixpkgs' lib and compares the two.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    concatStringsSep
    hasPrefix
    literalExpression
    mapAttrsToList
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    optional
    optionals
    types
    ;

  cfg = config.services.narfs;

  defaultRootsDir = "/nix/var/nix/gcroots/narfs";
  configFile = "/etc/narfs/narfs.toml";
  # systemd's StateDirectory= for every unit; narfs-init writes the key's nix.conf line here.
  stateDir = "/var/lib/narfs";
  keyConf = "${stateDir}/nix.conf";
  narfs = "${cfg.package}/bin/narfs";

  # Paths go unquoted into unit command lines and narfs.toml: keep them to characters that
  # need no quoting in either (no blanks, quotes, backslashes or systemd's % specifiers).
  absPath = types.strMatching "/[A-Za-z0-9._+@/-]*";
  under = dir: path: path == dir || hasPrefix "${dir}/" path;

  # Nix runs the hook with its own environment (the daemon's), so a non-default roots dir is
  # set here rather than left to whoever runs the build.
  hook =
    if cfg.rootsDir == defaultRootsDir then
      "${cfg.package}/bin/narfs-hook"
    else
      pkgs.writeScript "narfs-hook" ''
        #!${pkgs.dash}/bin/dash
        export NARFS_ROOTS=${cfg.rootsDir}
        exec ${cfg.package}/bin/narfs-hook
      '';

  toml = value: if builtins.isBool value then lib.boolToString value else builtins.toJSON value;
  settings =
    {
      cache_dir = cfg.cacheDir;
      secret_key_file = cfg.secretKeyFile;
      roots_dir = cfg.rootsDir;
    }
    // lib.optionalAttrs (cfg.mountpoint != null) { mountpoint = cfg.mountpoint; }
    // cfg.settings;

  # Run by narfs-init after `narfs init`: makes Nix trust the key (see the script).
  trustKey = pkgs.writeShellScript "narfs-trust-key" (builtins.readFile ./narfs-trust-key.sh);

  # The hardening of narfs-watch.service and narfs-gc.service (see the comments there):
  # nix-store runs as root on the local store, so /nix/var stays writable, /nix/store is
  # made a mount point, and mount namespaces and @mount stay allowed.
  storeHardening = {
    ProtectSystem = "strict";
    BindReadOnlyPaths = [ "-/nix/store" ];
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
    SystemCallArchitectures = "native";
    RestrictNamespaces = "mnt";
    PrivateMounts = true;
    SystemCallFilter = "~@clock @cpu-emulation @debug @module @obsolete @raw-io @reboot @swap";
    SystemCallErrorNumber = "EPERM";
    CapabilityBoundingSet = "~CAP_SYS_BOOT CAP_SYS_MODULE CAP_SYS_TIME CAP_SYS_PACCT CAP_SYS_TTY_CONFIG CAP_SYS_RAWIO CAP_LINUX_IMMUTABLE CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_NET_BROADCAST CAP_BPF CAP_PERFMON CAP_MAC_ADMIN CAP_MAC_OVERRIDE CAP_AUDIT_CONTROL CAP_AUDIT_READ CAP_AUDIT_WRITE CAP_WAKE_ALARM CAP_BLOCK_SUSPEND CAP_SYSLOG CAP_MKNOD CAP_LEASE CAP_IPC_LOCK";
    RestrictAddressFamilies = "AF_UNIX";
    IPAddressDeny = "any";
  };

  # narfs-mount.service: no option that gives the service its own mount namespace (the FUSE
  # mount would be invisible outside it); seccomp, capability and BPF filtering only.
  mountHardening = {
    NoNewPrivileges = true;
    LockPersonality = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    RestrictNamespaces = true;
    inherit (storeHardening)
      SystemCallFilter
      SystemCallErrorNumber
      CapabilityBoundingSet
      RestrictAddressFamilies
      IPAddressDeny
      ;
  };

  # What narfs writes besides Nix's state: its state dir, and the cache dir and the roots dir
  # wherever they are ("-": the roots dir may not exist before the first build).
  writable =
    [
      stateDir
      "-/nix/var"
    ]
    ++ optional (!under stateDir cfg.cacheDir) cfg.cacheDir;

  # narfs-remote-<mountpoint>.service: the same filtering, but a remote mount talks to its
  # server over IP; its state is the root user's client cache, /var/cache/narfs/remote/.
  remoteHardening = builtins.removeAttrs mountHardening [ "IPAddressDeny" ] // {
    RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6";
    CacheDirectory = "narfs";
  };
  # A mount's service: `narfs mount --foreground` sends READY=1 once the mount is live and
  # unmounts on SIGTERM, so no ExecStop=. Only after a crash is a mount left behind; --quiet:
  # nothing to say after a clean stop.
  mountService = hardening: mountpoint: args: hardening // {
    Type = "notify";
    ExecStartPre = "${pkgs.coreutils}/bin/mkdir -p ${mountpoint}";
    ExecStart = "${narfs} mount --foreground ${args}";
    ExecStopPost = "-${pkgs.util-linux}/bin/umount --quiet --lazy ${mountpoint}";
    Restart = "on-failure";
    RestartSec = "5s";
    TimeoutStopSec = 30;
  };
  # systemd-escape --path, as NixOS's utils.escapeSystemdPath spells it
  escapePath = path: lib.replaceStrings [ "/" "-" ] [ "-" "\\x2d" ] (lib.removePrefix "/" path);

  environment.NARFS_CONFIG = configFile;
  stateDirectory = {
    UMask = "0022";
    StateDirectory = "narfs";
    StateDirectoryMode = "0755";
  };
in
{
  options.services.narfs = {
    enable = mkEnableOption "narfs: every local build archived into a signed, mountable Nix binary cache";

    package = mkOption {
      type = types.package;
      default = pkgs.narfs or (pkgs.callPackage ../package.nix { });
      defaultText = literalExpression "pkgs.narfs or (pkgs.callPackage ./package.nix { })";
      description = "The narfs package; it provides bin/narfs and bin/narfs-hook.";
    };

    cacheDir = mkOption {
      type = absPath;
      default = "/var/lib/narfs/cache";
      description = "The Nix binary cache narfs writes (cache_dir); created if missing.";
    };

    secretKeyFile = mkOption {
      type = absPath;
      default = "/var/lib/narfs/secret.key";
      description = ''
        The signing key (secret_key_file), as nix-store --generate-binary-cache-key writes it.
        narfs-init creates it on first start if it is missing. Only root may read it.
      '';
    };

    publicKey = mkOption {
      type = types.nullOr (types.strMatching "[^: ]+:[A-Za-z0-9+/]+=*");
      default = null;
      example = "myhost-narfs-1:u+Hmral+Ufo+TMLr4PMzQ2+rsvHFxOpor1rzRZhdQOQ=";
      description = ''
        The public half of secretKeyFile, as `narfs init` prints it, for
        nix.settings.trusted-public-keys. Left null, narfs-init derives it from the key file
        on every start and writes it to ${keyConf}, which nix.conf includes.
      '';
    };

    priority = mkOption {
      type = types.ints.unsigned;
      default = 10;
      description = "Substituter priority of the archive; lower wins (cache.nixos.org has 40).";
    };

    rootsDir = mkOption {
      type = absPath;
      default = defaultRootsDir;
      description = ''
        Where narfs-hook pins builds and narfs watch picks them up (roots_dir). It must be
        under /nix/var/nix/gcroots for the pins to be GC roots.
      '';
    };

    remoteMounts = mkOption {
      type = types.attrsOf (types.strMatching "https?://[A-Za-z0-9._~:/@+=,-]+");
      default = { };
      example = literalExpression ''{ "/mnt/archive" = "https://archive.example.org/cache"; }'';
      description = ''
        Remote narfs caches to mount read-only (mountpoint = URL), one
        narfs-remote-<mountpoint> service each running `narfs mount --foreground URL
        MOUNTPOINT`. Needs no services.narfs.enable: the server's narinfos are checked
        against nix.settings.trusted-public-keys (or narfs.toml's public_key).
      '';
    };

    mountpoint = mkOption {
      type = types.nullOr absPath;
      default = "/mnt/nar-archive";
      description = "Where narfs-mount mounts the archive read-only; null for no mount.";
    };

    settings = mkOption {
      type = types.attrsOf (
        types.oneOf [
          types.str
          types.int
          types.bool
        ]
      );
      default = { };
      example = {
        allow_other = true;
        frame_cache_mb = 512;
      };
      description = "More narfs.toml settings (systemd/narfs.toml.example names them all).";
    };

    gc = {
      olderThan = mkOption {
        type = types.nullOr (types.strMatching "[0-9]+[a-z]*");
        default = null;
        example = "180d";
        description = "Retire entries not accessed for this long (narfs gc --older-than; narfs's default is 365d).";
      };
      maxSize = mkOption {
        type = types.nullOr (types.strMatching "[0-9]+[A-Za-z]*");
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

    serve = {
      enable = mkEnableOption "serving the archive to other machines with nginx (systemd/nginx-narfs.conf)";
      virtualHost = mkOption {
        type = types.str;
        default = "nix-archive";
        description = "The nginx virtual host's name (and server_name).";
      };
      port = mkOption {
        type = types.port;
        default = 5000;
        description = ''
          The port it listens on. A port of its own makes it nginx's only server there, so a
          request by IP address or any host name reaches it; clients use
          `http://<host>:<port>/?priority=<priority>` as a substituter.
        '';
      };
      listenAddresses = mkOption {
        type = types.listOf types.str;
        default = config.services.nginx.defaultListenAddresses;
        defaultText = literalExpression "config.services.nginx.defaultListenAddresses";
        description = "Addresses to listen on.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the port in the firewall.";
      };
    };
  };

  config = mkMerge [
    {
      # the URL's type keeps it to characters a unit's command line takes unquoted (no %, $,
      # quotes or blanks); the mountpoints must be absolute paths of the same kind
      assertions = mapAttrsToList (mountpoint: _: {
        assertion = builtins.match "/[A-Za-z0-9._+@/-]*" mountpoint != null;
        message = "services.narfs.remoteMounts: ${mountpoint} is not an absolute path of letters, digits and ._+@/-";
      }) cfg.remoteMounts;
      systemd.services = lib.mapAttrs' (
        mountpoint: url:
        lib.nameValuePair "narfs-remote-${escapePath mountpoint}" {
          description = "narfs: mount the remote NAR archive at ${mountpoint}";
          documentation = [ "file://${configFile}" ];
          wantedBy = [ "multi-user.target" ];
          after = [
            "network-online.target"
            "modprobe@fuse.service"
          ];
          wants = [
            "network-online.target"
            "modprobe@fuse.service"
          ];
          # nix.conf's trusted-public-keys and netrc-file are read through `nix show-config`
          path = [ config.nix.package ];
          serviceConfig = mountService remoteHardening mountpoint "${url} ${mountpoint}";
        }
      ) cfg.remoteMounts;
    }
    (mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = under "/nix/var/nix/gcroots" cfg.rootsDir;
          message = "services.narfs.rootsDir (${cfg.rootsDir}) must be under /nix/var/nix/gcroots, or the pins are no GC roots.";
        }
      ];

      environment.systemPackages = [ cfg.package ];

      environment.etc."narfs/narfs.toml".text = concatStringsSep "" (
        mapAttrsToList (name: value: "${name} = ${toml value}\n") settings
      );

      nix.settings = {
        post-build-hook = hook;
        substituters = [ "file://${cfg.cacheDir}?priority=${toString cfg.priority}" ];
        trusted-public-keys = optional (cfg.publicKey != null) cfg.publicKey;
      };
      # "!": a missing file is no error (before narfs-init first runs).
      nix.extraOptions = mkIf (cfg.publicKey == null) ''
        !include ${keyConf}
      '';

      # ReadWritePaths= needs them to exist before the first build is pinned.
      systemd.tmpfiles.rules = [
        "d ${stateDir} 0755 root root -"
        "d ${cfg.cacheDir} 0755 root root -"
        "d ${cfg.rootsDir} 0755 root root -"
      ];

      # Creates the cache (nix-cache-info) and the signing key if missing, then makes Nix
      # trust the key; before nix-daemon starts, so the daemon reads the key at boot.
      systemd.services.narfs-init = {
        description = "narfs: create the NAR cache and its signing key, and make Nix trust it";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" ];
        before = [
          "nix-daemon.service"
          "narfs-watch.service"
        ];
        path = [ config.nix.package ];
        inherit environment;
        serviceConfig =
          storeHardening
          // stateDirectory
          // {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = [
              "${narfs} init"
              "${trustKey} ${cfg.secretKeyFile} ${keyConf}${
                lib.optionalString (cfg.publicKey != null) " ${cfg.publicKey}"
              }"
            ];
            # The key's directory, if elsewhere, must exist ("-": else the key cannot be made).
            ReadWritePaths =
              writable ++ optional (!under stateDir (dirOf cfg.secretKeyFile)) "-${dirOf cfg.secretKeyFile}";
          };
      };

      systemd.services.narfs-watch = {
        description = "narfs: archive pinned Nix builds into the NAR cache";
        documentation = [ "file://${configFile}" ];
        wantedBy = [ "multi-user.target" ];
        requires = [ "narfs-init.service" ];
        after = [
          "local-fs.target"
          "nix-daemon.service"
          "narfs-init.service"
        ];
        path = [ config.nix.package ];
        inherit environment;
        serviceConfig =
          storeHardening
          // stateDirectory
          // {
            Type = "notify";
            # A no-op on NixOS, where Nix's directories exist; see narfs-watch.service.
            ExecStartPre = "+${pkgs.coreutils}/bin/mkdir -p /nix/store /nix/var/nix";
            ExecStart = "${narfs} watch";
            Restart = "always";
            RestartSec = "5s";
            TimeoutStopSec = 30;
            Nice = 10;
            CPUSchedulingPolicy = "batch";
            IOSchedulingClass = "best-effort";
            IOSchedulingPriority = 7;
            ReadWritePaths = writable ++ [ "-${cfg.rootsDir}" ];
          };
      };

      systemd.services.narfs-gc = {
        description = "narfs: retire old entries from the NAR cache";
        documentation = [ "file://${configFile}" ];
        after = [
          "local-fs.target"
          "narfs-init.service"
        ];
        path = [ config.nix.package ];
        inherit environment;
        serviceConfig =
          storeHardening
          // stateDirectory
          // {
            Type = "oneshot";
            ExecStart = concatStringsSep " " (
              [ "${narfs} gc" ]
              ++ optionals (cfg.gc.olderThan != null) [
                "--older-than"
                cfg.gc.olderThan
              ]
              ++ optionals (cfg.gc.maxSize != null) [
                "--max-size"
                cfg.gc.maxSize
              ]
            );
            Nice = 19;
            IOSchedulingClass = "idle";
            ReadWritePaths = writable;
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
      systemd.services.narfs-mount = {
        description = "narfs: mount the NAR archive at ${cfg.mountpoint}";
        documentation = [ "file://${configFile}" ];
        wantedBy = [ "multi-user.target" ];
        after = [
          "local-fs.target"
          "modprobe@fuse.service"
          "narfs-init.service"
        ];
        wants = [ "modprobe@fuse.service" ];
        inherit environment;
        serviceConfig = mountService mountHardening cfg.mountpoint cfg.mountpoint;
      };
    })

    (mkIf cfg.serve.enable {
      # The rules of nginx-narfs.conf: only what a Nix client asks for is served; narfs's own
      # state (.narfs/), temporaries (.narfs-tmp-*) and every directory listing are a 404.
      services.nginx = {
        enable = true;
        virtualHosts.${cfg.serve.virtualHost} = {
          serverName = cfg.serve.virtualHost;
          listen = map (addr: {
            inherit addr;
            inherit (cfg.serve) port;
          }) cfg.serve.listenAddresses;
          root = cfg.cacheDir;
          extraConfig = ''
            autoindex off;
            sendfile on;
            tcp_nopush on;
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
            "= /narfs-index.zst".extraConfig = ''
              types { }
              default_type application/zstd;
              add_header Cache-Control "no-cache";
            '';
            "~ \"^/[0-9a-df-np-sv-z]{32}\\.ls$\"".extraConfig = ''
              types { }
              default_type application/json;
            '';
            "~ \"^/[0-9a-df-np-sv-z]{32}\\.auth$\"".extraConfig = ''
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
      networking.firewall.allowedTCPPorts = mkIf cfg.serve.openFirewall [ cfg.serve.port ];
    })
  ]))
  ];
}
