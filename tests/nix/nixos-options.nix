# The NixOS options systemd/narfs.nix sets, declared with the types NixOS declares them with
# (nixos/modules: system/boot/systemd.nix and systemd-unit-options.nix, config/nix.nix,
# services/web-servers/nginx/{default,vhost-options,location-options}.nix, system/etc/etc.nix,
# config/system-path.nix, misc/assertions.nix, services/networking/firewall.nix), so that
# lib.evalModules type-checks and merges the module's definitions as NixOS does: a wrong
# type, a misspelt option or a conflicting definition fails here as it would in nixos-rebuild.
# Only the options the module touches; what NixOS itself defines for them is defined too.
{ lib, config, ... }:

let
  inherit (lib) mkOption types;

  # systemd's name syntax, as NixOS checks unit names in wantedBy, after, ...
  unitName = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";
  unitNames = mkOption {
    type = types.listOf unitName;
    default = [ ];
  };

  # A [Service]/[Timer]/[Unit] value: lists are concatenated across definitions (each element
  # one line), anything else must be defined once or identically.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    check = v: builtins.isList v || lib.isStringLike v || builtins.isBool v || builtins.isInt v;
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (d: builtins.isList d.value) defs' then
        lib.concatMap (d: lib.toList d.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };
  # NixOS rejects values systemd would not know for these.
  valueIn =
    key: allowed: section:
    !(section ? ${key}) || builtins.elem section.${key} allowed;
  serviceSection = types.addCheck (types.attrsOf unitOption) (
    s:
    valueIn "Type" [
      "exec"
      "simple"
      "forking"
      "oneshot"
      "dbus"
      "notify"
      "notify-reload"
      "idle"
    ] s
    && valueIn "Restart" [
      "no"
      "on-success"
      "on-failure"
      "on-abnormal"
      "on-abort"
      "on-watchdog"
      "always"
    ] s
  );

  unit = {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
      };
      description = mkOption {
        type = types.singleLineStr;
        default = "";
      };
      documentation = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wantedBy = unitNames;
      requiredBy = unitNames;
      before = unitNames;
      after = unitNames;
      wants = unitNames;
      requires = unitNames;
      bindsTo = unitNames;
      partOf = unitNames;
      conflicts = unitNames;
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      restartTriggers = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
    };
  };

  service = {
    imports = [ unit ];
    options = {
      environment = mkOption {
        type =
          with types;
          attrsOf (
            nullOr (oneOf [
              str
              path
              package
            ])
          );
        default = { };
      };
      path = mkOption {
        type =
          with types;
          listOf (oneOf [
            package
            str
          ]);
        default = [ ];
      };
      serviceConfig = mkOption {
        type = serviceSection;
        default = { };
      };
      script = mkOption {
        type = types.lines;
        default = "";
      };
      preStart = mkOption {
        type = types.lines;
        default = "";
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      stopIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      startAt = mkOption {
        type = with types; either str (listOf str);
        default = [ ];
      };
    };
  };

  timer = {
    imports = [ unit ];
    options.timerConfig = mkOption { type = types.attrsOf unitOption; };
  };

  # nix.conf values: NixOS's semanticConfType.
  confAtom = types.nullOr (
    types.oneOf [
      types.bool
      types.int
      types.float
      types.str
      types.path
      types.package
    ]
  );

  location = {
    options = {
      root = mkOption {
        type = types.nullOr types.path;
        default = null;
      };
      alias = mkOption {
        type = types.nullOr types.path;
        default = null;
      };
      index = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      tryFiles = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      return = mkOption {
        type =
          with types;
          nullOr (oneOf [
            str
            int
          ]);
        default = null;
      };
      proxyPass = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      extraConfig = mkOption {
        type = types.lines;
        default = "";
      };
      priority = mkOption {
        type = types.int;
        default = 1000;
      };
    };
  };

  listen = {
    options = {
      addr = mkOption { type = types.str; };
      port = mkOption {
        type = types.nullOr types.port;
        default = null;
      };
      ssl = mkOption {
        type = types.bool;
        default = false;
      };
      proxyProtocol = mkOption {
        type = types.bool;
        default = false;
      };
      extraParameters = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
    };
  };

  virtualHost = {
    options = {
      serverName = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      serverAliases = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      listen = mkOption {
        type = types.listOf (types.submodule listen);
        default = [ ];
      };
      listenAddresses = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      default = mkOption {
        type = types.bool;
        default = false;
      };
      root = mkOption {
        type = types.nullOr types.path;
        default = null;
      };
      forceSSL = mkOption {
        type = types.bool;
        default = false;
      };
      enableACME = mkOption {
        type = types.bool;
        default = false;
      };
      locations = mkOption {
        type = types.attrsOf (types.submodule location);
        default = { };
      };
      extraConfig = mkOption {
        type = types.lines;
        default = "";
      };
    };
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };
    environment.etc = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            enable = mkOption {
              type = types.bool;
              default = true;
            };
            text = mkOption {
              type = types.nullOr types.lines;
              default = null;
            };
            source = mkOption {
              type = types.nullOr types.path;
              default = null;
            };
            mode = mkOption {
              type = types.str;
              default = "symlink";
            };
          };
        }
      );
      default = { };
    };

    systemd.services = mkOption {
      type = types.attrsOf (types.submodule service);
      default = { };
    };
    systemd.timers = mkOption {
      type = types.attrsOf (types.submodule timer);
      default = { };
    };
    systemd.tmpfiles.rules = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    nix.package = mkOption { type = types.package; };
    nix.extraOptions = mkOption {
      type = types.lines;
      default = "";
    };
    nix.settings = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf (types.either confAtom (types.listOf confAtom));
        options = {
          substituters = mkOption { type = types.listOf types.str; };
          trusted-public-keys = mkOption { type = types.listOf types.str; };
          trusted-substituters = mkOption {
            type = types.listOf types.str;
            default = [ ];
          };
        };
      };
      default = { };
    };

    networking.enableIPv6 = mkOption {
      type = types.bool;
      default = true;
    };
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };

    services.nginx = {
      enable = mkOption {
        type = types.bool;
        default = false;
      };
      defaultListenAddresses = mkOption {
        type = types.listOf types.str;
        default = [ "0.0.0.0" ] ++ lib.optional config.networking.enableIPv6 "[::0]";
      };
      virtualHosts = mkOption {
        type = types.attrsOf (types.submodule virtualHost);
        default = { };
      };
    };
  };

  # What NixOS itself defines for these (config/nix.nix).
  config.nix.settings = {
    substituters = lib.mkAfter [ "https://cache.nixos.org/" ];
    trusted-public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
  };
}
