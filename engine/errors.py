"""Errors the engine raises, so callers (CLI, server, profiler) can tell bad input from bad luck."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(EngineError, ValueError):
    """A model, preset, weight file or argument is invalid; the message names the field and value."""


class CapacityError(EngineError):
    """The KV-cache pool cannot hold what was asked (a request, or a profiling point)."""


class RequestError(EngineError, ValueError):
    """A request is invalid (e.g. prompt longer than the context, bad sampling parameters)."""
