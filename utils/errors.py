"""The one exception type for user mistakes.

Anything a user can get wrong (a missing dataset, a checkpoint of another
model, an unwritable directory) raises :class:`UsageError` with a message that
fits on one line and says how to fix it. The entry scripts turn it into that
line on stderr and exit status 2; everything else is a bug and keeps its
traceback.
"""
import sys

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75   # stopped by a signal after saving; resubmit with --resume auto


class UsageError(Exception):
    """A user mistake, reported as one line and exit status 2."""


class TrainingDiverged(Exception):
    """A non-finite loss or gate logit: the run stops instead of training on."""


def brief(text: str, limit: int = 120) -> str:
    """The first line of ``text``, cut at a word boundary to at most ``limit`` characters (a quoted
    library message inside one of ours must not end mid-word)."""
    line = (text.strip().splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def one_line(error: Exception) -> str:
    """The message of an error; one re-raised from a DataLoader worker carries
    the worker's traceback, of which only the last line is the message."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1].removeprefix(f"{type(error).__module__}.{type(error).__name__}: ")


def run_reporting_errors(prog: str, action) -> int:
    """Run ``action()`` and return its exit status (0 unless it returns an int);
    a user mistake or a diverged run becomes one line on stderr and status 2 or 3."""
    try:
        status = action()
        return status if isinstance(status, int) else 0
    except UsageError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
