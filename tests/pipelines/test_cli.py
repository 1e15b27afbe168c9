"""The command line itself: --version, the console script, `init`, names of shipped deployments and
recordings, `call --url` with a server's base URL, no pipecat banner unless asked, a closed stdout."""

import os
import subprocess
import sys
from importlib.metadata import entry_points, version
from pathlib import Path

import pytest

from pipelines import builder, cli, config
from pipelines.bench.launch import free_port, launched, run_command
from pipelines.errors import ConfigError
from pipelines.extras import MissingExtra, require
from pipelines.sim.speech import FIXTURES

ROOT = Path(__file__).resolve().parents[2]
BANNER = "ᓚᘏᗢ"


def run_cli(*args, cwd=ROOT, env_extra=None, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PERSONAPLEX_URL", cli.BANNER_ENV)}
    env["PYTHONPATH"] = str(ROOT)  # from any directory, this checkout's package
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pipelines", *args], check=False, cwd=cwd, text=True, env=env, timeout=60,
                          **({"capture_output": True} | kwargs))


def test_version_is_the_installed_packages():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"call-pipelines {version('call-pipelines')}"


def test_the_console_script_is_the_same_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "call-pipelines"] or [None]
    if script is None:  # an editable install made before the script was declared
        import tomllib

        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        assert scripts == {"call-pipelines": "pipelines.cli:main"}
    else:
        assert script.value == "pipelines.cli:main"
    assert (ROOT / "pipelines" / "__main__.py").read_text().count("from pipelines.cli import main") == 1


def test_no_pipecat_banner_unless_asked(tmp_path):
    quiet = run_cli("validate", "exotel.yaml", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert BANNER not in quiet.stderr + quiet.stdout
    for asked in (run_cli("-v", "validate", "exotel.yaml", cwd=tmp_path),
                  run_cli("validate", "exotel.yaml", cwd=tmp_path, env_extra={cli.BANNER_ENV: "1"})):
        assert asked.returncode == 0, asked.stderr
        assert BANNER in asked.stderr


def test_a_closed_stdout_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # `list | head -1` once head has gone
    try:
        result = run_cli("list", stdout=write, stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(write)
    assert result.returncode == 141  # as a shell tool killed by SIGPIPE
    assert result.stderr == ""


def test_shipped_deployments_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("exotel.yaml", "exotel", "twilio.yaml", "browser"):
        path = config.resolve_path(name)
        assert path.parent == config.CONFIG_DIR and path.name == Path(name).with_suffix(".yaml").name
    (tmp_path / "exotel.yaml").write_text("transport: {type: exotel}\n")
    assert config.resolve_path("exotel.yaml") == Path("exotel.yaml")  # a file here wins
    with pytest.raises(ConfigError) as info:
        config.resolve_path("nope.yaml")
    assert str(config.CONFIG_DIR) in info.value.problem and "init" in info.value.problem
    with pytest.raises(ConfigError):
        config.resolve_path("elsewhere/exotel.yaml")  # a path is a path: no fallback


def test_init_writes_editable_copies_that_run_and_refuses_to_overwrite(tmp_path):
    dest = tmp_path / "mine"
    result = run_cli("init", str(dest), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert {"exotel.yaml", "twilio.yaml", "browser.yaml", "cascaded.yaml", "clips/greeting.wav",
            "clips/one_moment.wav", "clips/apology.wav"} <= set(written)
    assert not any(part.startswith("kubernetes") for part in written)
    assert written == sorted(str(p) for p in cli.shipped_files())
    for rel in written:
        assert (dest / rel).read_bytes() == (config.CONFIG_DIR / rel).read_bytes()

    # the copy is self-contained: its clips are the ones next to it, not the shipped ones
    (dest / "clips" / "greeting.wav").write_bytes((dest / "clips" / "one_moment.wav").read_bytes())
    plan = builder.plan(config.load(dest / "exotel.yaml", {}))
    (holding,) = [p for p in plan.processors if p.entry.name == "holding"]
    assert holding.prepared.get("greeting", 8000) == holding.prepared.get("one_moment", 8000)

    (dest / "exotel.yaml").write_text("# mine\n")
    again = run_cli("init", str(dest), cwd=tmp_path)
    assert again.returncode == 1 and "--force" in again.stderr and "exotel.yaml" in again.stderr
    assert (dest / "exotel.yaml").read_text() == "# mine\n"
    forced = run_cli("init", str(dest), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert (dest / "exotel.yaml").read_bytes() == (config.CONFIG_DIR / "exotel.yaml").read_bytes()


def _transport(name: str):
    plan = builder.plan(config.load(name, {}))
    return plan.loaded.config.server, plan.transport_params


@pytest.mark.parametrize("provider,given,dialled", [
    ("twilio", None, "http://127.0.0.1:5050/twilio/twiml"),
    ("twilio", "http://10.0.0.5:6000", "http://10.0.0.5:6000/twilio/twiml"),
    ("twilio", "https://bot.example.com/", "https://bot.example.com/twilio/twiml"),
    ("twilio", "http://h:1/voice?persona=sales", "http://h:1/voice?persona=sales"),
    ("twilio", "ws://h:1", "ws://h:1/twilio"),
    ("twilio", "wss://h:1/stream", "wss://h:1/stream"),
    ("exotel", None, "ws://127.0.0.1:5050/exotel"),
    ("exotel", "http://h:7000", "ws://h:7000/exotel"),
    ("exotel", "https://h", "wss://h/exotel"),
    ("exotel", "ws://h:7000/?sample-rate=16000", "ws://h:7000/exotel?sample-rate=16000"),
    ("exotel", "ws://h:7000/other", "ws://h:7000/other"),
    ("browser", "http://localhost:5050", "ws://localhost:5050/browser/ws"),
])
def test_call_url_takes_the_servers_base_url(provider, given, dialled):
    server, tp = _transport(f"{provider}.yaml")
    assert cli.dial_url(given, provider, server, tp) == dialled


@pytest.mark.parametrize("given", ["localhost:5050", "ftp://h/x", "/twilio/twiml"])
def test_call_url_that_is_no_url_is_one_line(given):
    server, tp = _transport("twilio.yaml")
    with pytest.raises(ValueError, match="base URL"):
        cli.dial_url(given, "twilio", server, tp)


def test_call_audio_by_the_name_of_a_shipped_recording(tmp_path):
    assert cli.caller_audio("question_8k.wav") == FIXTURES / "question_8k.wav"
    assert cli.caller_audio("interrupt_16k") == FIXTURES / "interrupt_16k.wav"
    own = tmp_path / "mine.wav"
    own.write_bytes(b"RIFF")
    assert cli.caller_audio(str(own)) == own
    with pytest.raises(ValueError, match="question_8k.wav"):
        cli.caller_audio("nothing.wav")


def test_twilio_call_to_the_servers_base_url(tmp_path):
    port = free_port()
    with launched(run_command("twilio.yaml", port), port, env={**os.environ, "TWILIO_AUTH_TOKEN": ""}):
        result = run_cli("call", "twilio.yaml", "--url", f"http://127.0.0.1:{port}", "--audio", "question_8k.wav",
                         "--delay", "0.2", "--seconds", "2.5", "--out", str(tmp_path / "heard.wav"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0 protocol violations" in result.stdout and (tmp_path / "heard.wav").stat().st_size > 1000
    assert "Traceback" not in result.stderr


def test_a_call_nobody_answers_is_one_line(tmp_path):
    port = free_port()  # nothing listens there
    result = run_cli("call", "twilio.yaml", "--url", f"http://127.0.0.1:{port}", "--audio", "question_8k",
                     "--out", str(tmp_path / "heard.wav"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: the call to http://127.0.0.1:{port}/twilio/twiml failed")
    assert "Traceback" not in result.stderr


def test_a_missing_extra_names_the_pip_line(monkeypatch):
    with pytest.raises(MissingExtra, match=r"pip install 'call-pipelines\[report\]'"):
        require("no_such_module_here", "report", "the timeline picture")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"the timeline picture needs matplotlib.*call-pipelines\[report\]"):
        require("matplotlib", "report", "the timeline picture")


def test_report_without_matplotlib_prints_the_summary_then_the_pip_line(tmp_path, capsys, monkeypatch):
    record = tmp_path / "call"
    record.mkdir()
    (record / "events.jsonl").write_text('{"t": 0.0, "event": "call_started", "call_id": "c1", "provider": "exotel"}\n'
                                         '{"t": 1.0, "event": "call_ended", "reason": "completed"}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["report", str(record)]) == 1
    out, err = capsys.readouterr()
    assert "c1" in out
    assert err.strip() == "error: the timeline picture needs matplotlib, not installed: pip install 'call-pipelines[report]'"
    assert not (record / "timeline.png").exists()


def test_readme_command_table_names_every_command():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Command line"):]
    table = table[: table.index("\n## ", 1)]
    commands = {name for name in cli.parser()._subparsers._group_actions[0].choices}
    for command in commands:
        assert f"python -m pipelines {command}" in table, command
    for also in ("--version", "call-pipelines", "init DIR", "-v"):
        assert also in table, also


def test_no_shipped_module_imports_tests():
    import ast

    for package in ("pipelines", "processors", "transports"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                assert not any(n == "tests" or n.startswith("tests.") for n in names), path

