"""The one user-facing error: a bad value at a dotted path of the study."""


class StudyError(Exception):
    """A problem with user input, reported as one line naming its dotted path.

    `cli.py` catches it and exits with code 2; nothing else should print it.
    Several problems found together are joined, one per line.
    """

    def __init__(self, path: str, msg: str) -> None:
        self.path = path
        self.msg = msg
        super().__init__(f"{path}: {msg}" if path else msg)


class StudyErrors(StudyError):
    """Several `StudyError`s found in one pass, reported one per line."""

    def __init__(self, errors: list[StudyError]) -> None:
        self.errors = errors
        Exception.__init__(self, "\n".join(str(e) for e in errors))
        self.path = errors[0].path if errors else ""
        self.msg = str(self)
