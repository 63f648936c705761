"""User-facing errors.

Every error a user can cause by their input (recipe, paths, data, models) is a ``CompressError``
whose message names the cause, and so is a disk that fills while a stage writes (DiskFullError). The CLI
prints these without a traceback; anything else is a bug and keeps its traceback.
"""

import contextlib
from typing import Iterator


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


class DiskFullError(CompressError):
    """The disk filled while a stage wrote its outputs; nothing of that stage was published."""


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is the disk filling up: an OSError ENOSPC or EDQUOT
    (Python's own writes, torch.save), or a SafetensorError / RuntimeError that carries the OS message (safetensors'
    Rust writer reports 'No space left on device (os error 28)' as text only)."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def disk_full_named(stage: str, folder) -> Iterator[None]:
    """Raise a full disk inside the block as a one-line DiskFullError naming the stage and the folder it wrote.

    Wrapped around the runner's atomic write of a stage (whose temporary folder is removed on the way out, so the
    error leaves nothing half-written, and published stages and the cache index are untouched). Being no OSError,
    the flow's retry condition (``llm_compress.flows.pipeline.transient``) fails it at once: a retry would rerun
    the whole stage onto the same full disk.
    """
    try:
        yield
    except CompressError:
        raise
    except Exception as e:
        if not disk_full(e):
            raise
        cause = " ".join(f"{type(e).__name__}: {e}".split())
        raise DiskFullError(f"{stage}: no space left on device while writing {folder} (nothing of it was "
                            f"published; finished stages are intact): {cause}") from e
