"""``voicebridge loadtest``: many simulated calls against one bridge, and what they measured.

- ``wire``: lean HTTP/WebSocket plumbing for the generator;
- ``generator``: the simulated callers and assistants, with sequence-numbered audio;
- ``process``: the bridge under test in its own pinned process, CPU and RSS from /proc;
- ``run``: one load test from start to ``report.LoadReport`` (table and ``--json``).
"""
