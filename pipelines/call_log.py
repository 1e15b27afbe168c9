"""One call's events: what the call record stores and the metrics count, on one clock.

The server reports what comes from the provider. The output reports what it sent. The observer
(`pipelines/call_observer.py`) reports what the processors did. `t` is seconds since the call
started. The events, and their fields besides `t`:

    call_started      call_id, provider, sample_rate, custom_parameters, started_at (UTC ISO-8601)
    malformed         reason, count (running count for that reason)
    dtmf              digit
    mark_played       mark
    provider_stop     reason
    user_started      onset (estimated speech onset: VAD confirmation minus its start_secs)
    user_stopped
    bot_started       bot audio audible to the caller (clips included), from the pacer
    bot_stopped
    speech_started    context: the model speaks (bot_speech's utterances)
    speech_stopped    context
    bot_text          text: the model's words for the utterance just ended
    holding           clip, secs: a holding clip starts
    first_audio       ms: call start to the first bot audio sent
    barge_in          latency_ms: estimated caller speech onset to the provider `clear`
    engine_waiting    busy: every engine is serving a call; the call queues
    engine_acquired   url, wait_ms
    engine_ready      url, handshake_ms
    engine_failed     url, reason (the engine leaves the rotation)
    engine_released   url
    no_engine         reason
    apology           reason: the call ends with the apology clip (engine failure or drain)
    error             message
    draining          deadline_secs
    call_ended        outcome, seconds, dropped (reason -> count), stats (per processor)
"""

import datetime
import time

from loguru import logger

from pipelines.metrics import Metrics
from pipelines.records import CallRecord, record_dir


class CallLog:
    def __init__(self, call, metrics: Metrics | None = None, records_dir: str | None = None, audio: bool = False):
        self.call_id = call.call_id or call.stream_id
        self._t0 = time.monotonic()
        self._metrics = metrics
        self._record: CallRecord | None = None
        self._onset: float | None = None  # last caller speech onset, for barge-in latency
        self._first_audio = False
        self._text: list[str] = []
        self.outcome: str | None = None  # set by what decides it (drain, engine); the server fills the rest
        started = datetime.datetime.now(datetime.timezone.utc)
        if records_dir:
            try:
                self._record = CallRecord(record_dir(records_dir, self.call_id, started), call.sample_rate, audio)
            except OSError as exc:  # a full disk must not take calls down
                logger.error(f"call {self.call_id}: cannot write its record under {records_dir}: {exc}")
        self.emit("call_started", call_id=self.call_id, provider=call.provider, sample_rate=call.sample_rate,
                  custom_parameters=call.custom_parameters, started_at=started.isoformat(timespec="milliseconds"))

    @property
    def path(self):
        return self._record.path if self._record else None

    def now(self) -> float:
        return time.monotonic() - self._t0

    def emit(self, event: str, t: float | None = None, **data) -> None:
        if self._record is None:
            return
        try:
            self._record.event({"t": round(self.now() if t is None else t, 3), "event": event, **data})
        except OSError as exc:
            logger.error(f"call {self.call_id}: call record stopped: {exc}")
            self._record = None

    # ---- from the provider side -----------------------------------------------------------

    def malformed(self, reason: str, count: int) -> None:
        if self._metrics:
            self._metrics.malformed.labels(reason).inc()
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
        now = self.now()
        if self._record and self._record.audio:
            self._record.audio.cut(now)
        latency = None if self._onset is None else max(0.0, now - self._onset)
        self.emit("barge_in", latency_ms=None if latency is None else round(latency * 1000))
        if self._metrics:
            self._metrics.barge_ins.inc()
            if latency is not None:
                self._metrics.barge_in_latency.observe(latency)

    # ---- from the processors (via the observer) ------------------------------------------

    def user_started(self, onset: float) -> None:
        self._onset = onset
        self.emit("user_started", onset=round(onset, 3))

    def holding(self, clip: str, secs: float) -> None:
        if self._metrics:
            self._metrics.holding_clips.labels(clip).inc()
        self.emit("holding", clip=clip, secs=round(secs, 3))

    def text(self, piece: str) -> None:
        self._text.append(piece)

    def speech_stopped(self, context: str) -> None:
        self.emit("speech_stopped", context=context)
        self._flush_text()

    def engine(self, event: str, data: dict) -> None:
        if event == "no_engine":
            self.outcome = self.outcome or "no_engine"
        if self._metrics:
            if event == "engine_ready":
                self._metrics.handshake.observe(data.get("handshake_ms", 0) / 1000)
            elif event == "engine_acquired":
                self._metrics.engine_wait.observe(data.get("wait_ms", 0) / 1000)
            elif event == "engine_failed":
                self._metrics.engine_failures.inc()
        self.emit(event, **data)

    def apology(self, reason: str) -> None:
        self.outcome = self.outcome or ("drained" if reason == DRAIN_REASON else "engine_failed")
        self.emit("apology", reason=reason)

    def _flush_text(self) -> None:
        text = "".join(self._text).strip()
        self._text.clear()
        if text:
            self.emit("bot_text", text=text)
            if self._record:
                self._record.transcript(self.now(), text)

    # ---- the end ----------------------------------------------------------------------------

    def end(self, outcome: str, dropped: dict, stats: dict) -> str:
        """Close the record; returns the outcome that counts (what was decided during the call wins)."""
        outcome = self.outcome or outcome
        self._flush_text()
        self.emit("call_ended", outcome=outcome, seconds=round(self.now(), 3), dropped=dict(dropped), stats=stats)
        if self._metrics:
            self._metrics.calls.labels(outcome).inc()
        if self._record:
            try:
                self._record.close()
            except OSError as exc:
                logger.error(f"call {self.call_id}: closing its record: {exc}")
        return outcome


DRAIN_REASON = "the service is restarting"
