"""Errors of the service layer."""


class ConfigError(Exception):
    """A setting or the policy file is invalid. The message names it and fits on one line."""
