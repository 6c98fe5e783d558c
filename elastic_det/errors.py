"""The error taxonomy: every failure that reaches the user is one of these, with one exit code each.

The CLIs print ``str(error)`` as a single paragraph (no traceback: the message names the culprit) and exit
with the class's ``exit_code``. Launchers and the supervisor act on the code alone:

====  =====================  =====================================================================
code  class                  what a launcher does
====  =====================  =====================================================================
0     (done)                 nothing: training finished
2     UserError              final: bad input (config, data, checkpoint, bucket); relaunching cannot help
3     WorkDirOwnedError      final: another writer committed to this work dir; stop now
4     (supervisor only)      final: no attempt committed a checkpoint K times in a row; giving up
65    NonFiniteError         final: a non-finite loss (train.nonfinite) or a checkpoint refused for a
                             non-finite tensor; relaunching resumes into the same divergence (EX_DATAERR)
75    InfrastructureError    retryable: storage or network outage (EX_TEMPFAIL)
143   (preempted)            retryable: stopped by a preemption signal after its checkpoint; requeue
====  =====================  =====================================================================
"""

from __future__ import annotations

DONE_EXIT_CODE = 0
USER_ERROR_EXIT_CODE = 2
WORK_DIR_OWNED_EXIT_CODE = 3
NO_PROGRESS_EXIT_CODE = 4
INFRASTRUCTURE_EXIT_CODE = 75
NONFINITE_EXIT_CODE = 65
"""Training diverged: a non-finite loss (``train.nonfinite``: stop, or skip past its patience) or a save
refused because the state holds a non-finite tensor. Final: a relaunch would resume from the newest good
checkpoint into the same divergence; lower the learning rate, fix the data, or resume from an earlier step."""
PREEMPTED_EXIT_CODE = 143
"""Exit code after a preemption checkpoint (128 + SIGTERM).

Not a success, so schedulers restart the job; Kubeflow's ``ExitCode`` restart policy treats 128-255 as
retryable, and the Slurm script requeues on it.
"""

FINAL_EXIT_CODES = frozenset({USER_ERROR_EXIT_CODE, WORK_DIR_OWNED_EXIT_CODE, NO_PROGRESS_EXIT_CODE,
                              NONFINITE_EXIT_CODE})
"""Codes after which no launcher may start the job again."""


class ElasticDetError(Exception):
    """Base of every error the CLIs turn into one paragraph and ``exit_code``."""

    exit_code = 1


class UserError(ElasticDetError):
    """Bad input from the user (config, data, checkpoint, storage location): final."""

    exit_code = USER_ERROR_EXIT_CODE


class ConfigError(UserError):
    """A config file or override that does not match the schema."""


class DataError(UserError):
    """A dataset that is missing, unreadable or malformed."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, verified or applied to the model."""


class StorageError(UserError):
    """A work dir or bucket that does not exist, denies access, or is not a valid location: final."""


class InfrastructureError(ElasticDetError):
    """Storage or network failing for now (timeouts, refused connections, 5xx, a full disk): retryable."""

    exit_code = INFRASTRUCTURE_EXIT_CODE


class StorageUnavailableError(InfrastructureError):
    """A work dir or bucket that exists but cannot be reached or written at the moment."""


class WorkDirOwnedError(ElasticDetError):
    """Another writer committed a newer checkpoint to this work dir: two runs share it; stop now."""

    exit_code = WORK_DIR_OWNED_EXIT_CODE


class NonFiniteError(ElasticDetError):
    """Training diverged: a loss or a state tensor is NaN or infinite (see ``NONFINITE_EXIT_CODE``)."""

    exit_code = NONFINITE_EXIT_CODE


class NonFiniteStateError(NonFiniteError):
    """A checkpoint refused before its commit: a parameter, buffer or optimizer moment is not finite."""


def exit_code_for(error: BaseException) -> int:
    """The exit code a CLI returns for ``error`` (1 for anything outside the taxonomy)."""
    return error.exit_code if isinstance(error, ElasticDetError) else 1
