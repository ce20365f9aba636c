"""The two ways a run ends early, each with a one-line message for the user."""


class RodeError(Exception):
    exit_code = 1


class ConfigError(RodeError):
    """Bad input: a config value, a path, a choice. Exit code 2, nothing is run."""

    exit_code = 2


class RunFailed(RodeError):
    """The job started but could not finish (e.g. the loss diverged). Exit code 1."""

    exit_code = 1


class Interrupted(RodeError):
    """The run was asked to stop (SIGTERM, SIGINT, SIGUSR1/2) and checkpointed first.
    Exit code 128 + the signal number, as a shell reports a killed command."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
