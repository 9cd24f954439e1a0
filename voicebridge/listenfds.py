"""Socket activation: take the listening sockets systemd passed us (sd_listen_fds(3)).

systemd (or ``systemd-socket-activate``) starts the service with the sockets open
from file descriptor 3 on and sets ``LISTEN_PID`` (the process they are meant for),
``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES`` (colon-separated names from the
socket units' ``FileDescriptorName=``). ``listen_sockets()`` turns them into
``socket.socket`` objects; ``hypercorn_binds()`` into hypercorn ``fd://N`` binds.

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

#: The name of a passed socket whose unit set no ``FileDescriptorName=`` (systemd's default).
UNNAMED = "unknown"

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


def hypercorn_binds(sockets: Iterable[ListenSocket]) -> list[str]:
    """hypercorn ``bind`` entries (``fd://N``) serving on ``sockets``; hands the fds over.

    hypercorn does not read ``LISTEN_FDS`` itself, but for a ``fd://N`` bind its
    ``Config.create_sockets`` wraps the existing descriptor N in its own
    ``socket.socket`` (checking it is a stream socket) without binding. Two Python
    socket objects must not own one descriptor (whichever is closed or collected first
    would close it under the other), so this *detaches* each ``ListenSocket.socket``:
    afterwards hypercorn's object alone owns the descriptor. Note that hypercorn calls
    ``listen(config.backlog)`` again on it, which replaces the unit's ``Backlog=``: set
    ``config.backlog`` to the same value.
    """
    binds: list[str] = []
    for item in sockets:
        fd = item.socket.detach()
        if fd < 0:
            raise ListenFdsError(f"socket {item.name!r} was already closed or handed over")
        binds.append(f"fd://{fd}")
    return binds
