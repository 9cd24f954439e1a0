"""vapi-server-sdk's types, imported to read their declarations, never to validate with.

On import the SDK has pydantic build validators for some two thousand models, which
takes most of a minute on a busy two-core machine. The strict check
(``tests.contract.strict``) reads only what the models declare (fields, aliases,
annotations), so the SDK is imported with pydantic's validator building deferred:
``defer_build`` on the SDK's base model and its ``update_forward_refs`` (an eager
``model_rebuild``) made a no-op. Fields whose types the SDK names before importing
them stay forward references; the strict check resolves them itself. Import SDK types
in tests only through this module, so that the switch comes first.
"""

from __future__ import annotations

from typing import Any

import vapi.core.pydantic_utilities as _utilities

_utilities.UniversalBaseModel.model_config["defer_build"] = True


def _no_rebuild(model: type[Any], **localns: Any) -> None:
    """Stands in for the SDK's ``update_forward_refs``: leave the model unbuilt."""


_utilities.update_forward_refs = _no_rebuild

# The imports below must come after the switch above.
from vapi.calls.raw_client import RawCallsClient  # noqa: E402
from vapi.core.unchecked_base_model import UnionMetadata  # noqa: E402
from vapi.types.assistant_overrides import AssistantOverrides  # noqa: E402
from vapi.types.call import Call  # noqa: E402
from vapi.types.call_batch_response import CallBatchResponse  # noqa: E402
from vapi.types.call_transport import CallTransport_VapiWebsocket  # noqa: E402
from vapi.types.client_inbound_message_message import ClientInboundMessageMessage  # noqa: E402
from vapi.types.client_message_message import ClientMessageMessage  # noqa: E402
from vapi.types.server_message import ServerMessage  # noqa: E402
from vapi.types.server_message_message import ServerMessageMessage  # noqa: E402
from vapi.types.server_message_response_tool_calls import (  # noqa: E402
    ServerMessageResponseToolCalls,
)
from vapi.types.server_message_response_transfer_destination_request import (  # noqa: E402
    ServerMessageResponseTransferDestinationRequest,
)
from vapi.types.server_message_status_update import ServerMessageStatusUpdate  # noqa: E402
from vapi.types.subscription_limits import SubscriptionLimits  # noqa: E402

__all__ = [
    "AssistantOverrides",
    "Call",
    "CallBatchResponse",
    "CallTransport_VapiWebsocket",
    "ClientInboundMessageMessage",
    "ClientMessageMessage",
    "RawCallsClient",
    "ServerMessage",
    "ServerMessageMessage",
    "ServerMessageResponseToolCalls",
    "ServerMessageResponseTransferDestinationRequest",
    "ServerMessageStatusUpdate",
    "SubscriptionLimits",
    "UnionMetadata",
]
