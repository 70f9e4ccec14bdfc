"""User-facing errors: one exception type whose message is the paragraph a person reads.

Everything the CLI and the app can explain to a user raises `FinetuneError(problem, fix)`. The CLI
prints it and exits 2 (no traceback unless --debug); the app shows it with `gr.Error`.
"""


class FinetuneError(Exception):
    """A problem the user can fix. `str(err)` is one readable paragraph: the problem, then the fix."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem.strip()
        self.fix = fix.strip()
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem} {self.fix}".strip()


class ConfigError(FinetuneError):
    """The run configuration is invalid (unknown key, bad value, impossible combination)."""


class DataError(FinetuneError):
    """A data file cannot be read or does not fit the task."""


class ModelError(FinetuneError):
    """A model id or directory cannot be resolved or loaded."""
