"""PersonaPlex WebSocket framing as pure code (docs/protocols.md, PersonaPlex).

Every message is binary `kind:u8 || payload`. The server reads `voice_prompt` and `text_prompt`
from the query and crashes on `seed`, so the URL is built here and never carries one.
"""

from urllib.parse import urlencode, urlsplit, urlunsplit

HANDSHAKE = 0x00
AUDIO = 0x01
TEXT = 0x02

CHAT_PATH = "/api/chat"


def chat_url(base: str, voice_prompt: str, text_prompt: str) -> str:
    """`ws(s)://host:port[/api/chat]` plus the two prompts the server requires."""
    parts = urlsplit(base)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"PersonaPlex URL must be ws:// or wss://, got {base!r}")
    if not text_prompt:
        raise ValueError("text_prompt must not be empty: the server dies on an empty prompt")
    path = parts.path.rstrip("/")
    if not path.endswith(CHAT_PATH):
        path += CHAT_PATH
    query = urlencode({"voice_prompt": voice_prompt, "text_prompt": text_prompt})
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def audio_message(ogg: bytes) -> bytes:
    return bytes([AUDIO]) + ogg


def split(message: bytes) -> tuple[int, bytes]:
    """(kind, payload); kind -1 for an empty message."""
    if not message:
        return -1, b""
    return message[0], message[1:]


def text_piece(payload: bytes) -> str | None:
    """A SentencePiece piece as spoken text, or None for control tokens like `<s>`."""
    piece = payload.decode("utf-8", errors="replace")
    stripped = piece.strip()
    if not stripped or (stripped.startswith("<") and stripped.endswith(">")):
        return None
    return piece
