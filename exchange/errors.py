"""Domain errors: one exception type carrying a stable machine code, as the API reports them."""

from __future__ import annotations


class CarbonxError(Exception):
    """A request that was refused. Nothing it asked for was changed.

    `code` is the stable machine code (API.md: `insufficient_credits`, `not_found`, …) and the
    message is meant for a person.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"
