"""The one error class for mistakes a user can fix (a wrong path, unreadable images, a bad
CSV or config): the command-line tools print its message on one line and exit 2, without a
traceback (`jaxmed.cli.main_guard`). A ValueError, so callers that catch bad values still
catch it."""

from __future__ import annotations


class UserError(ValueError):
    """Raised for input a user can correct; the message says what to change."""
