"""One error type for everything the user can get wrong.

Every message names the parameter, the value that was given and how to fix it, so a user never has to read
a traceback from deep inside torch to learn what they did.
"""

from __future__ import annotations


class LayerExitError(ValueError):
    """A bad parameter, input file or checkpoint."""


class NotFittedError(LayerExitError):
    """A rule that learns from validation data was used before `fit`."""


def bad_value(param: str, value: object, fix: str) -> LayerExitError:
    """Build the standard message: ``<param>=<value!r> is invalid: <fix>``."""
    return LayerExitError(f"{param}={value!r} is invalid: {fix}")
