"""The user-facing errors: each is one line, and the CLI turns it into exit code 2."""

from __future__ import annotations

from collections.abc import Sequence


class StudyError(Exception):
    """A bad value in a study file, a `--set`, or a trial config, named by its dotted path.

    `cli.py` catches it and exits with code 2; nothing else should print it.
    """

    def __init__(self, path: str, msg: str) -> None:
        self.path = path
        self.msg = msg
        super().__init__(f"{path}: {msg}" if path else msg)


class StudyErrors(StudyError):
    """Several `StudyError`s found in one pass, reported one per line."""

    def __init__(self, errors: Sequence[StudyError]) -> None:
        self.errors = list(errors)
        Exception.__init__(self, "\n".join(str(e) for e in self.errors))
        self.path = self.errors[0].path if self.errors else ""
        self.msg = str(self)


class UsageError(Exception):
    """A bad command-line flag or source (`SOURCE`, `--x`, `STUDY_DIR`, a locked output
    directory), not a study value: one line naming the flag, exit code 2."""

    def __init__(self, flag: str, msg: str) -> None:
        self.flag = flag
        self.msg = msg
        super().__init__(f"{flag}: {msg}" if flag else msg)


def raise_all(problems: Sequence[StudyError]) -> None:
    """Raise the one problem, or all of them together; nothing if there are none."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise StudyErrors(problems)


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """An error as one line for a message, a tag or a log: `Type: message` (just the text for a
    string), its whitespace collapsed, at most `limit` characters."""
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:limit]
