"""Outrigger: a sidecar resilience proxy for calling third-party HTTP APIs."""

__version__ = "0.1.0"
