"""User-facing errors: the CLI prints their message on one line (no traceback unless --debug)."""


class CostDistError(Exception):
    """Base of every error caused by input, configuration or run-directory state (not by a bug)."""


class DataError(CostDistError, ValueError):
    """Input data that does not fit the data contracts (missing columns, empty catalog, ...)."""


class CheckpointError(CostDistError):
    """A checkpoint that is missing, corrupt, or does not fit the model/config."""
