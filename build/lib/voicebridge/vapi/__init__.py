"""Vapi: the transport socket's wire format (``transport``) and call set-up (``client``)."""
