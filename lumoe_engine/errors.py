"""The project's shared error types (torch-free: the request intake imports them without loading a model).

``RequestError`` is the one error for a removal request that cannot be accepted or learned as given: a malformed
file, an empty forget set, an unknown entity, an image that will not open. Its message names the request, the field
and the file, and says what to do; nothing is trained, saved or routed for such a request.
"""
from __future__ import annotations

from typing import Optional


class RequestError(ValueError):
    """A request that cannot be accepted or learned. The message names the request, the field, the file and what
    to do.

    file: the request file (None for in-memory requests); field: e.g. ``"forget[3].image"`` (None for the whole
    request); index: the item index when the error is about one QA item.
    """

    def __init__(self, message: str, file: Optional[str] = None, field: Optional[str] = None,
                 index: Optional[int] = None):
        super().__init__(message)
        self.file, self.field, self.index = file, field, index


class ExpertCollapseError(RuntimeError):
    """A trained expert answers its own validation queries with gibberish (``unlearn.collapse.collapse_check``); it
    is not saved, and its request fails alone."""


__all__ = ["RequestError", "ExpertCollapseError"]
