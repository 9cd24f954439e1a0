"""No attack: one connection that sends nothing and stays ``--seconds``. The control run."""

from __future__ import annotations

import time

from tests.edge.attackers.wire import arguments, connect, report


def main() -> None:
    args = arguments(__doc__ or "").parse_args()
    sock = connect(args.port, args.source)
    time.sleep(args.seconds)
    sock.close()
    report(connections=1)


if __name__ == "__main__":
    main()
