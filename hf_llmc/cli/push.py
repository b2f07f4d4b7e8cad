"""``hf-llmc push DIR REPO``: upload a model folder to the Hub (torch-free)."""

from __future__ import annotations

import argparse
import sys

from ..config.errors import UsageError
from ..config.security import display_name
from ..outputs.hub import check_model_folder, push_folder


def run(args: argparse.Namespace) -> int:
    if args.create_pr and args.revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main; it cannot be combined with --revision")
    check_model_folder(args.dir)  # a usage error (exit 2) before any network traffic
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    url = push_folder(
        args.dir,
        args.repo,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    where = args.repo + (f"@{args.revision}" if args.revision else "")
    print(f"pushed {display_name(args.dir)} to {where}: {url}")  # plain print: never wrap the URL
    return 0
