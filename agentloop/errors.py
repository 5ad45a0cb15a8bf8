"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class AgentloopError(Exception):
    """A problem with the user's input or environment, phrased as: what is wrong, and what to do."""

    exit_code = 2


class CapExceeded(AgentloopError):
    """The next step does not fit under the memory cap and the policy could not free enough room."""

    exit_code = 3


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT (the CLI installs the handler), so that
    the run unwinds and its trace ends with a record saying so. Exit code 143."""
