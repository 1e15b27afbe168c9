"""The scenario suite: what a simulated caller does on a timeline, and what it must hear.

Each `*.yaml` in this folder is one scenario, named after the Full-Duplex-Bench event it exercises
where one fits (smooth turn-taking, pause handling, backchannels, user interruption). A scenario says:

    event: user_interruption        # the kind of moment (free text; FDB's names where they fit)
    description: ...
    seconds: 18.5                   # the call's length: the caller hangs up then (unless hang_up says earlier)
    providers: [exotel, twilio, browser]   # default: all three
    tags: [backchannel]             # optional; `backchannel` scenarios count towards the false-cut target
    engine: {turn_end_secs: 0.64}   # optional: overrides of the reference engine (engine.reference)
    model_says:                     # optional: lines the engine plays, on the CALLER's timeline
      - {at: question.end - 0.5, wav: answer, text: "Sure, I can help."}
    caller:                         # what the caller does, in order; `at` may name earlier items
      - {say: question_long, at: 5.0}                        # a WAV from audio/ (NAME_8k/NAME_16k.wav)
      - {say: interruption, onset_at: question_long.end + 2.8, name: interruption}
      - {say: question, at: 5, level_dbfs: -35}              # or gain_db: -12
      - {sound: cough, at: 12}                               # non-speech audio from audio/
      - {noise: {secs: 0.8, level_dbfs: -25, color: pink}, at: 12, name: noise}   # made at run time
      - {dtmf: "12#", at: 8, gap: 0.3}                       # Exotel and Twilio only
      - {hang_up: true, at: 12.5}
    expect:                         # machine-checked, see pipelines/sim/scenarios/checks.py
      - reply_heard: {after: question_long, within: 4.0}
      - clears: 1

Times are seconds on the caller's timeline (0 = the call's `start`/`init` sent), or `NAME.start`
(where the item's audio begins), `NAME.onset` / `NAME.end` (its first and last loud 10 ms, within
35 dB of its loudest) plus or minus seconds, or `call_end`. `at` places the item's audio (the
WAVs have 100 ms of silence before the speech); `onset_at` places its speech onset instead.

Engine lines (`model_says`) are converted to the engine's own step timeline, which starts when its
handshake completes (`handshake_delay_secs` after the call starts, 0.5 s by default).

`load()` validates a file and raises ConfigError naming the file, the line and the key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.errors import ConfigError, validation_problem

SCENARIO_DIR = Path(__file__).parent
AUDIO_DIR = SCENARIO_DIR / "audio"
PROVIDERS = ("exotel", "twilio", "browser")
ENERGY_FRAME = 0.01  # onset/end: 10 ms frames...
ENERGY_DB = -35.0  # ...within this of the loudest frame
ENGINE_LEAD = 0.02  # the engine's step timeline starts this long after its handshake delay (connect + first step)

_TIME = re.compile(r"^\s*(?:(?P<call_end>call_end)|(?P<name>[A-Za-z_]\w*)\.(?P<point>start|onset|end))\s*"
                   r"(?:(?P<sign>[+-])\s*(?P<secs>\d+(?:\.\d*)?|\.\d+))?\s*$")
DTMF_DIGITS = re.compile(r"^[0-9*#A-D]+$")

def _check_time(value: float | str) -> float | str:
    if isinstance(value, str) and not _TIME.match(value):
        raise ValueError(f"{value!r} is not a time: seconds, NAME.start/onset/end [+|- seconds], or call_end")
    if isinstance(value, (int, float)) and value < 0:
        raise ValueError(f"a time is not negative, got {value}")
    return value


TimeRef = Annotated[float | str, AfterValidator(_check_time)]


def time_names(value: TimeRef) -> list[str]:
    m = _TIME.match(value) if isinstance(value, str) else None
    return [m.group("name")] if m and m.group("name") else []


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class NoiseSpec(_Strict):
    secs: float = Field(gt=0, le=10)
    level_dbfs: float = Field(-30.0, le=0, description="RMS level of the burst")
    color: Literal["white", "pink"] = "pink"


class Action(_Strict):
    """One thing the caller does. Exactly one of say / sound / noise / dtmf / hang_up."""

    say: str | None = None
    sound: str | None = None
    noise: NoiseSpec | None = None
    dtmf: str | None = None
    hang_up: bool | None = None
    at: TimeRef | None = None
    onset_at: TimeRef | None = None
    name: str | None = Field(None, pattern=r"^[A-Za-z_]\w*$")
    gain_db: float = Field(0.0, ge=-60, le=30)
    level_dbfs: float | None = Field(None, ge=-80, le=0, description="RMS of the loud part, before gain_db")
    gap: float = Field(0.3, gt=0, le=5, description="dtmf: seconds between digits")
    duration_ms: int = Field(250, gt=0, le=2000, description="dtmf: how long each key is held (Exotel reports it)")

    @model_validator(mode="after")
    def _one_kind(self) -> Action:
        kinds = [k for k in ("say", "sound", "noise", "dtmf", "hang_up") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"each caller item does exactly one of say, sound, noise, dtmf, hang_up (got {kinds or 'none'})")
        if (self.at is None) == (self.onset_at is None):
            raise ValueError("give the item's time as `at` (or `onset_at` for speech), not both and not neither")
        if self.onset_at is not None and self.kind not in ("say", "sound", "noise"):
            raise ValueError("onset_at places audio; use `at`")
        if self.dtmf is not None and not DTMF_DIGITS.match(self.dtmf):
            raise ValueError(f"dtmf digits are 0-9, *, # and A-D, got {self.dtmf!r}")
        if self.hang_up is False:
            raise ValueError("hang_up: true, or leave it out")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("say", "sound", "noise", "dtmf", "hang_up") if getattr(self, k) is not None)

    @property
    def label(self) -> str:
        return self.name or (self.say or self.sound or self.kind)


class ModelLine(_Strict):
    at: TimeRef
    wav: str
    text: str = ""


# ---- expectations --------------------------------------------------------------------------------


class ReplyHeard(_Strict):
    """Model speech (not a holding clip) starts after the utterance and is heard within `within` s of its end."""

    after: str
    within: float = Field(4.0, gt=0)
    overlap: float = Field(0.0, ge=0, description="a reply may start this long before the utterance ends")
    min_secs: float = Field(0.4, gt=0, description="voiced model audio the reply must hold")


class BotStopped(_Strict):
    """After the caller takes the floor (utterance onset + floor_secs), bot audio stops within `ms`."""

    after: str
    ms: float = Field(gt=0)
    floor_secs: float = Field(0.4, ge=0, description="the bridge's min_speech_secs: talk-over that takes the floor")


class NoStale(_Strict):
    """No voiced bot audio from the `clear` until the utterance has ended; none of the interrupted utterance after it."""

    after: str


class Clears(_Strict):
    min: int = Field(0, ge=0)
    max: int | None = Field(None, ge=0)


class HoldingClips(_Strict):
    forbid: list[str] = Field(default_factory=list)
    require: list[str] = Field(default_factory=list)


class CallOk(_Strict):
    close_within: float = Field(5.0, gt=0, description="after the caller hangs up, the server closes within this")


class ModelSpeech(_Strict):
    """Voiced model audio heard between two times: at least min_secs and/or at most max_secs."""

    from_: TimeRef = Field(alias="from")
    to: TimeRef
    min_secs: float | None = Field(None, ge=0)
    max_secs: float | None = Field(None, ge=0)
    why: str = ""

    @model_validator(mode="after")
    def _bound(self) -> ModelSpeech:
        if self.min_secs is None and self.max_secs is None:
            raise ValueError("give min_secs, max_secs or both")
        return self


class Replies(_Strict):
    """Exactly `count` model turns start after the utterance's onset (speech closer than merge_gap is one turn)."""

    after: str
    count: int = Field(ge=0)
    merge_gap: float = Field(1.0, gt=0)
    min_secs: float = Field(0.4, gt=0)


class DtmfReceived(_Strict):
    """The server's call record lists these digits (needs records)."""

    digits: str = Field(pattern=r"^[0-9*#A-D]+$")


EXPECTATIONS: dict[str, type[BaseModel]] = {
    "reply_heard": ReplyHeard,
    "bot_stopped_within_ms": BotStopped,
    "no_stale_audio": NoStale,
    "clears": Clears,
    "no_holding_over_model": BaseModel,  # true
    "holding_clips": HoldingClips,
    "call_ok": CallOk,
    "model_speech": ModelSpeech,
    "replies": Replies,
    "dtmf_received": DtmfReceived,
}
_FLAGS = {"no_holding_over_model", "call_ok"}  # `kind: true` means the defaults


@dataclass
class Expectation:
    kind: str
    params: BaseModel | None
    index: int

    @property
    def after(self) -> str | None:
        return getattr(self.params, "after", None)

    def describe(self) -> str:
        if self.params is None:
            return self.kind
        data = self.params.model_dump(by_alias=True, exclude_defaults=True)
        return f"{self.kind}({', '.join(f'{k}={v}' for k, v in data.items())})" if data else self.kind


class ScenarioModel(_Strict):
    event: str
    description: str
    seconds: float = Field(gt=0, le=300)
    providers: list[Literal["exotel", "twilio", "browser"]] = Field(default_factory=lambda: list(PROVIDERS))
    tags: list[str] = Field(default_factory=list)
    engine: dict[str, Any] = Field(default_factory=dict)
    model_says: list[ModelLine] = Field(default_factory=list)
    caller: list[Action] = Field(default_factory=list)
    expect: list[dict[str, Any]] = Field(min_length=1)


# ---- the scenario as loaded ---------------------------------------------------------------------------


@dataclass
class Placed:
    """Where an item landed on the caller's timeline (seconds)."""

    name: str
    kind: str
    start: float
    onset: float
    end: float


@dataclass
class Rendered:
    """A scenario at one call rate: the caller's audio, where everything is, and the timed actions."""

    audio: np.ndarray  # int16, from t=0
    rate: int
    seconds: float  # when the caller hangs up
    placed: dict[str, Placed]
    dtmf: list[tuple[float, str, int]]  # (at, digit, duration_ms)
    hang_up_at: float | None

    def time(self, ref: TimeRef) -> float:
        return resolve(ref, self.placed, self.seconds)


@dataclass
class Scenario:
    name: str
    path: Path
    model: ScenarioModel
    expectations: list[Expectation]
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)

    @property
    def tags(self) -> list[str]:
        return self.model.tags

    @property
    def providers(self) -> list[str]:
        return list(self.model.providers)

    def render(self, rate: int) -> Rendered:
        return render(self, rate)

    def engine_script(self, handshake_delay_secs: float, rate: int = 16000) -> list[dict]:
        """`model_says` as reference-engine script lines (step timeline, absolute WAV paths)."""
        if not self.model.model_says:
            return []
        timeline = self.render(rate)
        lines = []
        for line in self.model.model_says:
            at = timeline.time(line.at) - handshake_delay_secs - ENGINE_LEAD
            lines.append({"at": round(max(0.0, float(at)), 3), "wav": str(audio_path(line.wav, 16000)), "text": line.text or " "})
        return lines


def resolve(ref: TimeRef, placed: dict[str, Placed], call_end: float) -> float:
    if not isinstance(ref, str):
        return float(ref)
    m = _TIME.match(ref)
    if m is None:
        raise ValueError(f"not a time: {ref!r}")
    if m.group("call_end"):
        base = call_end
    else:
        item = placed.get(m.group("name"))
        if item is None:
            raise KeyError(m.group("name"))
        base = getattr(item, m.group("point"))
    secs = float(m.group("secs") or 0.0)
    return base + (secs if m.group("sign") != "-" else -secs)


def audio_path(name: str, rate: int) -> Path:
    """audio/NAME_8k.wav or NAME_16k.wav (the nearer rate), else audio/NAME.wav, else NAME as a path."""
    for rate_k in sorted((8, 16), key=lambda k: abs(k * 1000 - rate)):
        candidate = AUDIO_DIR / f"{name}_{rate_k}k.wav"
        if candidate.exists():
            return candidate
    for candidate in (AUDIO_DIR / f"{name}.wav", AUDIO_DIR / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(name)


def names() -> list[str]:
    """The shipped scenarios, by file name."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def load_all(only: list[str] | None = None) -> list[Scenario]:
    wanted = names() if not only else only
    unknown = sorted(set(wanted) - set(names()))
    if unknown:
        raise ConfigError(str(SCENARIO_DIR), None, "", f"no such scenario: {', '.join(unknown)}; shipped: {', '.join(names())}")
    return [load(SCENARIO_DIR / f"{n}.yaml") for n in wanted]


def load(path: str | Path) -> Scenario:
    """Read and validate one scenario file; ConfigError (file:line: key: problem) on any mistake."""
    from pipelines.config import _construct, format_loc, line_of

    path = Path(path)
    if not path.exists() and (SCENARIO_DIR / f"{path.name}.yaml").exists():
        path = SCENARIO_DIR / f"{path.name}.yaml"
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except OSError as exc:
        raise ConfigError(str(path), None, "", f"cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(str(path), mark.line + 1 if mark else None, "", f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
    lines: dict[tuple, tuple[str, int]] = {}
    data = _construct(root, (), lines, {}, str(path)) if root is not None else None

    def fail(loc: tuple, problem: str) -> ConfigError:
        return ConfigError(str(path), (line_of(lines, loc) or (None, None))[1], format_loc(loc), problem)

    def validated(model: type[BaseModel], value: Any, loc: tuple) -> BaseModel:
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            inner, problem = validation_problem(exc, model)
            where = loc + tuple(p for p in inner if not (isinstance(p, str) and p.startswith("function-after")))
            raise fail(where, problem) from None

    if not isinstance(data, dict):
        raise fail((), "a scenario is a mapping with event:, description:, seconds:, caller: and expect:")
    model = validated(ScenarioModel, data, ())
    assert isinstance(model, ScenarioModel)

    # names, references and files
    known: dict[str, Action] = {}
    hang_ups = 0
    for i, action in enumerate(model.caller):
        loc = ("caller", i)
        for key in ("at", "onset_at"):
            ref = getattr(action, key)
            for ref_name in time_names(ref) if ref is not None else []:
                if ref_name not in known:
                    raise fail(loc + (key,), f"{ref_name!r} is not the name of an earlier caller item (names: {', '.join(known) or 'none'})")
        for key in ("say", "sound"):
            wav = getattr(action, key)
            if wav is not None:
                try:
                    audio_path(wav, 8000)
                except FileNotFoundError:
                    raise fail(loc + (key,), f"no audio {wav!r} in {AUDIO_DIR} (NAME_8k.wav / NAME_16k.wav)") from None
        if action.kind in ("say", "sound", "noise"):
            if action.label in known:
                raise fail(loc + ("name",), f"two caller items are called {action.label!r}: give one a `name`")
            known[action.label] = action
        if action.kind == "dtmf" and "browser" in model.providers:
            raise fail(loc + ("dtmf",), "the browser page has no DTMF: list `providers:` without browser")
        hang_ups += action.kind == "hang_up"
        if hang_ups > 1:
            raise fail(loc + ("hang_up",), "a caller hangs up once")
    for i, line in enumerate(model.model_says):
        loc = ("model_says", i)
        for ref_name in time_names(line.at):
            if ref_name not in known:
                raise fail(loc + ("at",), f"{ref_name!r} is not the name of a caller item")
        try:
            audio_path(line.wav, 16000)
        except FileNotFoundError:
            raise fail(loc + ("wav",), f"no audio {line.wav!r} in {AUDIO_DIR}") from None

    expectations = []
    for i, item in enumerate(model.expect):
        loc = ("expect", i)
        if not isinstance(item, dict) or len(item) != 1:
            raise fail(loc, f"each expectation is one `kind: params` pair; kinds: {', '.join(EXPECTATIONS)}")
        (kind, value), = item.items()
        if kind not in EXPECTATIONS:
            raise fail(loc + (kind,), f"unknown expectation; kinds: {', '.join(EXPECTATIONS)}")
        if kind in _FLAGS and value is True:
            params = None if kind == "no_holding_over_model" else CallOk()
        elif kind == "no_holding_over_model":
            raise fail(loc + (kind,), "write `no_holding_over_model: true`")
        elif kind == "clears" and isinstance(value, int) and not isinstance(value, bool):
            params = validated(Clears, {"min": value, "max": value}, loc + (kind,))
        elif kind == "bot_stopped_within_ms" and isinstance(value, dict) and "ms" not in value:
            raise fail(loc + (kind, "ms"), "required key is missing")
        elif kind == "dtmf_received" and isinstance(value, str):
            params = validated(DtmfReceived, {"digits": value}, loc + (kind,))
        else:
            params = validated(EXPECTATIONS[kind], value, loc + (kind,))
        refs = [getattr(params, "after", None)] if params is not None else []
        if isinstance(params, ModelSpeech):
            refs = time_names(params.from_) + time_names(params.to)
        for ref_name in filter(None, refs):
            if ref_name not in known:
                raise fail(loc + (kind,), f"{ref_name!r} is not the name of a caller item (names: {', '.join(known) or 'none'})")
        if kind in ("bot_stopped_within_ms", "no_stale_audio", "reply_heard", "replies") and known[params.after].kind == "noise":
            raise fail(loc + (kind, "after"), f"{params.after!r} is noise, not an utterance")
        if isinstance(params, Clears) and params.max is not None and params.max < params.min:
            raise fail(loc + (kind,), "max is below min")
        expectations.append(Expectation(kind, params, i))
    scenario = Scenario(path.stem, path, model, expectations, lines)
    try:
        scenario.render(8000)
    except ValueError as exc:
        raise fail(("caller",), str(exc)) from None
    return scenario


# ---- the caller's audio --------------------------------------------------------------------------


def loud_span(audio: np.ndarray, rate: int) -> tuple[float, float]:
    """(first, last) loud 10 ms frame of `audio`, in seconds from its start: within ENERGY_DB of its loudest."""
    n = max(1, round(rate * ENERGY_FRAME))
    frames = len(audio) // n
    if frames == 0:
        return 0.0, len(audio) / rate
    x = audio[: frames * n].astype(np.float64).reshape(frames, n)
    level = np.sqrt(np.mean(x**2, axis=1))
    if level.max() <= 0:
        return 0.0, 0.0
    loud = np.flatnonzero(level >= level.max() * 10 ** (ENERGY_DB / 20))
    return loud[0] * n / rate, (loud[-1] + 1) * n / rate


def active_rms(audio: np.ndarray, rate: int) -> float:
    """RMS of the loud part (frames within ENERGY_DB of the loudest), int16 units."""
    n = max(1, round(rate * ENERGY_FRAME))
    frames = len(audio) // n
    x = audio[: frames * n].astype(np.float64).reshape(frames, n)
    level = np.sqrt(np.mean(x**2, axis=1))
    loud = level >= level.max() * 10 ** (ENERGY_DB / 20)
    return float(np.sqrt(np.mean(x[loud] ** 2))) if loud.any() else 0.0


def _noise(spec: NoiseSpec, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = round(spec.secs * rate)
    white = rng.standard_normal(n)
    if spec.color == "pink":  # 1/f power: shape the spectrum by 1/sqrt(f)
        spectrum = np.fft.rfft(white)
        f = np.fft.rfftfreq(n, 1 / rate)
        spectrum[1:] /= np.sqrt(f[1:])
        spectrum[0] = 0
        white = np.fft.irfft(spectrum, n)
    white *= 32768 * 10 ** (spec.level_dbfs / 20) / (np.sqrt(np.mean(white**2)) or 1.0)
    ramp = min(n // 2, round(0.01 * rate))  # 10 ms fades: a burst, not a click
    if ramp:
        white[:ramp] *= np.linspace(0, 1, ramp)
        white[-ramp:] *= np.linspace(1, 0, ramp)
    return white


def render(scenario: Scenario, rate: int) -> Rendered:
    from processors.audio import read_wav

    model = scenario.model
    hang_up_at: float | None = None
    placed: dict[str, Placed] = {}
    pieces: list[tuple[int, np.ndarray]] = []
    dtmf: list[tuple[float, str, int]] = []
    end_of_call = model.seconds
    for i, action in enumerate(model.caller):
        if action.kind == "hang_up":
            hang_up_at = resolve(action.at, placed, end_of_call)
            continue
        if action.kind == "dtmf":
            at = resolve(action.at, placed, end_of_call)
            dtmf += [(round(float(at) + k * action.gap, 3), d, action.duration_ms) for k, d in enumerate(action.dtmf)]
            continue
        if action.kind == "noise":
            seed = int.from_bytes(hashlib.sha256(f"{scenario.name}/{i}".encode()).digest()[:4], "little")
            audio = _noise(action.noise, rate, seed)
        else:
            audio = read_wav(audio_path(action.say or action.sound, rate), rate).astype(np.float64)
            if action.level_dbfs is not None:
                audio *= 32768 * 10 ** (action.level_dbfs / 20) / (active_rms(audio, rate) or 1.0)
        audio = audio * 10 ** (action.gain_db / 20)
        first, last = loud_span(audio, rate)
        if action.at is not None:
            start = resolve(action.at, placed, end_of_call)
        else:
            start = resolve(action.onset_at, placed, end_of_call) - first
        if start < 0:
            raise ValueError(f"{action.label} would start at {start:.2f} s, before the call")
        placed[action.label] = Placed(action.label, action.kind, round(float(start), 4), round(float(start + first), 4),
                                      round(float(start + last), 4))
        pieces.append((round(start * rate), audio))
    seconds = min(end_of_call, hang_up_at) if hang_up_at is not None else end_of_call
    total = round(seconds * rate)
    mix = np.zeros(max([total] + [s + len(a) for s, a in pieces]), np.float64)
    for s, a in pieces:
        mix[s : s + len(a)] += a
    audio = np.clip(np.round(mix[:total]), -32768, 32767).astype(np.int16)
    for name, item in placed.items():
        if item.start >= seconds:
            raise ValueError(f"{name} starts at {item.start:.2f} s, after the caller hangs up ({seconds:.2f} s)")
    for at, digit, _ in dtmf:
        if at >= seconds:
            raise ValueError(f"dtmf {digit!r} at {at:.2f} s comes after the caller hangs up ({seconds:.2f} s)")
    return Rendered(audio, rate, seconds, placed, dtmf, hang_up_at)
