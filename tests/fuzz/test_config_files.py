"""Property tests of the configuration loader fed whole files: any bytes, any TOML.

The config file and the environment are operator input, read at start and on every
reload (SIGHUP); a typo must be a precise ``ConfigError``, never a crash that takes
the service down. ``tests/test_config.py`` covers mappings; these feed files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from voicebridge.config import FILE_SECTIONS, Config, load_config, render_config
from voicebridge.errors import ConfigError

SECTIONS = sorted(FILE_SECTIONS)
keys = st.sampled_from(sorted({a for s in FILE_SECTIONS.values() for a in s.__annotations__}))
toml_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True).map(lambda f: repr(f).replace("inf", "inf").replace("nan", "nan")),
    st.text(max_size=20).map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.sampled_from(["true", "false", "[]", "{}", "[1, 2]", "{ a = 1 }", "1979-05-27"]),
)


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    """TOML text shaped like a config file: known sections and keys, any values."""
    lines = []
    for section in draw(st.lists(st.sampled_from(SECTIONS) | st.text(max_size=6), max_size=4)):
        lines.append(f"[{section}]")
        for _ in range(draw(st.integers(min_value=0, max_value=4))):
            lines.append(f"{draw(keys)} = {draw(toml_values)}")
    return "\n".join(lines) + "\n"


def _load(content: bytes, environ: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "voicebridge.toml"
        path.write_bytes(content)
        try:
            config = load_config(path, environ=environ, require_complete=False)
        except ConfigError as exc:
            assert exc.reason, "a reason an operator can act on"
            return
    assert isinstance(config, Config)
    render_config(config)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | toml_documents().map(str.encode))
def test_any_file_loads_or_raises_config_error(content: bytes) -> None:
    _load(content, {})


@settings(max_examples=100, deadline=None)
@given(
    toml_documents().map(str.encode),
    st.dictionaries(
        st.sampled_from(
            [f"VOICEBRIDGE_{s}_{k}".upper() for s in SECTIONS for k in ("listen", "enabled", "x")]
        ),
        st.text(st.characters(blacklist_characters="\x00"), max_size=12),
        max_size=3,
    ),
)
def test_any_file_and_environment_load_or_raise_config_error(
    content: bytes, environ: dict[str, str]
) -> None:
    _load(content, environ)
