"""The one exception type the CLI turns into a clean error message (exit code 2).

Every error caused by user input (bad recipe, bad model folder, bad data line) derives from
:class:`UmmError`; its message names what is wrong and, where there is one, what to do instead.
"""


class UmmError(Exception):
    """An error in the user's input or environment, reported without a traceback."""
