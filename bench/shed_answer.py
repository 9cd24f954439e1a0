"""How fast a busy bridge answers a refused call: the front door's early answer against
the same refusal through hypercorn and the app.

    .venv/bin/python bench/shed_answer.py                 # 3 rounds of each, 5 webhooks
    .venv/bin/python bench/shed_answer.py --rounds 4 --webhooks 8 --json /tmp/s.json

Each run starts ``tests/busy_server.py`` (the real ``serve()`` in its own process, on
loopback) with shedding on a low threshold, admits one call, then holds the server's
event loop ``BUSY_HOLD_MS`` at a time (a sleep, so that the benchmark takes no core
from a shared machine) with one turn for the other tasks in between: a loop behind on
every wake, as on a process with more calls than its core carries. Once admission
sheds, signed voice webhooks of new calls are posted one after another from this
process, each on a new connection as Twilio does, and the time from the request to the
whole answer is taken, and the turns the busy loop took meanwhile (its ``turn N``
lines). Runs alternate between the early answer (``on``) and the app's (``off``,
``BUSY_EARLY_ANSWER=off``). Printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import httpx  # noqa: E402

from tests.harness import SHORT_ASSISTANT  # noqa: E402
from tests.test_admission_e2e import (  # noqa: E402
    BUSY_HOLD_MS,
    SHED_WINDOW_S,
    running_busy_server,
)
from tests.test_e2e import OVERFLOW_WORDS  # noqa: E402
from voicebridge.sim.vapi import SimVapi  # noqa: E402


async def one_run(
    early_answer: bool, webhooks: int, run: int
) -> tuple[list[float], list[int]]:
    """The seconds and the turns of the busy loop each refused webhook took, in order."""
    vapi = SimVapi(api_key="k" * 32, behaviour=SHORT_ASSISTANT)
    seconds: list[float] = []
    turns: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            await nursery.start(vapi.serve)
            async with running_busy_server(
                Path(tmp), vapi, early_answer=early_answer
            ) as server, httpx.AsyncClient(
                limits=httpx.Limits(max_keepalive_connections=0), timeout=15
            ) as http:
                await server.post_webhook(http, "CA" + "1" * 32)
                server.process.send_signal(signal.SIGUSR1)
                await server.wait_for_line("busy")
                await trio.sleep(SHED_WINDOW_S + 0.2)
                for n in range(webhooks):
                    first = server.turn()
                    took, twiml = await server.post_webhook(http, f"CA{run:08x}{n:024x}")
                    if OVERFLOW_WORDS not in twiml.lower():
                        raise SystemExit(f"not refused: {twiml[:200]}")
                    await trio.sleep(0.01)  # the line of a turn that began as it came
                    seconds.append(took)
                    turns.append(server.turn() - first)
                if "idle" in server.stdout:
                    raise SystemExit("the busy spell ended before the last webhook")
            nursery.cancel_scope.cancel(reason="run done")
    return seconds, turns


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--webhooks", type=int, default=5, help="refused webhooks per run")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    print(f"loop held {BUSY_HOLD_MS} ms a turn; {args.webhooks} refused webhooks a run")
    print("| run | front door answers | answer p50 / max ms | turns of the busy loop |")
    print("|---|---|---|---:|")
    for round_ in range(args.rounds):
        for early in (True, False):
            seconds, turns = await one_run(early, args.webhooks, len(rows))
            ms = [s * 1000 for s in seconds]
            p50 = statistics.median(ms)
            row = {
                "round": round_ + 1,
                "early_answer": early,
                "answer_ms": [round(m, 1) for m in ms],
                "p50_ms": round(p50, 1),
                "max_ms": round(max(ms), 1),
                "turns": turns,
            }
            rows.append(row)
            print(
                f"| {'on' if early else 'off'} {round_ + 1} | {'yes' if early else 'no (app)'} "
                f"| {p50:,.0f} / {max(ms):,.0f} | {min(turns)}–{max(turns)} |",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    trio.run(main)
