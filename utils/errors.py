"""The one exception type for user mistakes.

Anything a user can get wrong (a missing dataset, a checkpoint of another
model, an unwritable directory) raises :class:`UsageError` with a message that
fits on one line and says how to fix it. The entry scripts turn it into that
line on stderr and exit status 2; everything else is a bug and keeps its
traceback.
"""


class UsageError(Exception):
    """A user mistake, reported as one line and exit status 2."""


class TrainingDiverged(Exception):
    """A non-finite loss or gate logit: the run stops instead of training on."""
