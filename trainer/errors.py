"""The one exception type for a user's mistake: the CLI prints it as a single line and exits 2."""


class StepwiseError(Exception):
    """A user's mistake (bad flag, file, line or checkpoint), reported as one line naming it."""
