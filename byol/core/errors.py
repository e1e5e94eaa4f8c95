"""User-facing errors: entry points print their message without a stack trace."""


class ByolError(Exception):
    """A problem the user can fix; the message names it and says how.

    ``exit_code`` is the process status the entry point exits with.
    """

    exit_code = 1


class ConfigError(ByolError):
    """An invalid configuration value (unknown tap, backbone, option...)."""


class UnknownTap(ConfigError):
    """A tap that is no module of the network: the jobs say which setting (loss, monitor, repr) names it."""


class DataError(ByolError):
    """A missing, empty or unreadable dataset."""


class CheckpointError(ByolError):
    """A checkpoint that cannot be used: unsafe, corrupt, or of another architecture."""


class NonFiniteLossError(ByolError):
    """The loss became NaN or infinite; nothing non-finite was saved."""


class Interrupted(ByolError):
    """A preemption signal stopped training after ``last.ckpt`` was saved.

    The exit status is ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1), what a
    shell reports for a process killed by that signal, so schedulers treat the job as
    preempted and requeue it; in a sweep it stops the remaining jobs too.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
