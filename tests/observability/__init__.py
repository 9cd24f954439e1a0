"""Tests of voicebridge.observability."""
