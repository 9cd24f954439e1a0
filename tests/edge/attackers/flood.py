"""Attack (a): upgrade ``/twilio/stream`` without a token and flood frames before any ``start``.

Sends ``{"event":"x"}`` frames at ``--mbit`` Mbit/s (the measured attack: 18) for
``--seconds``, paced in 10 ms slices, and notes whether and when the server closed the
connection (a server with a budget for traffic before ``start`` does).
"""

from __future__ import annotations

import select
import time

from tests.edge.attackers.wire import Reader, arguments, connect, report, upgrade_request, ws_frame

#: The pacing slice: each slice sends its share of the rate at once (short enough that
#: the flood is steady, long enough that the pacing costs the attacker nothing).
SLICE_S = 0.050


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--mbit", type=float, default=18.0)
    args = parser.parse_args()
    sock = connect(args.port, args.source)
    sock.sendall(upgrade_request(args.port))
    status, _ = Reader(sock).head()
    if status != 101:
        report(status=status, bytes_sent=0, frames_sent=0, closed_by_server=True, closed_after_s=0)
        return
    frame = ws_frame(b'{"event":"x"}')
    per_slice = max(1, int(args.mbit * 1e6 / 8 * SLICE_S) // len(frame))
    chunk = frame * per_slice
    sock.settimeout(1.0)
    started = time.monotonic()
    deadline = started + args.seconds
    sent = 0
    closed_after: float | None = None
    next_slice = started
    while time.monotonic() < deadline:
        try:
            sock.sendall(chunk)
            sent += len(chunk)
            readable, _, _ = select.select([sock], [], [], 0)
            if readable and sock.recv(65536) == b"":
                raise ConnectionResetError
        except TimeoutError:
            pass  # the server is not reading: keep pushing
        except OSError:
            closed_after = time.monotonic() - started
            break
        next_slice += SLICE_S
        pause = next_slice - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    sock.close()
    report(
        status=status,
        bytes_sent=sent,
        frames_sent=sent // len(frame),
        mbit_per_s=round(sent * 8 / 1e6 / max(1e-9, time.monotonic() - started), 1),
        closed_by_server=closed_after is not None,
        closed_after_s=closed_after,
    )


if __name__ == "__main__":
    main()
