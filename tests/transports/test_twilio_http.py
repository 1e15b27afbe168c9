"""TwiML and X-Twilio-Signature checks, with signatures computed here from Twilio's published algorithm."""

import base64
import hashlib
import hmac
import xml.etree.ElementTree as ET

import pytest

from transports.base import HttpRequest
from transports.twilio import TwilioParams, TwilioProtocol
from transports.twilio_http import twiml_endpoint

TOKEN = "12345"


def sign(url: str, form: dict[str, str] | None = None) -> str:
    """HMAC-SHA1 over the URL plus each POST field name+value sorted by name, base64 (webhooks-security)."""
    data = url + "".join(k + v for k, v in sorted((form or {}).items()))
    return base64.b64encode(hmac.new(TOKEN.encode(), data.encode(), hashlib.sha1).digest()).decode()


def upgrade(headers: dict, scheme="http", host="10.0.0.5:5050", path="/twilio") -> HttpRequest:
    return HttpRequest(method="GET", scheme=scheme, host=host, path=path, headers=headers)


PARAMS = TwilioParams(auth_token=TOKEN)


def test_upgrade_without_a_token_configured_is_open():
    assert TwilioProtocol.authorize(TwilioParams(), upgrade({})) is None


def test_upgrade_signature_valid_missing_wrong():
    url = "wss://bot.example.com/twilio"
    params = PARAMS.model_copy(update={"public_url": "https://bot.example.com"})
    assert TwilioProtocol.authorize(params, upgrade({"X-Twilio-Signature": sign(url)})) is None
    assert "missing" in TwilioProtocol.authorize(params, upgrade({}))
    assert "does not match" in TwilioProtocol.authorize(params, upgrade({"X-Twilio-Signature": sign(url + "x")}))
    https_signed = sign("https://bot.example.com/twilio")  # the classic proxy mistake: signed as https
    assert TwilioProtocol.authorize(params, upgrade({"X-Twilio-Signature": https_signed})) is not None


def test_upgrade_behind_a_tls_proxy_maps_https_to_wss_and_uses_the_forwarded_host():
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "bot.example.com",
               "X-Twilio-Signature": sign("wss://bot.example.com/twilio")}
    assert TwilioProtocol.authorize(PARAMS, upgrade(headers)) is None
    untrusting = PARAMS.model_copy(update={"trust_forwarded_headers": False})
    assert TwilioProtocol.authorize(untrusting, upgrade(headers)) is not None  # then only the raw request counts


def test_twiml_post_is_signed_over_url_and_form_and_answers_connect_stream():
    form = {"CallSid": "CA1", "From": "+15550001111", "To": "+15550002222", "AccountSid": "AC1"}
    url = "https://bot.example.com/twilio/twiml?persona=sales"
    req = HttpRequest(method="POST", scheme="http", host="127.0.0.1:5050", path="/twilio/twiml",
                      query={"persona": "sales"}, query_string="persona=sales",
                      headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "bot.example.com",
                               "X-Twilio-Signature": sign(url, form)}, form=form)
    reply = twiml_endpoint(PARAMS, req)
    assert reply.status == 200 and reply.content_type == "application/xml"
    root = ET.fromstring(reply.body)
    stream = root.find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://bot.example.com/twilio"
    assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")} == {
        "persona": "sales", "from": "+15550001111", "to": "+15550002222"}
    forged = HttpRequest(**{**req.__dict__, "form": {**form, "To": "+19999999999"}})
    assert twiml_endpoint(PARAMS, forged).status == 403


def test_twiml_get_without_auth_builds_the_url_from_the_request_and_escapes_values():
    params = TwilioParams(parameters={"tenant": 'a"<b>'}, path="/twilio")
    req = HttpRequest(method="GET", scheme="http", host="localhost:5050", path="/twilio/twiml")
    root = ET.fromstring(twiml_endpoint(params, req).body)
    stream = root.find("./Connect/Stream")
    assert stream.get("url") == "ws://localhost:5050/twilio"
    assert stream.find("Parameter").get("value") == 'a"<b>'


def test_twiml_leaves_out_parameters_twilio_would_refuse():
    req = HttpRequest(method="GET", scheme="https", host="h", path="/twilio/twiml", query={"big": "x" * 600, "ok": "1"})
    root = ET.fromstring(twiml_endpoint(TwilioParams(), req).body)
    assert [p.get("name") for p in root.iter("Parameter")] == ["ok"]


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_twiml_other_methods_are_refused(method):
    req = HttpRequest(method=method, scheme="https", host="h", path="/twilio/twiml")
    assert twiml_endpoint(TwilioParams(), req).status == 405
