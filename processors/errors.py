"""What a processor's `prepare` step raises; the builder turns it into a config error with the line."""


class ParamsError(ValueError):
    """A processor's `prepare` step rejected its params; `loc` is the key path inside `params:`."""

    def __init__(self, loc: tuple, problem: str):
        self.loc, self.problem = loc, problem
        super().__init__(problem)
