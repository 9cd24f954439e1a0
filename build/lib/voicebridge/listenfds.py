"""Socket activation: take the listening sockets systemd passed us (sd_listen_fds(3)).

systemd (or ``systemd-socket-activate``) starts the service with the sockets open
from file descriptor 3 on and sets ``LISTEN_PID`` (the process they are meant for),
``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES`` (colon-separated names from the
socket units' ``FileDescriptorName=``). ``listen_sockets()`` turns them into
``socket.socket`` objects; ``by_role()`` tells the public listener's from the ops
listener's by those names.

Because systemd keeps the listening socket open across restarts of the service,
connections that arrive while the service restarts wait in the backlog instead of
being refused.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, MutableMapping

import attrs

from voicebridge.errors import VoicebridgeError

#: The first passed file descriptor (after stdin, stdout, stderr).
SD_LISTEN_FDS_START = 3

#: The name of a passed socket that came without one (``LISTEN_FDNAMES`` unset).
UNNAMED = "unknown"
#: ``FileDescriptorName=`` of the ops listener's sockets (voicebridge-ops.socket,
#: voicebridge-ops@.socket): ``/healthz``, ``/readyz`` and ``/metrics`` are served there.
OPS = "ops"
#: ``FileDescriptorName=`` of the public listener's socket (voicebridge.socket). Every
#: name but ``OPS`` is served as public: a unit without ``FileDescriptorName=`` (systemd
#: then names the socket after the unit) or with an older name keeps working.
PUBLIC = "public"

_ENV_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ListenFdsError(VoicebridgeError):
    """The socket-activation environment is malformed, or a passed fd is not a socket."""


@attrs.frozen(eq=False)
class ListenSocket:
    """One socket passed by systemd, and its ``FileDescriptorName=``."""

    name: str
    socket: socket.socket

    @property
    def fd(self) -> int:
        return self.socket.fileno()


def listen_sockets(
    environ: MutableMapping[str, str] | None = None,
    *,
    unset_environment: bool = True,
) -> list[ListenSocket]:
    """The sockets systemd passed to this process, in order; ``[]`` when none were.

    ``environ`` defaults to ``os.environ``. Sockets are returned only when
    ``LISTEN_PID`` equals our pid (the variables may have been inherited from a parent
    they were meant for). Each descriptor is marked close-on-exec, and with
    ``unset_environment`` (the default) the three variables are removed, so neither
    a child process nor a second call takes the same sockets again.

    Raises ``ListenFdsError`` when ``LISTEN_FDS``/``LISTEN_FDNAMES`` are malformed or a
    passed descriptor is not a socket: a deployment error worth failing loudly for.
    """
    env = os.environ if environ is None else environ
    try:
        return _listen_sockets(env)
    finally:
        if unset_environment:
            for name in _ENV_VARS:
                env.pop(name, None)


def _listen_sockets(env: MutableMapping[str, str]) -> list[ListenSocket]:
    pid = env.get("LISTEN_PID")
    if pid is None or pid.strip() != str(os.getpid()):
        return []
    count_text = env.get("LISTEN_FDS", "")
    if not count_text.isdigit():
        raise ListenFdsError(f"LISTEN_FDS={count_text!r} is not a number")
    count = int(count_text)
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text else [UNNAMED] * count
    if len(names) != count:
        raise ListenFdsError(
            f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} descriptors"
        )
    sockets: list[ListenSocket] = []
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    for fd, name in zip(fds, names, strict=True):
        try:
            os.set_inheritable(fd, False)
            # With fileno= and no family/type, Python asks the kernel (SO_DOMAIN,
            # SO_TYPE, SO_PROTOCOL), so TCP, UDP and AF_UNIX sockets all come out right.
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ListenFdsError(f"passed descriptor {fd} ({name!r}) is unusable: {exc}") from exc
        sockets.append(ListenSocket(name=name or UNNAMED, socket=sock))
    return sockets


@attrs.frozen(eq=False)
class Roles:
    """The passed sockets, by what is served on them."""

    #: Twilio's and Vapi's routes: the front door.
    public: tuple[socket.socket, ...]
    #: Health and metrics: the ops listener.
    ops: tuple[socket.socket, ...]


def by_role(sockets: Iterable[ListenSocket]) -> Roles:
    """``sockets`` split by name: those named ``OPS`` are the ops listener's, every other
    one (``PUBLIC``, unnamed, any older name) the public listener's. Order is kept."""
    items = list(sockets)
    return Roles(
        public=tuple(item.socket for item in items if item.name != OPS),
        ops=tuple(item.socket for item in items if item.name == OPS),
    )
