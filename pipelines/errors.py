"""Errors the CLI turns into exit statuses."""


class ConfigError(Exception):
    """A deployment file that cannot run; the message is one line: file:line: key: problem."""

    def __init__(self, file: str, line: int | None, key: str, problem: str):
        self.file, self.line, self.key, self.problem = file, line, key, problem
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key or '<top>'}: {problem}")


class ParamsError(ValueError):
    """A processor's `prepare` step rejected its params; `loc` is the key path inside `params:`."""

    def __init__(self, loc: tuple, problem: str):
        self.loc, self.problem = loc, problem
        super().__init__(problem)
