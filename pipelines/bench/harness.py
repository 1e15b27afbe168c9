"""What every bench run shares: its exit statuses, its own command line, its JSON result."""

import json
import signal
import sys
import time
from pathlib import Path


def guarded(body) -> int:
    """Run `body()`; SIGTERM and Ctrl-C stop the children on the way out (130); an unusable deployment
    file is a usage error (2), a child that does not start an error (1)."""
    from pipelines.errors import ConfigError

    def terminated(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def command_argv(default: list[str]) -> list[str]:
    """The arguments after `python -m pipelines`, as run (tests call the bench functions directly)."""
    return sys.argv[1:] if sys.argv and sys.argv[0].endswith("__main__.py") else default


def write_json(path: str | None, kind: str, result: dict) -> Path:
    """`path`, or bench-results/KIND-<UTC stamp>.json; the directory is created."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(path or f"bench-results/{kind}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return out


def int_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(header: list[str], rows: list[list], first_width: int = 8) -> str:
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
    widths = [max(first_width, widths[0])] + [max(w, 5) for w in widths[1:]]
    lines = []
    for row in [header, *rows]:
        cells = [f"{row[0]!s:<{widths[0]}}"] + [f"{v!s:>{w}}" for v, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def machine_lines(argv: list[str]) -> list[str]:
    import os
    import platform
    import shlex
    from importlib.metadata import version

    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return [
        f"machine: {os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, pipecat-ai {version('pipecat-ai')}",
        f"command: python -m pipelines {shlex.join(argv)}",
    ]
