"""Twilio Media Streams (bidirectional `<Connect><Stream>`) wire protocol as pure code.

docs/protocols.md, Twilio: μ-law 8 kHz both ways, camelCase keys, string numbers. Twilio
answers a malformed outbound message with error 31951 and may end the stream, so outbound
messages carry exactly the documented fields. A mark echo means "no longer queued" (played, or
flushed by a `clear`), which is what the pacer needs to know. The TwiML endpoint, signature checks
and REST hang-up live in transports/twilio_http.py.
"""

import audioop
import base64
from typing import Any
from urllib.parse import urlsplit

from loguru import logger
from pipecat.frames.frames import Frame
from pydantic import BaseModel, ConfigDict, Field, field_validator

from transports.base import Drop, HttpRequest, JsonProtocol, RateLimit, audio_frames, dtmf_frame, dump, pick, str_or_none
from transports.frames import CallInfo, CallStartedFrame
from transports.twilio_http import check_upgrade, dial_twiml, twiml_endpoint

RATE = 8000  # bidirectional streams are audio/x-mulaw at 8000 Hz, nothing else


class TwilioParams(BaseModel):
    """Transport settings; also the `transport.params` block of a Twilio deployment's YAML."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field("/twilio", description="WebSocket path of the <Stream> url")
    twiml_path: str = Field("/twilio/twiml", description="the voice webhook answering with TwiML (GET and POST)")
    public_url: str | None = Field(None, description="https://host[:port] callers reach us at; else Host/X-Forwarded-*")
    trust_forwarded_headers: bool = Field(True, description="honour X-Forwarded-Proto/Host behind a proxy")
    auth_token: str | None = Field(None, description="set: X-Twilio-Signature is required on TwiML and upgrade")
    account_sid: str | None = Field(None, description="with auth_token and hang_up: REST hang-up at call end")
    hang_up: bool = Field(True, description="end the call over REST when we hang up; needs account_sid + auth_token")
    api_base_url: str = "https://api.twilio.com"
    parameters: dict[str, str] = Field(default_factory=dict, description="<Parameter>s sent with every stream")
    forward_query: bool = Field(True, description="webhook query parameters (e.g. ?persona=sales) become <Parameter>s")
    chunk_ms: int = Field(40, ge=20, le=1000, description="bot audio per media message; a multiple of 20 ms")
    max_message_bytes: int = Field(16_384, gt=0, description=(
        "inbound messages over this are dropped undecoded; media are ~0.4 kB (160 B of μ-law), `start` grows "
        "with <Parameter>s (each under 500 characters)"))
    rate_limit: RateLimit | None = Field(
        default_factory=lambda: RateLimit(messages_per_sec=250, bytes_per_sec=200_000),
        description="per-call ceilings: 5x Twilio's 50 media messages/s, 10x their ~20 kB/s; null: none")

    @field_validator("path", "twiml_path")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value:
            raise ValueError(f"must start with '/' and carry no query string (Twilio refuses one): {value!r}")
        return value

    @field_validator("public_url")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if not value:
            return None  # `${TWILIO_PUBLIC_URL:-}` left empty: take Host / X-Forwarded-*
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.netloc or parts.path.strip("/") or parts.query:
            raise ValueError(f"must be an origin like https://bot.example.com (no path or query): {value!r}")
        return value

    @field_validator("auth_token", "account_sid")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("chunk_ms")
    @classmethod
    def _whole_frames(cls, value: int) -> int:
        if value % 20:
            raise ValueError(f"must be a multiple of 20 ms, got {value}")
        return value


class TwilioProtocol(JsonProtocol):
    """One call's Twilio media stream: inbound JSON -> pipecat frames, bot PCM -> μ-law `media`."""

    name = "twilio"

    def __init__(self, params: TwilioParams, query: dict[str, str] | None = None):
        super().__init__(params.max_message_bytes, params.rate_limit)
        self.params = params

    # ---- inbound -------------------------------------------------------------

    def _on_start(self, data: dict) -> list[Frame]:
        start = self.start_body(data, data.get("streamSid"))
        stream_sid = pick(start, "streamSid") or data.get("streamSid")
        call_sid = pick(start, "callSid")
        if not stream_sid or not call_sid:
            raise Drop("missing_sid", f"streamSid={stream_sid!r} callSid={call_sid!r}")
        media_format = start.get("mediaFormat") or {}
        encoding = str(pick(media_format, "encoding") or "audio/x-mulaw").lower()
        rate = str(pick(media_format, "sampleRate") or RATE)
        if "mulaw" not in encoding or rate != str(RATE):
            raise Drop("unsupported_media_format", f"call {call_sid}: {encoding} at {rate} Hz")
        custom = {str(k): str(v) for k, v in (pick(start, "customParameters") or {}).items()}
        self.call = CallInfo(
            provider=self.name,
            stream_id=str(stream_sid),
            call_id=str(call_sid),
            sample_rate=RATE,
            encoding="mulaw",
            account_id=str_or_none(pick(start, "accountSid")),
            from_number=custom.get("from"),  # Twilio's start has no numbers; our TwiML forwards them
            to_number=custom.get("to"),
            custom_parameters=custom,
            chunk_samples=RATE * self.params.chunk_ms // 1000,
        )
        logger.info(f"twilio call {call_sid}: stream {stream_sid} started, tracks {start.get('tracks')}")
        return [CallStartedFrame(call=self.call)]

    def _check_stream(self, kind: str, data: dict) -> CallInfo:
        call = self.require_call(kind)
        sid = data.get("streamSid")
        if sid is not None and sid != call.stream_id:
            raise Drop("wrong_stream_sid", f"{kind} for {str(sid)[:40]}")
        return call

    def _on_media(self, data: dict) -> list[Frame]:
        call = self._check_stream("media", data)
        media = data.get("media")
        track = pick(media, "track")
        if track not in (None, "inbound", "inbound_track"):
            raise Drop("not_inbound_track", repr(str(track)[:20]))
        return audio_frames(pick(media, "payload"), call, f"chunk {pick(media, 'chunk')}")

    def _on_dtmf(self, data: dict) -> list[Frame]:
        self._check_stream("dtmf", data)
        return [dtmf_frame(pick(data.get("dtmf"), "digit"))]

    def _on_mark(self, data: dict) -> list[Frame]:
        self._check_stream("mark", data)
        return JsonProtocol._on_mark(self, data)

    _handlers = {
        "connected": JsonProtocol._on_connected,
        "start": _on_start,
        "media": _on_media,
        "dtmf": _on_dtmf,
        "mark": _on_mark,
        "stop": JsonProtocol._on_stop,
    }

    # ---- outbound ------------------------------------------------------------

    def audio(self, pcm: bytes) -> list[str]:
        """Twilio plays media of any size in order; the pacer already sized and timed it."""
        call = self._started()
        if len(pcm) % 2:
            raise ValueError(f"PCM16 needs an even byte count, got {len(pcm)}")
        payload = base64.b64encode(audioop.lin2ulaw(pcm, 2)).decode("ascii")
        return [dump({"event": "media", "streamSid": call.stream_id, "media": {"payload": payload}})]

    def flush(self) -> list[str]:
        return []  # nothing is held back

    def mark(self, name: str) -> list[str]:
        return [dump({"event": "mark", "streamSid": self._started().stream_id, "mark": {"name": name}})]

    def clear(self) -> list[str]:
        """Twilio drops what it queued and echoes every pending mark."""
        return [] if self.call is None else [dump({"event": "clear", "streamSid": self.call.stream_id})]

    # ---- HTTP side (pure; see twilio_http.py) ----------------------------------

    @classmethod
    def authorize(cls, params: TwilioParams, request: HttpRequest) -> str | None:
        return check_upgrade(params, request)

    @classmethod
    def routes(cls, params: TwilioParams) -> dict[str, Any]:
        return {params.twiml_path: twiml_endpoint}

    transfer_by = "provider_rest"

    def transfer_request(self, params: TwilioParams, to: str) -> dict | None:
        """Twilio's way: update the live call with TwiML that dials `to` (its stream then ends); None
        without the account's credentials, which the REST API needs."""
        if not (params.account_sid and params.auth_token and self.call):
            return None
        return {
            "method": "POST",
            "url": f"{params.api_base_url.rstrip('/')}/2010-04-01/Accounts/{params.account_sid}/Calls/{self.call.call_id}.json",
            "data": {"Twiml": dial_twiml(to)},
            "auth": (params.account_sid, params.auth_token),
        }

    def hangup_request(self, params: TwilioParams) -> dict | None:
        """Ends the call when we hung up; after Twilio's `stop` the call is already over, and after a
        transfer it belongs to the dialled party."""
        if not (params.hang_up and params.account_sid and params.auth_token and self.call) or self._stopped or self.handed_over:
            return None
        return {
            "method": "POST",
            "url": f"{params.api_base_url.rstrip('/')}/2010-04-01/Accounts/{params.account_sid}/Calls/{self.call.call_id}.json",
            "data": {"Status": "completed"},
            "auth": (params.account_sid, params.auth_token),
        }
