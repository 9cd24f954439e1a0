"""Tool handlers the call-control tests configure as ``tests.control.handlers:<name>``."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import trio
import trio.lowlevel

from voicebridge.control.tools import ToolContext

#: How many times ``counted`` ran (idempotency tests read it).
RUNS: dict[str, int] = {}
#: Bounds the sync hang so that an abandoned worker thread ends soon after a test.
_HANG_S = 3.0


def lookup_order(arguments: Mapping[str, Any], context: ToolContext) -> str:
    return (
        f"Order {arguments.get('order', '?')} for {context.call_sid or 'nobody'} ships\ntomorrow."
    )


async def lookup_order_async(arguments: Mapping[str, Any], context: ToolContext) -> str:
    await trio.lowlevel.checkpoint()
    return f"Async order {arguments.get('order', '?')} ships tomorrow."


def explode(arguments: Mapping[str, Any], context: ToolContext) -> str:
    raise RuntimeError("the database is down")


async def hang(arguments: Mapping[str, Any], context: ToolContext) -> str:
    await trio.sleep_forever()


def hang_in_thread(arguments: Mapping[str, Any], context: ToolContext) -> str:
    threading.Event().wait(_HANG_S)
    return "too late"


def not_text(arguments: Mapping[str, Any], context: ToolContext) -> object:
    return object()


def json_data(arguments: Mapping[str, Any], context: ToolContext) -> object:
    return {"stock": 3, "sku": arguments.get("sku")}


def counted(arguments: Mapping[str, Any], context: ToolContext) -> str:
    RUNS[context.tool_call_id] = RUNS.get(context.tool_call_id, 0) + 1
    return f"run {RUNS[context.tool_call_id]}"


def digit_menu(arguments: Mapping[str, Any], context: ToolContext) -> str:
    return f"Menu option {arguments['digit']} is billing."
