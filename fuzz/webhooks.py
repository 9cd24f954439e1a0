"""Coverage-guided fuzzing of the webhooks through the real app (quart's test client).

The input picks the route and carries the raw form body; half the inputs are signed
(as Twilio signs), so that the fuzzer gets past the signature check. A crash is a
5xx answer (Twilio would play its generic error to the caller), a 200 that is not
TwiML, or any exception. Slower than the others (one trio run per input): a few
hundred inputs a second. Run: see ``fuzz/README.md``.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from urllib.parse import parse_qsl

import atheris
import trio

with atheris.instrument_imports():
    import httpx

    from voicebridge.loopback import loopback_config
    from voicebridge.server import build_services
    from voicebridge.twilio.signature import sign
    from voicebridge.web import AFTER_STREAM_PATH, VOICE_PATH, create_app

_TOKEN = "fuzz-auth-token-0123456789abcdef"
_PORT = 9
_CONFIG = loopback_config(
    port=_PORT, vapi_base_url="http://127.0.0.1:9", auth_token=_TOKEN, api_key="k"
)


async def _post(path: str, body: bytes, signed: bool) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signed:
        form = dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
        headers["X-Twilio-Signature"] = sign(f"http://127.0.0.1:{_PORT}{path}", form, _TOKEN)
    async with httpx.AsyncClient() as http:
        services = build_services(_CONFIG, http)
        app = create_app(lambda: services)
        response = await app.test_client().post(path, data=body, headers=headers)
        return response.status_code, await response.get_data(as_text=False)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    path = VOICE_PATH if data[0] & 1 else AFTER_STREAM_PATH
    status, answer = trio.run(_post, path, data[1:], bool(data[0] & 2))
    assert status in (200, 400, 403, 413), status
    if status == 200:
        assert ET.fromstring(answer).tag == "Response"


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
