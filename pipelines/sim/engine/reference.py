"""Reference engine: a GPU-free stand-in that speaks the PersonaPlex server's WebSocket protocol.

It reproduces the behaviour clients trip over (docs/protocols.md, PersonaPlex): upgrade
before validation (bad parameters => 1006), one global session slot with silent queueing, a prompt phase
that eats client messages, the exact handshake and header pages, a strict uplink Ogg reader whose
violations close with 1000, and input-clocked 80 ms output. What it says is scripted instead of generated:
the caller's own turn played back when the turn ends, with a model's turn-taking (converse, the default);
an echo of the caller, a tone, or WAV clips at set times with their words as text pieces.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import ipaddress
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from aiohttp import WSMsgType, web
from loguru import logger
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipelines.sim.engine import converse
from pipelines.sim.engine.script import EncodedScript, ScriptAgent, text_pieces
from processors.audio import PIPECAT_SPEECH_WAV, read_wav
from processors.personaplex.ogg_reader import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    DownlinkWriter,
    OggStreamError,
    OpusPacketError,
    UplinkDecoder,
)
from processors.pipecat_adapter import silero_session

HANDSHAKE = b"\x00"
KIND_AUDIO = 0x01
KIND_TEXT = 0x02
# One prompt-phase model step; the real server spends ~10-40 ms per step between is_alive() polls.
PROMPT_STEP_S = 0.02
IS_ALIVE_TIMEOUT_S = 0.01
SILENCE_RMS = 0.01  # about -40 dBFS
DEFAULT_SCRIPT_TEXT = "Hello, this is the reference engine."
DEFAULT_VOICES = [
    *(f"NATF{i}.pt" for i in range(4)),
    *(f"NATM{i}.pt" for i in range(4)),
    *(f"VARF{i}.pt" for i in range(5)),
    *(f"VARM{i}.pt" for i in range(5)),
]
_GONE = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
_UNHEARD = np.zeros(FRAME_SAMPLES, dtype=np.float32)  # codec_free: a step's input, never looked at


class ScriptLine(BaseModel, extra="forbid"):
    """One utterance of script mode: a clip and its words from `at` seconds on the session's step timeline."""

    at: float = Field(ge=0)
    wav: str | None = None  # None: the pipecat speech clip (default_script_wav)
    text: str = DEFAULT_SCRIPT_TEXT


class EngineOptions(BaseModel, extra="forbid"):
    mode: Literal["converse", "echo", "tone", "script"] = Field(
        "converse",
        description="converse: answers each caller turn after it ends, yields when talked over (a model's "
        "turn-taking); echo: the caller back after echo_delay_secs, over them; tone: a sine; script: `script` clips",
    )
    handshake_delay_secs: float = Field(0.5, ge=0)
    step_delay_secs: float = Field(0.0, ge=0)
    echo_delay_secs: float = Field(1.0, ge=0)
    tone_hz: float = Field(440.0, gt=0)
    # script mode: `script`, or the one line that script_wav/script_text/script_at describe
    script: list[ScriptLine] = Field(default_factory=list)
    script_wav: str | None = None
    script_text: str = DEFAULT_SCRIPT_TEXT
    script_at: float = Field(0.5, ge=0)
    codec_free: bool = Field(
        False,
        description="script mode, for load benches: sessions run no Opus codec; caller pages are checked as "
        "always but not decoded (packet durations clock the steps), and the script is encoded once per process",
    )
    # converse mode (a model's turn-taking; timings are rounded to 80 ms steps)
    turn_end_secs: float = Field(
        converse.TURN_END_SECS,
        gt=0,
        description="non-speech that ends a caller turn; longer than a comma pause (0.2-0.4 s)",
    )
    reply_delay_secs: float = Field(
        converse.REPLY_DELAY_SECS,
        ge=0,
        description="from the end of a turn to the reply, the model's own latency; speech before it holds the reply",
    )
    yield_after_secs: float = Field(
        converse.YIELD_AFTER_SECS,
        gt=0,
        description="unbroken caller speech over a reply that makes it fade out; shorter is a backchannel",
    )
    reply_text: str = Field(converse.REPLY_TEXT, description="words sent as text pieces over each reply")
    sessions: int = Field(1, ge=1)
    voices: list[str] = Field(default_factory=lambda: list(DEFAULT_VOICES))
    fail_after_frames: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_kind_of_script(self) -> EngineOptions:
        if self.script and self.model_fields_set & {"script_wav", "script_text", "script_at"}:
            raise ValueError("give either script or script_wav/script_text/script_at, not both")
        if self.codec_free and self.mode != "script":
            raise ValueError(f"codec_free is for script mode only (mode is {self.mode!r}): other modes hear the caller")
        return self

    def script_lines(self) -> list[ScriptLine]:
        """Script mode has one default line; converse mode speaks only lines it is given."""
        if self.script:
            return self.script
        if self.mode == "converse" and not self.model_fields_set & {"script_wav", "script_text", "script_at"}:
            return []
        return [ScriptLine(at=self.script_at, wav=self.script_wav, text=self.script_text)]


@dataclass
class EngineStats:
    """Counters that tests and benchmarks read to see what the engine did with a client's bytes."""

    connections: int = 0
    rejected: int = 0
    sessions_started: int = 0
    sessions_active: int = 0
    connections_peak: int = 0  # most connections open at once (one engine, one call: 1; more is a double booking)
    handshakes: int = 0
    messages_eaten_before_handshake: int = 0
    frames_in: int = 0
    frames_out: int = 0
    text_pieces_out: int = 0
    uplink_violations: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Agent(Protocol):
    def step(self, frame: np.ndarray) -> tuple[np.ndarray, str | None]: ...


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


class EchoAgent:
    """Returns the caller's audio after a fixed delay and 'says' pieces while that audio is voiced."""

    PIECES = (" echo", "ing")

    def __init__(self, delay_s: float) -> None:
        self._line = np.zeros(round(delay_s * SAMPLE_RATE), dtype=np.float32)
        self._voiced_steps = 0

    def step(self, frame: np.ndarray) -> tuple[np.ndarray, str | None]:
        self._line = np.concatenate([self._line, frame])
        out, self._line = self._line[:FRAME_SAMPLES], self._line[FRAME_SAMPLES:]
        if _rms(out) <= SILENCE_RMS:
            return out, None
        n, self._voiced_steps = self._voiced_steps, self._voiced_steps + 1
        return out, self.PIECES[(n // 2) % 2] if n % 2 == 0 else None


class ToneAgent:
    """A continuous sine: audio that is unmistakably the engine's, with no text."""

    def __init__(self, hz: float, amplitude: float = 0.3) -> None:
        self._hz = hz
        self._amplitude = amplitude
        self._n = 0

    def step(self, frame: np.ndarray) -> tuple[np.ndarray, str | None]:
        t = (self._n + np.arange(FRAME_SAMPLES)) / SAMPLE_RATE
        self._n += FRAME_SAMPLES
        return (self._amplitude * np.sin(2 * np.pi * self._hz * t)).astype(np.float32), None


def default_script_wav() -> str:
    """A real speech clip that ships with pipecat, so script mode works without any file."""
    return str(PIPECAT_SPEECH_WAV)


def load_clip(path: str) -> np.ndarray:
    """Any WAV soundfile reads, as mono float32 at 24 kHz."""
    return read_wav(path, SAMPLE_RATE).astype(np.float32) / 32768.0


class UplinkViolation(Exception):
    """The client's Ogg stream would have killed the real server's decoder thread."""


class ReferenceEngine:
    def __init__(self, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self.stats = EngineStats()
        self.port: int | None = None
        self.url: str | None = None
        self._script: list[tuple[float, np.ndarray, str]] = []  # loaded once, shared by every session
        if self.options.mode in ("script", "converse"):
            lines = self.options.script_lines()
            clips = {path: load_clip(path) for path in {line.wav or default_script_wav() for line in lines}}
            self._script = [(line.at, clips[line.wav or default_script_wav()], line.text) for line in lines]
        self._encoded = _encoded_script(self._script) if self.options.codec_free else None
        if self.options.mode == "converse":
            silero_session()  # loaded at start-up, not in the first call's session
        self._slots: asyncio.Semaphore | None = None
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Serve ``/api/chat``; port 0 picks a free port. Returns (and sets) ``url``."""
        self._slots = asyncio.Semaphore(self.options.sessions)
        app = web.Application()
        app.router.add_get("/api/chat", self._chat)
        app.router.add_get("/stats", lambda request: web.json_response(self.stats.as_dict()))
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        scheme = "wss" if ssl_context else "ws"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{self.port}"
        logger.info(f"reference engine ({self.options.mode}) listening on {self.url}/api/chat")
        return self.url

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"engine stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ReferenceEngine:
        if self.url is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- one connection ------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=None, autoping=True)
        await ws.prepare(request)  # the real server upgrades before it reads a single parameter
        self.stats.connections += 1
        problem = self._check_params(request.query)
        if problem:
            self.stats.rejected += 1
            logger.warning(f"{request.remote}: {problem}; aborting after upgrade (client sees 1006)")
            _abort(request)
            return ws
        self._sockets.add(ws)
        self.stats.connections_peak = max(self.stats.connections_peak, len(self._sockets))
        try:
            assert self._slots is not None
            async with self._slots:  # the real lock does not notice a queued client leaving
                self.stats.sessions_started += 1
                self.stats.sessions_active += 1
                try:
                    await self._session(request, ws)
                except ConnectionError as exc:
                    logger.info(f"{request.remote}: connection lost: {exc!r}")
                finally:
                    self.stats.sessions_active -= 1
        finally:
            self._sockets.discard(ws)
        return ws

    def _check_params(self, query: Mapping[str, str]) -> str | None:
        if "voice_prompt" not in query:
            return "missing voice_prompt (KeyError in the real server)"
        if query["voice_prompt"] not in self.options.voices:
            return f"unknown voice {query['voice_prompt']!r} (FileNotFoundError in the real server)"
        if "text_prompt" not in query:
            return "missing text_prompt (KeyError in the real server)"
        if query["text_prompt"] == "":
            return "empty text_prompt (TypeError in the real server's prompt phase)"
        if "seed" in query:
            return "seed present (the real server reads request['seed'] and raises KeyError)"
        return None

    async def _session(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        peer = request.remote
        if not await self._prompt_phase(ws):
            logger.info(f"{peer}: left during the prompt phase")
            return
        await ws.send_bytes(HANDSHAKE)
        self.stats.handshakes += 1
        writer = DownlinkWriter()
        for page in writer.header_pages():
            await ws.send_bytes(bytes([KIND_AUDIO]) + page)
        frames: asyncio.Queue[np.ndarray] = asyncio.Queue()  # unbounded, like the server's reader
        tasks = {
            asyncio.create_task(self._receive(ws, frames), name="engine-recv"),
            asyncio.create_task(self._run_steps(request, ws, frames, writer), name="engine-steps"),
        }
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:  # first task to finish ends the session, as in the real server
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for exc in outcomes:
            if isinstance(exc, UplinkViolation):
                logger.warning(f"{peer}: uplink violation, closing with 1000: {exc}")
            elif isinstance(exc, Exception) and not ws.closed:
                logger.opt(exception=exc).error(f"{peer}: session failed, closing with 1000")
        if not ws.closed:
            await ws.close()  # 1000 and no message, also on server-side errors
        logger.info(f"{peer}: session over ({writer.concealed_frames} frames concealed)")

    async def _prompt_phase(self, ws: web.WebSocketResponse) -> bool:
        """System-prompt steps: each polls the socket once and discards what it got, as the real one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.handshake_delay_secs
        while await self._is_alive(ws):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return True
            await asyncio.sleep(min(PROMPT_STEP_S, remaining))
        return False

    async def _is_alive(self, ws: web.WebSocketResponse) -> bool:
        if ws.closed:
            return False
        try:
            msg = await ws.receive(timeout=IS_ALIVE_TIMEOUT_S)
        except TimeoutError:
            return True
        if msg.type in _GONE:
            return False
        self.stats.messages_eaten_before_handshake += 1
        logger.debug(f"prompt phase discarded a {msg.type.name} message")
        return True

    async def _receive(self, ws: web.WebSocketResponse, frames: asyncio.Queue[np.ndarray]) -> None:
        decoder = UplinkDecoder()
        pcm = np.zeros(0, dtype=np.float32)
        counted = 0  # codec_free: samples not yet made into steps
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                return
            if msg.type != WSMsgType.BINARY:
                logger.warning(f"ignoring {msg.type.name} message from client")
                continue
            data: bytes = msg.data
            if not data or data[0] != KIND_AUDIO:
                logger.warning(f"ignoring message of unknown kind {data[:1].hex() or 'empty'}")
                continue
            try:
                if self._encoded is None:
                    pcm = np.concatenate([pcm, decoder.decode(data[1:])])
                else:  # codec_free: checked like decoded pages, but only their durations clock the steps
                    counted += sum(samples for _, samples in decoder.audio_packets(data[1:]))
            except (OggStreamError, OpusPacketError, ValueError) as exc:
                self.stats.uplink_violations += 1
                raise UplinkViolation(str(exc)) from exc
            while len(pcm) >= FRAME_SAMPLES:
                frames.put_nowait(pcm[:FRAME_SAMPLES])
                pcm = pcm[FRAME_SAMPLES:]
            while counted >= FRAME_SAMPLES:
                frames.put_nowait(_UNHEARD)
                counted -= FRAME_SAMPLES

    async def _run_steps(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        frames: asyncio.Queue[np.ndarray],
        writer: DownlinkWriter,
    ) -> None:
        agent, encoded = self._new_agent(), self._encoded
        limit = self.options.fail_after_frames
        sent = 0
        while limit is None or sent < limit:
            frame = await frames.get()
            self.stats.frames_in += 1
            if self.options.step_delay_secs:
                await asyncio.sleep(self.options.step_delay_secs)
            if encoded is None:
                audio, text = agent.step(frame)
                page = writer.encode(audio)
            else:  # codec_free: this step's packet, encoded once per process, framed for this session
                packet, text = encoded.step(sent)
                page = writer.page(packet)
            if text:
                await ws.send_bytes(bytes([KIND_TEXT]) + text.encode())
                self.stats.text_pieces_out += 1
            await ws.send_bytes(bytes([KIND_AUDIO]) + page)
            self.stats.frames_out += 1
            sent += 1
        logger.warning(f"{request.remote}: fail_after_frames={limit} reached, dropping the connection")
        _abort(request)

    def _new_agent(self) -> _Agent:
        options = self.options
        if options.mode == "converse":
            return converse.ConverseAgent(
                text_pieces(options.reply_text),
                ScriptAgent(self._script) if self._script else None,
                turn_end_secs=options.turn_end_secs,
                reply_delay_secs=options.reply_delay_secs,
                yield_after_secs=options.yield_after_secs,
            )
        if options.mode == "echo":
            return EchoAgent(options.echo_delay_secs)
        if options.mode == "tone":
            return ToneAgent(options.tone_hz)
        return ScriptAgent(self._script)


_ENCODED_SCRIPTS: dict[tuple[tuple[float, str, str], ...], EncodedScript] = {}


def _encoded_script(script: list[tuple[float, np.ndarray, str]]) -> EncodedScript:
    """One encoding per script per process: a bench runs K engines in a process, all with one script."""
    key = tuple((at, hashlib.sha1(clip.tobytes()).hexdigest(), text) for at, clip, text in script)
    if key not in _ENCODED_SCRIPTS:
        _ENCODED_SCRIPTS[key] = EncodedScript(script)
    return _ENCODED_SCRIPTS[key]


def _abort(request: web.Request) -> None:
    """Drop the TCP connection without a close frame, which is what the client of a crash sees."""
    if request.transport is not None:
        request.transport.abort()


# --- TLS ---------------------------------------------------------------------------------------


def self_signed_ssl_context() -> ssl.SSLContext:
    """A server context for localhost/127.0.0.1/::1, like the mkcert cert the real ``--ssl`` makes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="engine-tls-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context.load_cert_chain(cert_path, key_path)
    return context


# --- CLI ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = EngineOptions()
    p = argparse.ArgumentParser(
        prog="python -m pipelines engine",
        description="Reference PersonaPlex-protocol engine (no GPU): serves /api/chat with scripted audio.",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    p.add_argument("--port", type=_ports, default=[8998], help="port, 0 = any free; a comma-separated list starts one "
                   "engine per port, like a PersonaPlex fleet (default: 8998)")
    p.add_argument(
        "--mode",
        choices=["converse", "echo", "tone", "script"],
        help=f"default: script with --say or --codec-free, else {defaults.mode}",
    )
    p.add_argument(
        "--handshake-delay-secs",
        type=float,
        default=defaults.handshake_delay_secs,
        help="seconds of prompt phase before the 0x00 handshake (real server: 2-9 s)",
    )
    p.add_argument(
        "--step-delay-secs",
        type=float,
        default=defaults.step_delay_secs,
        help="simulated GPU seconds per 80 ms step; above 0.08 latency grows",
    )
    p.add_argument("--echo-delay-secs", type=float, default=defaults.echo_delay_secs)
    for name in ("turn_end_secs", "reply_delay_secs", "yield_after_secs"):
        field = EngineOptions.model_fields[name]
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=field.default,
                       help=f"converse mode: {field.description} (default: %(default)s)")
    p.add_argument("--tone-hz", type=float, default=defaults.tone_hz)
    p.add_argument(
        "--say",
        action="append",
        type=_script_line,
        metavar="AT:WAV[:TEXT]",
        help="script line (repeatable): WAV from AT seconds of the step timeline, TEXT as its words; "
        "empty WAV = pipecat's ready.wav, no TEXT = the default words. Not with --script-*",
    )
    p.add_argument("--script-wav", help="one-line script: clip (default: pipecat's ready.wav)")
    p.add_argument("--script-text", help=f"one-line script: words (default: {defaults.script_text!r})")
    p.add_argument("--script-at", type=float, help=f"one-line script: at, s (default: {defaults.script_at})")
    p.add_argument("--codec-free", action="store_true",
                   help=EngineOptions.model_fields["codec_free"].description)
    p.add_argument("--sessions", type=int, default=defaults.sessions, help="concurrent sessions (real: 1)")
    p.add_argument("--no-tls", action="store_true", help="serve ws:// instead of wss:// (real: --ssl)")
    return p


def _script_line(value: str) -> ScriptLine:
    """``AT:WAV[:TEXT]``; TEXT keeps any further colons."""
    at, _, rest = value.partition(":")
    wav, has_text, text = rest.partition(":")
    try:
        return ScriptLine(at=at, wav=wav or None, **({"text": text} if has_text else {}))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None


def _ports(value: str) -> list[int]:
    try:
        return [int(p) for p in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port or comma-separated ports: {value!r}") from None


async def _serve(options: EngineOptions, host: str, ports: list[int], tls: bool) -> None:
    """One engine per port; the first line printed lists their URLs, comma-separated (PERSONAPLEX_URL)."""
    engines = [ReferenceEngine(options) for _ in ports]
    context = self_signed_ssl_context() if tls else None
    urls = [await engine.start(host, port, context) for engine, port in zip(engines, ports)]
    print(",".join(urls), flush=True)
    print(f"  e.g. {urls[0]}/api/chat?voice_prompt=NATF0.pt&text_prompt=...", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for engine in engines:
            await engine.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Flags left out stay unset: the model's defaults apply, and --script-* are not mixed with --say.
    unset_unless_given = {
        "mode": args.mode or ("script" if args.say or args.codec_free else None),
        "script_wav": args.script_wav,
        "script_text": args.script_text,
        "script_at": args.script_at,
    }
    try:
        options = EngineOptions(
            handshake_delay_secs=args.handshake_delay_secs,
            step_delay_secs=args.step_delay_secs,
            echo_delay_secs=args.echo_delay_secs,
            turn_end_secs=args.turn_end_secs,
            reply_delay_secs=args.reply_delay_secs,
            yield_after_secs=args.yield_after_secs,
            tone_hz=args.tone_hz,
            script=args.say or [],
            sessions=args.sessions,
            codec_free=args.codec_free,
            **{name: value for name, value in unset_unless_given.items() if value is not None},
        )
    except ValidationError as exc:
        print(f"invalid engine options: {exc}")
        return 2
    try:
        asyncio.run(_serve(options, args.host, args.port, tls=not args.no_tls))
    except KeyboardInterrupt:
        pass
    return 0
