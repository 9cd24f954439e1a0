"""``python -m voicebridge``: the same as the ``voicebridge`` command."""

import sys

from voicebridge.cli import main

sys.exit(main())
