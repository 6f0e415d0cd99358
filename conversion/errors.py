"""The exceptions conversion raises: problems a user can fix, and interruptions that say what was written."""


class ConversionError(Exception):
    """A conversion that cannot proceed; the message says what is wrong and how to fix it.

    Raised before anything is written where possible; raised later, the temporary folder is removed first, so a
    failed conversion never leaves a partial output behind.
    """


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, from the command line) during a conversion; the message says what is on disk.

    A `KeyboardInterrupt`, so code that stops on Ctrl-C keeps doing so.
    """
