"""Errors the CLI turns into exit statuses."""

from pydantic import ValidationError


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


def validation_problem(exc: ValidationError) -> tuple[tuple, str]:
    """pydantic's first error as (key path, one-line problem) in the words our error lines use."""
    first = exc.errors()[0]
    problem = first["msg"]
    if first["type"] == "extra_forbidden":
        problem = "unknown key"
    elif first["type"] == "missing":
        problem = "required key is missing"
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        problem += f" (got {first['input']!r})"
    return tuple(first["loc"]), problem
