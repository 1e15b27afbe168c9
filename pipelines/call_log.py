"""One call's events: what the call record stores and the metrics count, on one clock.

The server reports what comes from the provider. The output reports what it sent. The observer
(`pipelines/call_observer.py`) reports what the processors did. `t` is seconds since the call
started. The events, and their fields besides `t`:

    call_started      call_id, provider, sample_rate, custom_parameters, started_at (UTC ISO-8601)
    malformed         reason, count (running count for that reason): like the log, the first 5 of
                      each reason, then every 100th; call_ended's `dropped` has the full counts
    dtmf              digit
    mark_played       mark
    provider_stop     reason
    user_started      onset: a VAD speech segment (estimated onset: VAD confirmation minus start_secs)
    user_stopped      the segment ends (after VAD's short stop hangover, ~0.2 s)
    turn_started      onset (of the segment that opened it, when one is open): the caller's turn
    turn_ended        segments (VAD segments in the turn): after the turn's longer silence (~0.7 s)
    bot_started       bot audio audible to the caller (clips included), from the pacer
    bot_stopped
    speech_started    context: the model speaks (bot_speech's utterances)
    speech_stopped    context
    bot_text          context, text (words the caller heard), muted (words said after a barge-in
                      and silenced, never heard; "" when none). An interrupted utterance's bot_text
                      waits for its mute_ended, so both halves land in one event.
    holding           clip, secs: a holding clip starts
    first_audio       ms: call start to the first bot audio sent
    barge_in          the provider `clear` answering a caller who took the floor:
                      latency_ms (caller speech onset over audible bot audio -> clear),
                      onset (that moment, call seconds), rule (barge_in's "floor"/"overlap"; null
                      when no BargeInFrame came: an interruption decided elsewhere), speech_ms
                      (caller speech the rule counted), decision_ms (BargeInFrame -> clear: what
                      the bridge adds after deciding), audio_ms (caller audio received when the
                      rule was met: the caller's chunk that decided it ends there)
    clear             a `clear` with no barge-in behind it (no decision, caller not talking: drain,
                      engine failure)
    mute_started      bot_speech starts silencing the interrupted model
    mute_ended        secs (model audio dropped), words (the model's words in it, never heard),
                      speech_secs (how far into the mute the model was still speaking)
    action            action (hang_up, transfer, persona, play, event), reason (what asked: "dtmf 0",
                      "idle", "max_duration", a processor's), clip, target, persona, name and data
                      (an event action's), refused (why nothing was done)
    transfer          target, to, ok, how (provider_rest, stream_end, page): the call handed over
    engine_waiting    busy: every engine is serving a call; the call queues
    engine_acquired   url, wait_ms
    engine_ready      url, handshake_ms
    engine_failed     url, reason (the engine leaves the rotation)
    engine_released   url
    no_engine         reason
    apology           reason: the call ends with the apology clip (engine failure or drain)
    error             message
    draining          deadline_secs
    record_truncated  max_bytes, written_bytes: the record reached `records.max_call_bytes`; only
                      call_ended follows
    call_ended        outcome, seconds, dropped (reason -> count), stats (per processor), record
                      (its directory, null without records); lines_dropped (events, transcript lines) after a record_truncated

Every field is capped and escaped by the record (`pipelines/records.py`), whoever sent it.

Barge-in latency counts from the later of the caller's speech onset and the bot becoming audible:
a caller who was already talking when the bot began did not wait for the bot while talking before
it, so timing from their own onset would blame the bridge for the model's choice to start.
"""

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from pipelines.metrics import Metrics
from pipelines.records import MAX_CALL_BYTES, CallRecord, record_dir
from transports.base import LOG_EVERY, LOG_FIRST
from transports.frames import ActionTakenFrame, EngineEvent, EngineEventFrame


@dataclass
class _Decision:
    """A BargeInFrame waiting for the `clear` it caused; times on the call's clock."""

    at: float
    onset: float
    rule: str
    speech_secs: float
    audio_secs: float | None
    audible_since: float | None  # the bot audible since, as the decision found it


class CallLog:
    """One call's events, where they go: each is written to the call's record (when records are on), and
    the metrics that event feeds are updated with it, all on the call's one clock (`t`, s since start).
    Not a logger: loguru lines are separate."""

    def __init__(self, call, metrics: Metrics | None = None, records_dir: str | None = None, audio: bool = False,
                 clock: Callable[[], float] = time.monotonic, max_bytes: int | None = MAX_CALL_BYTES,
                 on_event: Callable[[str, str, dict], None] | None = None):
        """`clock`: seconds, monotonic; a test steps its own to check latencies exactly.
        `max_bytes`: the record's events and transcript (None: no cap). `on_event(call_id, event,
        fields)`: every event also goes there, records or not (the call events webhook)."""
        self.call_id = call.call_id or call.stream_id
        self._on_event = on_event
        self._clock = clock
        self._t0 = clock()
        self._metrics = metrics
        self._record: CallRecord | None = None
        self._first_audio = False
        # caller speech and the floor, for barge-in latency
        self._onset: float | None = None  # last VAD segment's onset
        self._segment_open = False
        self._turn_segments: int | None = None  # VAD segments in the open turn; None outside a turn
        self._audible_since: float | None = None  # bot audible since (pacer's BotStarted)
        self._decision: _Decision | None = None
        self._last_clear: float | None = None
        self._last_clear_decided = True
        # the model's words, heard and muted
        self._speaking = False  # inside a model utterance
        self._context: str | None = None
        self._cut = False  # the utterance was interrupted: its muted rest is still to come
        self._text: list[str] = []  # the utterance's pieces so far, heard
        self._held: dict | None = None  # an interrupted utterance's heard words, waiting for its muted ones
        self._muted_since: float | None = None
        self._muted_text: list[str] = []  # pieces seen while muted (the mute's `words` is preferred)
        self.outcome: str | None = None  # set by what decides it (drain, engine); the server fills the rest
        started = datetime.datetime.now(datetime.UTC)
        if records_dir:
            try:
                self._record = CallRecord(record_dir(records_dir, self.call_id, started), call.sample_rate, audio,
                                          max_bytes)
            except OSError as exc:  # a full disk must not take calls down
                logger.error(f"call {self.call_id}: cannot write its record under {records_dir}: {exc}")
        self.emit("call_started", call_id=self.call_id, provider=call.provider, sample_rate=call.sample_rate,
                  custom_parameters=call.custom_parameters, started_at=started.isoformat(timespec="milliseconds"))

    @property
    def path(self):
        return self._record.path if self._record else None

    def now(self) -> float:
        return self._clock() - self._t0

    def emit(self, event: str, t: float | None = None, **data) -> None:
        if self._on_event is not None:
            self._on_event(self.call_id, event, data)
        if self._record is None:
            return
        try:
            self._record.event({"t": round(self.now() if t is None else t, 3), "event": event, **data})
        except OSError as exc:
            logger.error(f"call {self.call_id}: call record stopped: {exc}")
            self._record = None

    # ---- from the provider side -----------------------------------------------------------

    def malformed(self, reason: str, count: int) -> None:
        """Counted each time; recorded as the log does it, so a flood of bad messages cannot flood the record."""
        if self._metrics:
            self._metrics.malformed.labels(reason).inc()
        if count <= LOG_FIRST or count % LOG_EVERY == 0:
            self.emit("malformed", reason=reason, count=count)

    def caller_audio(self, pcm: bytes) -> None:
        if self._record and self._record.audio:
            self._record.audio.caller(pcm)

    # ---- from the output ------------------------------------------------------------------

    def bot_audio(self, pcm: bytes) -> None:
        now = self.now()
        if not self._first_audio:
            self._first_audio = True
            self.emit("first_audio", ms=round(now * 1000))
            if self._metrics:
                self._metrics.first_audio.observe(now)
        if self._record and self._record.audio:
            self._record.audio.bot(pcm, now)

    def cleared(self) -> None:
        """The provider `clear` went out: a barge-in when one was decided or the caller is talking.

        The decision is here first: the observer records its push, inline, before the
        InterruptionFrame it precedes has crossed a processor's queue to reach the output.
        """
        now = self.now()
        if self._record and self._record.audio:
            self._record.audio.cut(now)
        if self._speaking:
            self._cut = True
        decision, self._decision = self._decision, None
        self._last_clear, self._last_clear_decided = now, decision is not None
        if decision is None and not self._segment_open:
            self.emit("clear")
            return
        onset = decision.onset if decision else self._onset
        audible_since = decision.audible_since if decision else self._audible_since
        if onset is not None and audible_since is not None:
            onset = max(onset, audible_since)
        latency = None if onset is None else max(0.0, now - onset)
        self.emit("barge_in", latency_ms=_ms(latency), onset=None if onset is None else round(onset, 3),
                  rule=decision.rule if decision else None,
                  speech_ms=_ms(decision.speech_secs) if decision else None,
                  decision_ms=_ms(max(0.0, now - decision.at)) if decision else None,
                  audio_ms=_ms(decision.audio_secs) if decision else None)
        if self._metrics:
            self._metrics.barge_ins.labels(decision.rule if decision else "unknown").inc()
            if latency is not None:
                self._metrics.barge_in_latency.observe(latency)
            if decision:
                self._metrics.barge_in_decision.observe(max(0.0, now - decision.at))

    # ---- from the processors (via the observer) ------------------------------------------

    def user_started(self, onset: float) -> None:
        self._onset, self._segment_open = onset, True
        if self._turn_segments is not None:
            self._turn_segments += 1
        self.emit("user_started", onset=round(onset, 3))

    def user_stopped(self) -> None:
        self._segment_open = False
        self.emit("user_stopped")

    def turn_started(self) -> None:
        """The caller's turn; it opens with the VAD segment under way, whose onset it takes."""
        self._turn_segments = 1 if self._segment_open else 0
        onset = self._onset if self._segment_open else None
        self.emit("turn_started", onset=None if onset is None else round(onset, 3))

    def turn_ended(self) -> None:
        self.emit("turn_ended", segments=self._turn_segments)
        self._turn_segments = None

    def bot_started(self, at: float) -> None:
        """`at`: when the pacer pushed it."""
        self._audible_since = at
        self.emit("bot_started")

    def bot_stopped(self) -> None:
        self._audible_since = None
        self.emit("bot_stopped")

    def barge_in_decided(self, at: float, rule: str, speech_secs: float, onset_secs_ago: float, audio_secs: float | None = None) -> None:
        """A BargeInFrame pushed at `at`; its `clear` follows and writes the barge_in event."""
        if self._last_clear is not None and not self._last_clear_decided and self._last_clear >= at:
            # its clear was already written without it; pairing it with the next one would be wrong
            logger.warning(f"call {self.call_id}: barge-in decision ({rule}) seen after its clear; not paired")
            return
        self._decision = _Decision(at=at, onset=at - max(0.0, onset_secs_ago), rule=rule, speech_secs=speech_secs, audio_secs=audio_secs,
                                   audible_since=self._audible_since)
        if self._speaking:
            self._cut = True

    def mute_started(self) -> None:
        """bot_speech silences the interrupted model: what the utterance said so far is what was heard."""
        self._muted_since = self.now()
        if self._speaking:
            self._cut = True
        if self._cut:
            self._hold()
        self.emit("mute_started")

    def action(self, frame: ActionTakenFrame) -> None:
        """A call action taken (or refused); a final one decides the call's outcome."""
        self.emit("action", action=frame.action.value, **frame.details())
        if self._metrics:
            self._metrics.actions.labels(frame.action.value, "refused" if frame.refused else "taken").inc()
        if frame.outcome and not self.outcome:
            self.outcome = frame.outcome

    def mute_ended(self, secs: float, words: str, speech_secs: float = 0.0) -> None:
        """`words`: what bot_speech dropped. Pieces seen during the mute beyond those were heard:
        the observer sees a piece when the model pushes it, bot_speech judges it a little later."""
        muted, heard = _split_muted(self._muted_text, words)
        self._muted_text.clear()
        self._text[:0] = heard
        self._muted_since = None
        self.emit("mute_ended", secs=round(secs, 3), words=muted, speech_secs=round(speech_secs, 3))
        if self._metrics:
            self._metrics.muted_seconds.inc(max(0.0, secs))
        if not self._speaking:  # the cut utterance has stopped: its bot_text can go out whole
            self._cut = False
        self._release(muted)

    def holding(self, clip: str, secs: float) -> None:
        if self._metrics:
            self._metrics.holding_clips.labels(clip).inc()
        self.emit("holding", clip=clip, secs=round(secs, 3))

    def text(self, piece: str) -> None:
        (self._text if self._muted_since is None else self._muted_text).append(piece)

    def speech_started(self, context: str | None) -> None:
        self._release(_joined(self._muted_text))  # an earlier cut utterance whose mute never ended
        self._speaking, self._context, self._cut = True, context, False
        self.emit("speech_started", context=context)

    def speech_stopped(self, context: str | None) -> None:
        self._speaking = False
        self.emit("speech_stopped", context=context)
        if self._cut or self._muted_since is not None:
            self._hold()
        else:
            self._flush_text()

    def engine(self, frame: EngineEventFrame) -> None:
        event = frame.event
        if event is EngineEvent.NO_ENGINE:
            self.outcome = self.outcome or "no_engine"
        if self._metrics:
            if event is EngineEvent.READY:
                self._metrics.handshake.observe((frame.handshake_ms or 0) / 1000)
            elif event is EngineEvent.ACQUIRED:
                self._metrics.engine_wait.observe((frame.wait_ms or 0) / 1000)
            elif event is EngineEvent.FAILED:
                self._metrics.engine_failures.inc()
        self.emit(event.value, **frame.details())

    def apology(self, reason: str) -> None:
        self.outcome = self.outcome or ("drained" if reason == DRAIN_REASON else "engine_failed")
        self.emit("apology", reason=reason)

    # ---- the transcript ---------------------------------------------------------------------

    def _flush_text(self) -> None:
        """An utterance heard whole."""
        text = _joined(self._text)
        self._text.clear()
        if text:
            self.emit("bot_text", context=self._context, text=text, muted="")
            if self._record:
                self._record.transcript(self.now(), text)

    def _hold(self) -> None:
        """The heard part of a cut utterance: on the transcript now, in bot_text once its muted rest is known."""
        text = _joined(self._text)
        self._text.clear()
        if self._held is None:
            self._held = {"context": self._context, "text": ""}
        if text:
            self._held["text"] = f"{self._held['text']} {text}".strip()
            if self._record:
                self._record.transcript(self.now(), text)

    def _release(self, muted: str) -> None:
        """The cut utterance's bot_text: heard words and muted words apart."""
        held, self._held = self._held, None
        if held is None and not muted:
            return
        held = held or {"context": self._context, "text": ""}
        if held["text"] or muted:
            self.emit("bot_text", context=held["context"], text=held["text"], muted=muted)
        if muted and self._record:
            self._record.transcript(self.now(), muted, muted=True)

    # ---- the end ----------------------------------------------------------------------------

    def end(self, outcome: str, dropped: dict, stats: dict) -> str:
        """Close the record; returns the outcome that counts (what was decided during the call wins)."""
        outcome = self.outcome or outcome
        if self._cut or self._held is not None or self._muted_text:
            self._hold()
            self._release(_joined(self._muted_text))
        else:
            self._flush_text()
        self.emit("call_ended", outcome=outcome, seconds=round(self.now(), 3), dropped=dict(dropped), stats=stats,
                  record=str(self.path) if self.path else None)
        if self._metrics:
            self._metrics.calls.labels(outcome).inc()
        if self._record:
            try:
                self._record.close()
            except OSError as exc:
                logger.error(f"call {self.call_id}: closing its record: {exc}")
        return outcome


def _joined(pieces: list[str]) -> str:
    return " ".join("".join(pieces).split())


def _split_muted(pieces: list[str], words: str) -> tuple[str, list[str]]:
    """(muted words, pieces heard after all): the dropped `words` are the first pieces seen while muted."""
    target = "".join(words.split())
    for k in range(len(pieces) + 1):
        if "".join(_joined(pieces[:k]).split()) == target:
            return _joined(pieces[:k]), pieces[k:]
    return " ".join(words.split()), []  # words that do not line up with the pieces seen: trust the frame


def _ms(secs: float | None) -> int | None:
    return None if secs is None else round(secs * 1000)


DRAIN_REASON = "the service is restarting"
