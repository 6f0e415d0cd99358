"""The one exception conversion raises for problems a user can fix."""


class ConversionError(Exception):
    """A conversion that cannot proceed; the message says what is wrong and how to fix it.

    Raised before anything is written where possible; raised later, the temporary folder is removed first, so a
    failed conversion never leaves a partial output behind.
    """
