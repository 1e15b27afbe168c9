"""Optional dependencies: what only one command needs is an extra of the package, imported when that
command runs, and its absence is one line naming the extra to install.

    report:   matplotlib (the timeline PNG of `report`)
    bench:    fastapi, uvicorn (`bench stock`, the stock pipecat baseline)
    cascaded: pipecat-ai[openai] (configs/cascaded.yaml's speech-to-text, LLM and text-to-speech)
"""

import importlib
from types import ModuleType


class MissingExtra(Exception):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`module`, imported; or MissingExtra: "<purpose> needs <module>: pip install 'call-pipelines[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there but broken: that is not a missing extra
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}, not installed: "
                           f"pip install 'call-pipelines[{extra}]'") from None
