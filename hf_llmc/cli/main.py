"""``hf-llmc`` entry point: parse (torch-free), run the command's module, map errors to one line.

Exit codes: 0 success, 2 usage errors (bad spec, bad option values, unusable output folder), 1
other failures. No traceback, and no library's warning or log line, unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import typing
import warnings

from ..config.errors import HfLlmcWarning, exit_code
from .errors import cli_message
from .parser import build_parser


@contextlib.contextmanager
def third_parties_quiet(debug: bool, command: str = ""):
    """Without ``--debug``, no warning or log line of a library (bitsandbytes, peft, transformers,
    torch ...) reaches the terminal, so an error stays one line; with it, they all do. hf-llmc's
    own warnings (:class:`~hf_llmc.config.errors.HfLlmcWarning`) are shown as one line each,
    ``hf-llmc CMD: warning: ...``."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("always", category=HfLlmcWarning)

        def show(message, category, *_args, **_kwargs) -> None:
            from ..config.security import redact

            text = " ".join(str(message).split())
            print(f"hf-llmc {command}: warning: {redact(text)}", file=sys.stderr)

        warnings.showwarning = show
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-llmc`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # no datasets progress bars in logs (an error stays one line)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    with third_parties_quiet(args.debug, args.command):
        code = _run(parser, args)
    if _in_process_group():
        _leave(code)
    return code


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        command = importlib.import_module(f"{__package__}.{args.command_module}")
        return int(command.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI maps every failure to a one-line message
        from ..config.security import redact

        if args.debug:  # the full traceback, with any token in it redacted
            import traceback

            print(redact(traceback.format_exc()), end="", file=sys.stderr)
            return exit_code(err)
        print(f"hf-llmc {args.command}: error: {cli_message(err, parser, args.command)}", file=sys.stderr)
        return exit_code(err)


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")  # never imports torch itself
    return dist is not None and dist.is_available() and dist.is_initialized()


def _leave(code: int) -> typing.NoReturn:
    """End a process of a torchrun / accelerate launch run once its outputs are written.

    The interpreter's shutdown is skipped: gloo's worker threads may still be releasing the last
    collective's tensors, which needs the interpreter, and doing so while it shuts down aborts
    the process ("terminate called without an active exception"). Every file hf-llmc writes is
    closed (and fsynced) before this point; only the standard streams need a flush."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
