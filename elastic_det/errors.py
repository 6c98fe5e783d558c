"""The one exception type that reaches the user as a clear, one-paragraph message."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, storage).

    The CLI prints ``str(error)`` as a single paragraph and exits with :data:`USER_ERROR_EXIT_CODE`;
    no traceback, because the message already names the culprit.
    """


class ConfigError(UserError):
    """A config file or override that does not match the schema."""


class DataError(UserError):
    """A dataset that is missing, unreadable or malformed."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, verified or applied to the model."""


class StorageError(UserError):
    """A work dir or bucket that cannot be reached or written."""


USER_ERROR_EXIT_CODE = 2
"""Exit code for bad input. torchrun treats any non-zero exit as a failure; see README for restarts."""

PREEMPTED_EXIT_CODE = 143
"""Exit code after a preemption checkpoint (128 + SIGTERM).

Not a success, so schedulers restart the job; Kubeflow's ``ExitCode`` restart policy treats 128-255 as
retryable, and Slurm scripts requeue on it.
"""
