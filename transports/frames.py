"""Frames and call metadata shared by every provider transport.

Pipecat has no notion of a telephony call's start, stop or playback marks, so
the provider protocols translate those events into these frames.
"""

from dataclasses import dataclass, field

from pipecat.frames.frames import DataFrame, OutputAudioRawFrame, SystemFrame


@dataclass(frozen=True)
class CallInfo:
    """What the provider told us about one call when its stream started."""

    provider: str
    stream_id: str
    call_id: str
    sample_rate: int
    encoding: str = "pcm16"
    account_id: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)
    chunk_samples: int = 0  # samples per outbound media message the provider wants; 0: any size

    def as_metadata(self) -> dict:
        """Plain dict carried in StartFrame.metadata["call"] to every processor."""
        return {
            "provider": self.provider,
            "stream_id": self.stream_id,
            "call_id": self.call_id,
            "sample_rate": self.sample_rate,
            "encoding": self.encoding,
            "account_id": self.account_id,
            "from_number": self.from_number,
            "to_number": self.to_number,
            "custom_parameters": dict(self.custom_parameters),
            "chunk_samples": self.chunk_samples,
        }


@dataclass
class CallStartedFrame(SystemFrame):
    """The provider's `start` event: the call's identity and audio format."""

    call: CallInfo = None  # type: ignore[assignment]


@dataclass
class CallStoppedFrame(SystemFrame):
    """The provider's `stop` event: the caller hung up or the applet ended."""

    reason: str = ""


@dataclass
class MarkFrame(DataFrame):
    """Ask the provider to report when the audio queued before this frame has played.

    The field is `mark`, not `name`: pipecat's Frame.name is the frame's own label.
    """

    mark: str = ""


@dataclass
class MarkPlayedFrame(SystemFrame):
    """The provider reports that the audio before `mark` finished playing."""

    mark: str = ""


@dataclass
class PacedAudioFrame(OutputAudioRawFrame):
    """One provider-sized chunk released by the pacer at its send time.

    `epoch` counts the interruptions the pacer had seen when it released the chunk, so the output
    can refuse a chunk that reaches it after the `clear` it belongs before.
    """

    epoch: int = 0
