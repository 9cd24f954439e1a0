"""``voicebridge install-units``: put the units, the example configuration, the man page
and the documentation that travel in the wheel where systemd, man and the units look."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

#: Where each kind of file goes by default (what docs/operations.md installs).
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_MAN_DIR = "/usr/local/share/man"
DEFAULT_DOCS_DIR = "/opt/voicebridge/docs"
DEFAULT_EXAMPLE = "/etc/voicebridge/voicebridge.example.toml"
DEFAULT_CATALOG_DIR = "/usr/lib/systemd/catalog"

EXAMPLE_NAME = "voicebridge.example.toml"
MAN_PAGE = "voicebridge.8"
CATALOG = "voicebridge.catalog"


def shared_files() -> Traversable:
    """The ``share`` directory of the installed package (units, docs, man page)."""
    return resources.files("voicebridge") / "share"


def _files(directory: Traversable, *suffixes: str) -> Iterator[Traversable]:
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(suffixes):
            yield entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dest",
        default=DEFAULT_UNIT_DIR,
        metavar="DIR",
        help=f"where the systemd units go (default {DEFAULT_UNIT_DIR})",
    )
    parser.add_argument(
        "--man-dir",
        default=DEFAULT_MAN_DIR,
        metavar="DIR",
        help=f"man page root: voicebridge.8 goes to DIR/man8 (default {DEFAULT_MAN_DIR}); "
        "empty: none",
    )
    parser.add_argument(
        "--docs-dir",
        default=DEFAULT_DOCS_DIR,
        metavar="DIR",
        help=f"where the documentation goes (default {DEFAULT_DOCS_DIR}, the units' "
        "Documentation=); empty: none",
    )
    parser.add_argument(
        "--catalog-dir",
        default=DEFAULT_CATALOG_DIR,
        metavar="DIR",
        help=f"where the journal catalog goes (default {DEFAULT_CATALOG_DIR}; then run "
        "journalctl --update-catalog); empty: none",
    )
    parser.add_argument(
        "--example-config",
        default=DEFAULT_EXAMPLE,
        metavar="PATH",
        help=f"where the example configuration goes (default {DEFAULT_EXAMPLE}); empty: none. "
        "The configuration itself is never touched",
    )


def main(args: argparse.Namespace) -> int:
    """Copy the files; print one line per file written. 0, or 1 when one cannot be."""
    share = shared_files()
    plan: list[tuple[Traversable, Path, int]] = [
        (unit, Path(args.dest) / unit.name, 0o644)
        for unit in _files(share / "systemd", ".service", ".socket")
    ]
    if args.example_config:
        plan.append((share / "systemd" / EXAMPLE_NAME, Path(args.example_config), 0o644))
    if args.catalog_dir:
        plan.append((share / "systemd" / CATALOG, Path(args.catalog_dir) / CATALOG, 0o644))
    if args.man_dir:
        plan.append((share / "man" / MAN_PAGE, Path(args.man_dir) / "man8" / MAN_PAGE, 0o644))
    if args.docs_dir:
        plan += [
            (doc, Path(args.docs_dir) / doc.name, 0o644)
            for doc in _files(share / "docs", ".md", ".png")
        ]
    try:
        for source, target, mode in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(mode)
            print(f"installed {target}")
    except OSError as exc:
        print(f"voicebridge: install-units: {exc}", file=sys.stderr)
        return 1
    if Path(args.dest) == Path(DEFAULT_UNIT_DIR):
        print("now: systemctl daemon-reload", file=sys.stderr)
    if args.catalog_dir:
        print("now: journalctl --update-catalog", file=sys.stderr)
    return 0
