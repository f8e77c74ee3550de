"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class ShimError(Exception):
    """Something the user can fix; the message names the thing and the fix."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
