"""User-facing errors.

Every error a user can cause by their input (recipe, paths, data, models) is a ``CompressError``
whose message names the cause. The CLI prints these without a traceback; anything else is a bug
and keeps its traceback.
"""


class CompressError(Exception):
    """Base class: an error caused by input, with a message that names the cause."""


class RecipeError(CompressError):
    """The recipe is malformed or invalid (bad YAML, unknown field, bad value, unbuilt stage)."""


class InputError(CompressError):
    """A model, tokenizer or data input is missing, corrupt or incompatible."""


class TrainingError(CompressError):
    """Training diverged (NaN/inf loss) or cannot proceed."""


class GateError(CompressError):
    """A quality gate set in the recipe was missed."""


class ExportError(CompressError):
    """An exported artifact failed to load back or did not match its source."""
