"""Twilio: the sans-I/O Media Streams protocol, TwiML, webhook signatures and stream tokens.

``media`` (the stream's wire protocol), ``twiml`` (documents we answer with),
``signature`` (``X-Twilio-Signature`` checks) and ``token`` (the per-call stream gate)
are imported from their modules; this package re-exports nothing.
"""
