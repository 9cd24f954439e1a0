"""voicebridge: answers Twilio phone calls and bridges each caller to a Vapi voice assistant."""

__version__ = "0.1.0"
