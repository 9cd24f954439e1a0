"""The simulated Vapi's TLS (``voicebridge loadtest --vapi-tls``): its certificate and context.

In production the bridge's Vapi leg is ``wss://``. With ``--vapi-tls`` the load
generator's simulated Vapi serves its transport sockets over TLS too
(``loadtest.wire.TlsSession``), with a throwaway self-signed certificate that
``make_certificate`` makes at start with the ``openssl`` command: an EC P-256 key,
valid for a day, for ``IP:127.0.0.1``.

The bridge the load test starts trusts exactly that certificate and nothing else:
``trust_environment`` names it in ``SSL_CERT_FILE`` and an empty directory in
``SSL_CERT_DIR``, the two variables through which OpenSSL's default verify paths
(what ``ssl.create_default_context()`` loads) can be redirected. An external bridge
must be given the certificate before it starts (see ``voicebridge loadtest --help``).
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import trio
from attrs import frozen

from voicebridge.loadtest.process import LoadTestError

#: What ``make_certificate`` writes into its directory.
CERT_FILE = "vapi-cert.pem"
KEY_FILE = "vapi-key.pem"
#: The empty directory ``SSL_CERT_DIR`` names, so no system CA is trusted besides.
EMPTY_CA_DIR = "no-other-ca"


@frozen
class Certificate:
    """A PEM certificate and its private key."""

    cert: Path
    key: Path


async def make_certificate(directory: Path) -> Certificate:
    """A self-signed certificate for 127.0.0.1 in ``directory``; ``LoadTestError`` if not."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise LoadTestError(
            "--vapi-tls makes its certificate with the openssl command, which is not "
            "installed (e.g. apt-get install openssl)"
        )
    certificate = Certificate(directory / CERT_FILE, directory / KEY_FILE)
    command = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(certificate.key), "-out", str(certificate.cert),
    ]
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                    check=False)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise LoadTestError(
            f"openssl could not make the certificate (exit {result.returncode}): "
            + (detail[-1] if detail else "no message")
        )
    return certificate


def server_context(certificate: Certificate) -> ssl.SSLContext:
    """The simulated Vapi's TLS server context for ``certificate``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 0  # the bridge never resumes a session: send no tickets
    try:
        context.load_cert_chain(certificate.cert, certificate.key)
    except (OSError, ssl.SSLError) as exc:
        raise LoadTestError(
            f"cannot serve TLS with {certificate.cert} and {certificate.key}: {exc}"
        ) from None
    return context


def trust_environment(certificate: Certificate, directory: Path) -> dict[str, str]:
    """Environment variables under which a child process trusts only ``certificate``.

    ``directory`` receives the empty CA directory ``SSL_CERT_DIR`` points to.
    """
    empty = directory / EMPTY_CA_DIR
    empty.mkdir(exist_ok=True)
    return {"SSL_CERT_FILE": str(certificate.cert), "SSL_CERT_DIR": str(empty)}
