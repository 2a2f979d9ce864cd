"""Kynara sidecar: the permission daemon that runs beside each AI agent."""

__all__ = ["__version__"]

__version__ = "0.1.0"
