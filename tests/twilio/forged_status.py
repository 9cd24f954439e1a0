"""A forger of Twilio stream status callbacks, run as its own OS process.

``python -m tests.twilio.forged_status --target=HOST:PORT --source=127.0.0.2 --count=N``

Posts ``N`` ``stream-error`` callbacks to ``/twilio/stream-status`` as fast as the
bridge answers, each forged a different way in turn: no signature, a signature made
with a guessed key, and a claim of shared-key signing (the settings header) with a
signature over the Auth Token's guess. The error text tries to forge a log line. Prints
one JSON line: how many answers of each HTTP status it got.

Plain blocking ``http.client``: this process shares nothing with the bridge but
loopback, so whatever it does cannot stall the bridge's event loop from inside.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import sys
from collections import Counter
from urllib.parse import urlencode

#: Guards every request: a bridge that stops answering fails the run.
SOCKET_TIMEOUT_S = 10.0
PATH = "/twilio/stream-status"


def _form(index: int) -> dict[str, str]:
    return {
        "AccountSid": "AC" + "0" * 32,
        "CallSid": f"CA{index:032x}",
        "StreamSid": f"MZ{index:032x}",
        "StreamEvent": "stream-error",
        "StreamError": f"3{index % 10000:04d} forged\nWARNING voicebridge: forged line",
        "Timestamp": "2026-12-02T00:00:00.000Z",
    }


def _guessed_signature(url: str, form: dict[str, str], digest: str) -> str:
    text = url + "".join(name + form[name] for name in sorted(form))
    mac = hmac.new(b"guessed-key", text.encode(), getattr(hashlib, digest))
    return base64.b64encode(mac.digest()).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--source", default="127.0.0.2")
    parser.add_argument("--public-url", required=True)
    parser.add_argument("--count", type=int, default=30)
    args = parser.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    statuses: Counter[int] = Counter()
    for index in range(args.count):
        form = _form(index)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        url = args.public_url + PATH
        match index % 3:
            case 0:
                pass  # no signature at all
            case 1:
                headers["X-Twilio-Signature"] = _guessed_signature(url, form, "sha1")
            case _:
                headers["X-Twilio-Signature"] = _guessed_signature(url, form, "sha256")
                headers["X-Twilio-Webhooks-Signature-Settings"] = "key=k,algorithm=HMAC_SHA256"
        connection = http.client.HTTPConnection(
            host, int(port), timeout=SOCKET_TIMEOUT_S, source_address=(args.source, 0)
        )
        try:
            connection.request("POST", PATH, body=urlencode(form), headers=headers)
            response = connection.getresponse()
            response.read()
            statuses[response.status] += 1
        finally:
            connection.close()
    print(json.dumps({str(status): count for status, count in statuses.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
