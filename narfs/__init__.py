"""narfs: a cold tier for the Nix store that feels like a filesystem."""

__version__ = "0.1.0"
