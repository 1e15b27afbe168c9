"""The deployment loader: env substitution, and errors that name file, line and key (exit 2)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import builder, config
from pipelines.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
server:
  port: ${PORT:-5050}
transport:
  type: exotel
  params:
    path: /exotel
engine:
  urls: ${PERSONAPLEX_URL:-}
processors:
  - type: resample
    params: {audio: input, rate: 24000}
  - type: personaplex
    params:
      voice_prompt: ${VOICE:-NATF0.pt}
  - type: resample
    params: {audio: output, rate: call}
"""


def write(tmp_path, text, name="deploy.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_plan(path, env=None):
    return builder.plan(config.load(path, env or {}))


def error_of(path, env=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_plan(path, env)
    return info.value


def test_shipped_exotel_config_is_valid():
    deployment = load_plan("exotel.yaml")
    cfg = deployment.loaded.config
    assert cfg.server.port == 5050 and deployment.transport_params.path == "/exotel"
    assert cfg.engine.urls == [] and cfg.engine.local_engines >= 2
    assert [p.entry.name for p in deployment.processors] == [
        "vad", "turn", "barge_in", "resample", "personaplex", "bot_speech", "resample", "holding", "pacer"]


@pytest.mark.parametrize("name", ["exotel.yaml", "twilio.yaml", "browser.yaml"])
def test_every_shipped_call_config_runs_the_conversation_core(name):
    """Only the transport differs between providers: the same chain, on by default."""
    deployment = load_plan(name)
    assert deployment.loaded.config.transport.type == name.removesuffix(".yaml")
    assert [p.entry.name for p in deployment.processors] == [
        "vad", "turn", "barge_in", "resample", "personaplex", "bot_speech", "resample", "holding", "pacer"]
    personas = {n: p.params.personas for n, p in [(q.entry.name, q) for q in deployment.processors] if n == "personaplex"}
    assert set(personas["personaplex"]) == {"support", "sales"}


def test_env_substitution_with_defaults_and_types(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_plan(path, {"PORT": "6060", "PERSONAPLEX_URL": "wss://gpu:8998", "VOICE": "VARM1.pt"})
    assert cfg.loaded.config.server.port == 6060
    assert cfg.loaded.config.engine.urls == ["wss://gpu:8998"]
    assert cfg.processors[1].params.voice_prompt == "VARM1.pt"
    assert load_plan(path).loaded.config.server.port == 5050


@pytest.mark.parametrize(
    "mutate, line, key, words",
    [
        (lambda t: t.replace("    path: /exotel", "    path: /exotel\n    colour: blue"), 7, "transport.params.colour", "unknown key"),
        (lambda t: t.replace("port: ${PORT:-5050}", "port: lots"), 2, "server.port", "integer"),
        (lambda t: t.replace("type: personaplex", "type: telepathy"), 12, "processors[1].type", "unknown processor"),
        (lambda t: t.replace("voice_prompt: ${VOICE:-NATF0.pt}", "voice_prompt: ${VOICE}"), 14, "processors[1].params.voice_prompt", "VOICE is not set"),
        (lambda t: t.replace("{audio: input, rate: 24000}", "{audio: sideways, rate: 24000}"), 11, "processors[0].params.audio", "input"),
        (lambda t: t.replace("type: exotel", "type: carrier-pigeon"), 4, "transport.type", "unknown transport"),
        (lambda t: t.replace("server:\n", "sever:\n"), 1, "sever", "unknown key"),
        (lambda t: t.replace("  - type: resample\n    params: {audio: input",
                             "  - type: pipecat.processors.frame_processor.NoSuchThing\n    params: {audio: input"), 10, "processors[0].type", "cannot import"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, mutate, line, key, words):
    path = write(tmp_path, mutate(GOOD))
    err = error_of(path)
    assert (err.file, err.line, err.key) == (str(path), line, key), str(err)
    assert words in err.problem
    assert str(err).startswith(f"{path}:{line}: {key}: ")


def test_dotted_pipecat_processor_with_checked_kwargs(tmp_path):
    text = GOOD + "  - type: pipecat.processors.filters.identity_filter.IdentityFilter\n"
    deployment = load_plan(write(tmp_path, text))
    assert deployment.processors[-1].entry.cls.__name__ == "IdentityFilter"
    bad = GOOD + "  - type: pipecat.processors.filters.identity_filter.IdentityFilter\n    params: {volume: 11}\n"
    err = error_of(write(tmp_path, bad, "bad.yaml"))
    assert err.line == 18 and "volume" in str(err) and "unknown key" in str(err)


def test_missing_file_and_invalid_yaml(tmp_path):
    assert "no such file" in str(error_of(tmp_path / "nope.yaml"))
    err = error_of(write(tmp_path, "transport: [unclosed\n"))
    assert err.line is not None and "invalid YAML" in err.problem


def run_cli(*args, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if k != "PERSONAPLEX_URL"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)


def test_cli_validate_exit_codes(tmp_path):
    ok = run_cli("validate", "exotel.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "embedded reference engine" in ok.stdout
    bad = write(tmp_path, GOOD.replace("type: personaplex", "type: telepathy"))
    for command in ("validate", "run"):
        result = run_cli(command, str(bad))
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert last == f"error: {bad}:12: processors[1].type: " + last.split(": ", 3)[3]
        assert "telepathy" in last


def test_cli_help_on_every_command():
    for command in ([], ["run"], ["validate"], ["list"], ["engine"], ["call"], ["bench"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "usage" in result.stdout.lower()


def test_cli_list_one_line_each():
    result = run_cli("list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    names = {line.split()[1] for line in lines}
    assert {"personaplex", "resample", "exotel"} <= names
    assert all(line.split()[0] in ("processor", "transport") for line in lines)


def test_an_engine_listed_twice_fails_at_start_up_with_its_line(tmp_path):
    path = write(tmp_path, GOOD.replace("      voice_prompt: ${VOICE:-NATF0.pt}", "      url: wss://gpu2:8998"))
    deployment = load_plan(path, {"PERSONAPLEX_URL": "wss://gpu1:8998,wss://gpu2:8998"})
    with pytest.raises(ConfigError) as info:
        builder.engine_pools(deployment, deployment.loaded.config.engine)
    assert info.value.line == 14 and "processors[1].params.url" in str(info.value) and "two pools" in str(info.value)


@pytest.mark.parametrize("urls, problem", [("wss://a:1,wss://a:1", "listed twice"), ("http://a:1", "must be ws://, wss://")])
def test_bad_engine_urls_name_the_key(tmp_path, urls, problem):
    err = error_of(write(tmp_path, GOOD), {"PERSONAPLEX_URL": urls})
    assert err.line == 8 and "engine.urls" in str(err) and problem in str(err)


# ---- issue 15: substituted values stay strings; import-path kwargs typed; did you mean; extends ----


def test_substituted_values_stay_strings_and_the_schema_converts_them(tmp_path):
    """`${X}` is never re-read as YAML: "Note: be brief" is no mapping, "no" no False; "6060" and
    "16000" still become the ints their keys want. An empty unquoted value leaves the default."""
    path = write(tmp_path, GOOD.replace("server:\n", "server:\n  host: ${HOST}\n")
                 .replace("    path: /exotel", "    path: /exotel\n    sample_rate: ${RATE}")
                 .replace("      voice_prompt: ${VOICE:-NATF0.pt}", "      voice_prompt: ${VOICE:-NATF0.pt}\n      text_prompt: ${PROMPT}"))
    env = {"HOST": "no", "RATE": "16000", "PROMPT": "Note: be brief", "PORT": "6060", "PERSONAPLEX_URL": ""}
    deployment = load_plan(path, env)
    cfg = deployment.loaded.config
    assert cfg.server.host == "no" and cfg.server.port == 6060 and cfg.engine.urls == []
    assert deployment.transport_params.sample_rate == 16000
    assert deployment.processors[1].params.text_prompt == "Note: be brief"
    err = error_of(path, env | {"RATE": "11025"})
    assert (err.line, err.key) == (8, "transport.params.sample_rate") and "8000, 16000, 24000" in err.problem


OPENAI = "  - type: pipecat.services.openai.llm.OpenAILLMService\n    params:\n      api_key: not-set\n"


def test_import_path_kwargs_are_typed_and_nested_settings_built(tmp_path):
    """pipecat 1.14 takes models as `settings=` dataclasses: a YAML mapping becomes one, checked key by key."""
    pytest.importorskip("openai")
    deployment = load_plan(write(tmp_path, GOOD + OPENAI + "      settings: {model: gpt-4.1, temperature: '0.3'}\n"))
    settings = deployment.processors[-1].params["settings"]
    assert type(settings).__name__ == "OpenAILLMSettings" and settings.model == "gpt-4.1"
    typo = error_of(write(tmp_path, GOOD + OPENAI + "      settings: {temprature: 0.3}\n", "typo.yaml"))
    assert (typo.line, typo.key) == (20, "processors[3].params.settings")
    assert "no key 'temprature'; did you mean 'temperature'?" in typo.problem
    wrong = error_of(write(tmp_path, GOOD + OPENAI + "      service_tier: [1, 2]\n", "wrong.yaml"))
    assert wrong.key == "processors[3].params.service_tier" and "string" in wrong.problem


@pytest.mark.parametrize("mutate, key, hint", [
    (lambda t: t.replace("  port:", "  prot:"), "server.prot", "did you mean 'port'?"),
    (lambda t: t.replace("    path: /exotel", "    min_chunk_byte: 3200"), "transport.params.min_chunk_byte", "did you mean 'min_chunk_bytes'?"),
    (lambda t: t.replace("voice_prompt:", "voice_promt:"), "processors[1].params.voice_promt", "did you mean 'voice_prompt'?"),
    (lambda t: t.replace("type: personaplex", "type: personaplx"), "processors[1].type", "did you mean 'personaplex'?"),
    (lambda t: t.replace("type: exotel", "type: exotl"), "transport.type", "did you mean 'exotel'?"),
])
def test_unknown_keys_and_names_get_the_nearest_known_one(tmp_path, mutate, key, hint):
    err = error_of(write(tmp_path, mutate(GOOD)))
    assert err.key == key and hint in err.problem, str(err)


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    base = write(tmp_path, GOOD, "base.yaml")
    mine = write(tmp_path, """\
        extends: base.yaml
        server: {host: 127.0.0.1}
        processors:
          - type: resample
            params: {audio: input, rate: 24000}
        """, "mine.yaml")
    cfg = load_plan(mine, {"PORT": "7070"}).loaded.config
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 7070)  # merged with the base's server
    assert [p.type for p in cfg.processors] == ["resample"]  # the list replaced
    assert load_plan(base).loaded.config.server.host == "0.0.0.0"
    shipped = write(tmp_path, "extends: exotel.yaml\nengine: {local_engines: 2}\n", "shipped.yaml")
    deployment = load_plan(shipped)  # a bare name: the shipped deployment
    assert deployment.loaded.config.engine.local_engines == 2 and len(deployment.processors) == 9


def test_extends_errors_name_the_file_that_holds_the_mistake(tmp_path):
    write(tmp_path, GOOD.replace("{audio: output, rate: call}", "{audio: sideways, rate: call}"), "base.yaml")
    mine = write(tmp_path, "extends: base.yaml\nserver: {prot: 1}\n", "mine.yaml")
    err = error_of(mine)
    assert (err.file, err.line, err.key) == (str(mine), 2, "server.prot")
    fixed = write(tmp_path, "extends: base.yaml\n", "fixed.yaml")
    err = error_of(fixed)
    assert (err.file, err.line, err.key) == (str(tmp_path / "base.yaml"), 16, "processors[2].params.audio")
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    assert "a loop" in error_of(tmp_path / "a.yaml").problem
    missing = error_of(write(tmp_path, "extends: nowhere.yaml\n", "m.yaml"))
    assert (missing.line, missing.key) == (1, "extends") and "no such file" in missing.problem
