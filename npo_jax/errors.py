"""The errors the CLI reports cleanly: bad input (exit code 2) and a preempted training run (75)."""


class NpoJaxError(Exception):
    """Bad input (a file, field or tensor) the user can fix; the message names it."""


class ConfigError(NpoJaxError):
    """An HF config.json field that is missing or has a value we do not support."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after its checkpoint was written; `--resume` continues.

    The CLI exits with `exit_code` (75, EX_TEMPFAIL: "try again"), so a job scheduler can tell a
    preemption (requeue with --resume) from a failure (2) or a finished run (0).
    """

    exit_code = 75
