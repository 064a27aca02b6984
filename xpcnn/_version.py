"""The version of xpcnn (read by the package, the CLI and checkpoints)."""

__version__ = "0.1.0"
