"""Coverage-guided fuzzing of the configuration loader (``config.load_config``).

Each input is a whole config file. A crash is any exception but ``ConfigError``
(an operator's typo must be a precise error, never a traceback), or a loaded config
that ``render_config`` cannot print. Run: see ``fuzz/README.md``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from voicebridge.config import load_config, render_config
    from voicebridge.errors import ConfigError

_PATH = os.path.join(tempfile.mkdtemp(prefix="vb-fuzz-"), "voicebridge.toml")


def test_one_input(data: bytes) -> None:
    with open(_PATH, "wb") as file:
        file.write(data)
    try:
        config = load_config(_PATH, environ={}, require_complete=False)
    except ConfigError:
        return
    render_config(config)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
