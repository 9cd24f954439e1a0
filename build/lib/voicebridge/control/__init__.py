"""Call control: Vapi's server webhooks, the tools they call, transfers, hang-ups, outbound calls.

``auth`` (webhook authentication), ``messages`` (the webhook envelope, sans-I/O),
``tools`` (tool handlers, deadlines, idempotency), ``live`` (the calls this process
holds), ``plane`` (what each message does) and ``routes`` (the HTTP endpoints) are
imported from their modules; this package re-exports nothing.
"""
