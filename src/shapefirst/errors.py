"""One exception for everything a user can get wrong: its message is one line, problem + fix."""


class ShapefirstError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with code 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
