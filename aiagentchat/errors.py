"""Errors shared by the daemon and `cchat` that must not cost their importers the settings' pydantic models."""


class ConfigError(Exception):
    """A settings problem a person must fix; the message names the key and, when known, the line."""
