"""Twilio's HTTP side as pure functions of a request: the TwiML answer and signature checks.

Twilio signs every request with HMAC-SHA1 of the URL it requested (plus POST fields) keyed by the
account's auth token (docs/protocols.md, Twilio). For the WebSocket upgrade the signed URL
is the `wss://` one from our TwiML, so behind a TLS proxy the URL we rebuild must map
https -> wss, and must use the public host, not the one the proxy dialled. The check itself is
the official SDK's (twilio.request_validator), which also tries the URL with and without the port.
"""

from urllib.parse import urlsplit
from xml.sax.saxutils import escape, quoteattr

from loguru import logger
from twilio.request_validator import RequestValidator

from transports.base import HttpReply, HttpRequest

PARAMETER_LIMIT = 500  # Twilio: each <Parameter> name + value under 500 characters
WS_SCHEMES = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}
HTTP_SCHEMES = {"wss": "https", "ws": "http", "https": "https", "http": "http"}


def _first(value: str | None) -> str | None:
    """A forwarded header may list one value per proxy; the first is the client-facing one."""
    return value.split(",")[0].strip() if value else None


def public_origin(params, request: HttpRequest) -> tuple[str, str]:
    """(scheme, host) as Twilio sees us: configured public_url, else forwarded headers, else the request."""
    if params.public_url:
        parts = urlsplit(params.public_url)
        return parts.scheme, parts.netloc
    scheme, host = request.scheme, request.host
    if params.trust_forwarded_headers:
        scheme = _first(request.headers.get("X-Forwarded-Proto")) or scheme
        host = _first(request.headers.get("X-Forwarded-Host")) or host
    return scheme, host


def signed_url(params, request: HttpRequest, websocket: bool) -> str:
    """The exact URL Twilio computed its signature over."""
    scheme, host = public_origin(params, request)
    scheme = (WS_SCHEMES if websocket else HTTP_SCHEMES).get(scheme.lower(), scheme)
    query = f"?{request.query_string}" if request.query_string else ""
    return f"{scheme}://{host}{request.path}{query}"


def check_signature(params, request: HttpRequest, websocket: bool) -> str | None:
    """Why the request is not from Twilio, or None when it is (or no auth token is configured)."""
    if not params.auth_token:
        return None
    signature = request.headers.get("X-Twilio-Signature")
    if not signature:
        return "missing X-Twilio-Signature"
    url = signed_url(params, request, websocket)
    if not RequestValidator(params.auth_token).validate(url, {} if websocket else request.form, signature):
        return f"X-Twilio-Signature does not match {url}"
    return None


def check_upgrade(params, request: HttpRequest) -> str | None:
    return check_signature(params, request, websocket=True)


def stream_url(params, request: HttpRequest) -> str:
    scheme, host = public_origin(params, request)
    return f"{WS_SCHEMES.get(scheme.lower(), 'wss')}://{host}{params.path}"


def stream_parameters(params, request: HttpRequest) -> dict[str, str]:
    """<Parameter>s for this call: configured ones, the webhook's query, and the caller's numbers."""
    out = dict(params.parameters)
    if params.forward_query:
        out.update(request.query)
    for field, name in (("From", "from"), ("To", "to")):
        if field in request.form:
            out.setdefault(name, request.form[field])
    return out


def twiml(url: str, parameters: dict[str, str]) -> str:
    """<Connect><Stream>: bidirectional, and the call waits on it until our socket closes."""
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<Response>", "  <Connect>", f"    <Stream url={quoteattr(url)}>"]
    for name, value in parameters.items():
        if len(name) + len(value) >= PARAMETER_LIMIT:
            logger.warning(f"twilio TwiML: parameter {name!r} is {len(name) + len(value)} characters (limit {PARAMETER_LIMIT}); left out")
            continue
        lines.append(f"      <Parameter name={quoteattr(name)} value={quoteattr(value)}/>")
    lines += ["    </Stream>", "  </Connect>", "</Response>", ""]
    return "\n".join(lines)


def dial_twiml(to: str) -> str:
    """<Dial> to a +E.164 number or a SIP URI (call_actions' transfer targets, checked at start-up)."""
    inner = f"<Sip>{escape(to)}</Sip>" if to.startswith(("sip:", "sips:")) else f"<Number>{escape(to)}</Number>"
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial>{inner}</Dial></Response>'


def twiml_endpoint(params, request: HttpRequest) -> HttpReply:
    """The voice webhook (GET or POST): a signed request gets the TwiML that connects the stream."""
    if request.method not in ("GET", "POST"):
        return HttpReply(405, f"{request.method} not allowed; Twilio calls the webhook with GET or POST\n")
    refusal = check_signature(params, request, websocket=False)
    if refusal:
        logger.warning(f"twilio TwiML webhook refused: {refusal}")
        return HttpReply(403, f"forbidden: {escape(refusal)}\n")
    return HttpReply(200, twiml(stream_url(params, request), stream_parameters(params, request)), "application/xml")
