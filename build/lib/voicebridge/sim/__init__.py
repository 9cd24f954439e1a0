"""Realistic simulated peers (Twilio caller, Vapi, Twilio REST) for tests, demo and loadtest.

These are product code: ``voicebridge demo`` and ``voicebridge loadtest`` run on
them, so they follow docs/protocols.md to the letter (real-time pacing, exact
message shapes). ``audio`` holds the μ-law helpers and the shipped voice clips.
"""
