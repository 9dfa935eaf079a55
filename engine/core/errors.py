"""Errors a user can cause. The CLI prints them as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem in something the user gave us (config, data, path, argument).

    ``problems`` holds one line per problem; ``str()`` joins them.
    """

    exit_code = 2

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass
