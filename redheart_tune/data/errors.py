"""The one exception type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Input data is missing, malformed or cannot be fetched.

    The message names the file (and, for record files, the record's index, id and
    field) and says what to do about it.
    """
