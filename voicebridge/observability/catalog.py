"""Fixed journald ``MESSAGE_ID``s of voicebridge's log events, and the catalog that explains them.

Every event an operator may act on has a 128-bit ``MESSAGE_ID`` that never changes, so
that ``journalctl MESSAGE_ID=…`` finds it across versions, and ``journalctl -x`` shows
what it means and what to do, from the catalog ``systemd/voicebridge.catalog``
(installed into ``/usr/lib/systemd/catalog/``, then ``journalctl --update-catalog``).
A ``call-end`` has one id per ``OUTCOME`` (the outcome table of docs/operations.md);
every other event one id. ``tests/observability/test_catalog.py`` keeps this table and
the catalog file in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from voicebridge.bridge.outcome import Outcome

#: ``EVENT`` (``call-end/<OUTCOME>`` for call ends) -> ``MESSAGE_ID``.
MESSAGE_IDS: Final[Mapping[str, str]] = {
    "call-end/caller-hung-up": "8c3247da4a044bb5ba6a3c78650accfb",
    "call-end/assistant-ended": "9cb833826708456990c55c86be4d1d2a",
    "call-end/assistant-over-limit": "846620779f474a40bf9cdbf391533408",
    "call-end/transferred": "deaf756b887c40ca93c892b316032af8",
    "call-end/ended-by-control": "2ebc6465746f4726b92050bca01f9f6e",
    "call-end/assistant-leg-failed": "52a01ccc83ef463899454b86be3f55e3",
    "call-end/stream-lost": "ec18ef8623544a2c87f6f4b0ae3f4a1b",
    "call-end/protocol-error": "ab0a0973aa954922a6f2af725448fb70",
    "call-end/token-rejected": "1008d97b8ceb40b0b89bde1993902700",
    "call-end/shutdown": "1fd93a73d164433f93d6a8f93b135a60",
    "call-end/internal-error": "4bf7e903b1d54eee995b3547dbe144b6",
    "assistant-auth-failing": "fa94a4c0c84c4d0ea9bed5820df8c37b",
    "call-start": "7c9c233adb75492c818abe4d23bca70d",
    "call-refused": "4665c93507de4aa582f6520e77ee51c6",
    "webhook-rejected": "d981b724e2c64532986a540978163f82",
    "webhook-repeated": "4fdebd57168f429dae48ac54206fa5d2",
    "stream-error": "5532cb425ce44ae2871d5fe5b23757f2",
    "after-stream-unknown": "37a162e6e49e4d29bee887359bb22b88",
    "starting": "a506aedfa39c4baa9a5ca4016e7920ee",
    "listening": "5337cfbfb5c742f48bd88dc16929a60d",
    "drain-start": "6315aaac554a473d8c929788af0c2d72",
    "drain-deadline": "ca4def727018402c8decf27277059de5",
    "drain-done": "825afee3abd140d7b5a126d791712093",
    "stop-now": "08365ae02f054579aa043f196b0e2243",
    "reloaded": "8bc742d376c14b6e856fa7eb8773992a",
    "reload-failed": "53dbf38081564088a719d678f30babb9",
    "reload-needs-restart": "4544281d76644751a496f324e73a4a68",
    "stopped": "4d78ffd284064c0197253b5cf08b0796",
    "sd-notify-failed": "e1a6938b6aec4195809bc3f0040bbdd4",
    "shared-dir-failed": "be74cde439b74feab4ea128e7c904373",
    "cluster-store-failed": "9ae970389a82421aab521f0347313eba",
    "cluster-store-recovered": "6e98da73e45e43e1939108fee7b8b607",
    "descriptor-limit-low": "8dc2fd25a0fd4c2ca3559a21196b9fc1",
    "loop-stalled": "3c342d154de34700a38a72a7d1e62a71",
    "log-suppressed": "54303a04d818493ab50efa6d70ecd719",
    "log-entries-dropped": "8dab774a51f54fbb9f789a2a69f54085",
}

# Every outcome has its id: a new outcome without one fails at import, not in production.
assert {f"call-end/{outcome.value}" for outcome in Outcome} <= MESSAGE_IDS.keys()


def message_id(event: object, outcome: object = None) -> str | None:
    """The ``MESSAGE_ID`` of an entry with these ``EVENT`` and ``OUTCOME`` fields, if any."""
    if not isinstance(event, str):
        return None
    if event == "call-end" and isinstance(outcome, str):
        return MESSAGE_IDS.get(f"call-end/{outcome}")
    return MESSAGE_IDS.get(event)
