"""``hf-llmc report OUT``: re-render the report of a scan or robustness folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from ..outputs.report import render
    from .common import console, print_scan_summary

    written = render(Path(args.out))
    print_scan_summary(json.loads(written["summary"].read_text()))
    for path in written.values():
        console.print(f"wrote {path}")
    return 0
