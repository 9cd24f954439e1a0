"""The shipped TLS proxy configurations (deploy/), run for real in front of a bridge.

``nginx`` and ``haproxy`` start Debian's nginx or HAProxy with the file from deploy/ as
shipped, but for the addresses and paths a test must choose: where the proxy listens
(127.0.0.2 and up, a free port), its certificate (a throwaway one from
``make_certificate``) and where the bridge listens. Each replacement must match exactly
once, so the test breaks if the shipped file changes shape.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO / "deploy" / "nginx" / "voicebridge.conf"
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "voicebridge.cfg"
#: The name the throwaway certificate is for (the bridge's public host).
PUBLIC_HOST = "voicebridge.test"
PROXY_START_S = 10.0


@attrs.frozen
class Certificate:
    """A self-signed certificate (its own CA: trust ``cert``), its key, and both in one
    file (HAProxy's ``crt``)."""

    cert: Path
    key: Path
    combined: Path


@attrs.frozen
class Proxy:
    name: str
    process: trio.Process
    host: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


def make_certificate(directory: Path, hosts: tuple[str, ...]) -> Certificate:
    """A throwaway certificate for ``PUBLIC_HOST`` and the IP addresses ``hosts``."""
    openssl = shutil.which("openssl")
    assert openssl is not None
    cert, key, combined = (directory / name for name in ("cert.pem", "key.pem", "both.pem"))
    names = ",".join([f"DNS:{PUBLIC_HOST}", *(f"IP:{host}" for host in hosts)])
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={PUBLIC_HOST}", "-addext",
         f"subjectAltName={names}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    return Certificate(cert, key, combined)


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the shipped file no longer has exactly one {old!r}"
    return text.replace(old, new)


def nginx_config(directory: Path, host: str, port: int, bridge_port: int,
                 certificate: Certificate) -> Path:
    """deploy/nginx/voicebridge.conf in a minimal main configuration of its own."""
    site = NGINX_CONF.read_text()
    site = replace_once(site, "listen 443 ssl;", f"listen {host}:{port} ssl;")
    site = replace_once(site, "/etc/ssl/voicebridge/fullchain.pem", str(certificate.cert))
    site = replace_once(site, "/etc/ssl/voicebridge/privkey.pem", str(certificate.key))
    site = replace_once(site, "server 127.0.0.1:8080;", f"server 127.0.0.1:{bridge_port};")
    (directory / "voicebridge.conf").write_text(site)
    temp = "\n".join(f"    {kind}_temp_path {directory}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = directory / "nginx.conf"
    main.write_text(
        f"worker_processes 1;\n"
        f"user root root;\n"
        f"error_log {directory}/error.log notice;\n"
        f"pid {directory}/nginx.pid;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {directory}/access.log;\n{temp}\n"
        f"    include {directory}/voicebridge.conf;\n"
        "}\n"
    )
    return main


def haproxy_config(directory: Path, host: str, port: int, bridge_port: int,
                   certificate: Certificate) -> Path:
    """deploy/haproxy/voicebridge.cfg without the process settings a test cannot use."""
    config = HAPROXY_CFG.read_text()
    for line in ("    log /dev/log local0\n", "    chroot /var/lib/haproxy\n",
                 "    user haproxy\n", "    group haproxy\n"):
        config = replace_once(config, line, "")
    config = replace_once(config, "bind :443 ssl crt /etc/haproxy/voicebridge.pem",
                          f"bind {host}:{port} ssl crt {certificate.combined}")
    config = replace_once(config, "server bridge 127.0.0.1:8080",
                          f"server bridge 127.0.0.1:{bridge_port}")
    path = directory / "haproxy.cfg"
    path.write_text(config)
    return path


async def _wait_listening(host: str, port: int, process: trio.Process, log: Path) -> None:
    with trio.fail_after(PROXY_START_S):
        while True:
            if process.returncode is not None:
                said = await trio.Path(log).read_text(errors="replace")
                raise RuntimeError(f"the proxy exited ({process.returncode}): {said[-800:]}")
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.05)  # not listening yet: nothing to wait on but time
                continue
            await stream.aclose()
            return


@asynccontextmanager
async def running_proxy(
    name: str, directory: Path, host: str, bridge_port: int, certificate: Certificate
) -> AsyncIterator[Proxy]:
    """Debian's ``nginx`` or ``haproxy`` with the shipped file, in the foreground."""
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    log = directory / "proxy.log"
    if name == "nginx":
        config = nginx_config(directory, host, port, bridge_port, certificate)
        command = ["nginx", "-p", str(directory), "-c", str(config), "-g", "daemon off;"]
    else:
        config = haproxy_config(directory, host, port, bridge_port, certificate)
        command = ["haproxy", "-db", "-f", str(config)]
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await _wait_listening(host, port, process, log)
        yield Proxy(name, process, host, port, log)
    finally:
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
