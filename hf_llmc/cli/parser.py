"""The ``hf-llmc`` argument parser, built from the settings dataclasses' fields and help texts.

Torch-free: it imports only :mod:`hf_llmc.config`, so ``hf-llmc --help``, ``hf-llmc CMD --help``
and every usage error answer without loading torch or transformers. Each command names the module
that runs it (``args.command_module``), imported only when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ..config.data import DataConfig
from ..config.fields import choices, flag_of, without_none
from ..config.load import LoadConfig
from ..config.merge import AutoConfig, ExportConfig, MergeSpec, PushConfig
from ..config.mergekit import MergekitOptions
from ..config.scan import METRIC_HELP, RobustnessConfig, ScanConfig, SequentialConfig
from ..config.search import SearchConfig
from ..config.security import redact


# -- dataclass settings -> arguments -----------------------------------------------------------
def add_fields(parser: argparse.ArgumentParser, cls, *, exclude: tuple[str, ...] = (), group: str | None = None) -> None:
    """Add one ``--option`` per dataclass field of ``cls``, with the field's help text; a
    ``Literal`` type gives the option's choices."""
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("cli") is False:
            continue
        flag = flag_of(f)
        help_text = f.metadata.get("help", "")
        tp = without_none(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            target.add_argument(flag, action="store_true", default=default, help=help_text)
            continue
        kwargs = dict(default=default, help=help_text, dest=f.name)
        allowed = choices(tp)
        if allowed is not None:
            kwargs["choices"] = list(allowed)
        elif tp in (int, float):
            kwargs["type"] = tp
            kwargs["metavar"] = "N" if tp is int else "X"
        target.add_argument(flag, **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """Build ``cls`` from the parsed arguments that match its fields."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def _help(cls, name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def add_pair_args(p: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                  optional: bool = False) -> None:
    """The two model arguments and the loading options (all, all but ``exclude``, or ``only`` these);
    ``optional``: the models may be omitted (they come from elsewhere, e.g. a mergekit config)."""
    if only is not None:
        exclude = tuple(f.name for f in dataclasses.fields(LoadConfig) if f.name not in only)
    nargs = {"nargs": "?"} if optional else {}
    p.add_argument("model_a", help="Model A: local folder or Hub id.", **nargs)
    p.add_argument("model_b", help="Model B: local folder or Hub id.", **nargs)
    add_fields(p, LoadConfig, group="loading", exclude=exclude)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation data")
    g.add_argument("--data", action="append", metavar="[NAME=]PATH", help=_help(DataConfig, "data"))
    g.add_argument("--dataset", action="append", metavar="[SET=]NAME", help=_help(DataConfig, "dataset"))
    add_fields(g, DataConfig, exclude=("data", "dataset"))
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="Blocks per forward (default: automatic, halving on out-of-memory).")


def add_run_dir_args(p: argparse.ArgumentParser, default_out: str, what: str) -> None:
    p.add_argument("--no-prefix", action="store_true", help="Run every point through the whole model (no prefix reuse; same numbers, slower).")
    p.add_argument("--out", default=default_out, help=f"Output folder ({what}).")
    p.add_argument("--resume", action="store_true", help="Continue an interrupted run in --out (refused if its settings differ).")
    p.add_argument("--overwrite", action="store_true", help="Replace the results in an existing, non-empty --out.")


# -- parser --------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and never echo a token (exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {redact(message)} (see `{self.prog} --help`)\n")


def _command(sub, name: str, module: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(command_module=module)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The whole ``hf-llmc`` parser (every command and option)."""
    parser = Parser(prog="hf-llmc", description="Layer-wise linear mode connectivity for Hugging Face checkpoints.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks, and the warnings and log lines of the libraries used.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "layers", "layers", "List the addressable layer groups of a model.")
    p.add_argument("model", help="Local folder or Hub id.")
    p.add_argument("model_b", nargs="?", metavar="MODEL_B", help="A second model: also compare the two vocabularies (shared size, tokens added on each side, embedding rows).")
    p.add_argument("--select", help="Only the groups this spec resolves to, e.g. attn.0-3.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    p.add_argument("--revision", help="Hub revision.")
    p.add_argument("--trust-remote-code", action="store_true", help="Run custom modelling code shipped with the checkpoint.")

    p = _command(sub, "barrier", "barrier", "Barrier of a layer-wise (or full) interpolation path.")
    add_pair_args(p)
    add_data_args(p)
    p.add_argument("--layers", help="Layer spec (default: the full model), e.g. attn.0-3,mlp.7 or re:<regex>.")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="Comma-separated α values or a count N of evenly spaced points (0.5 always included).")
    p.add_argument("--base", choices=["a", "b"], default="a", help="Which model the unselected tensors come from.")
    p.add_argument("--method", choices=["lerp", "slerp"], default="lerp", help="Interpolation method per tensor.")
    p.add_argument("--allow-extrapolation", action="store_true", help="Allow α outside [0, 1].")
    p.add_argument("--metric", choices=["loss", "bpb"], default="loss", help=METRIC_HELP + " Both are reported; this chooses what --decide / --target-se use.")
    p.add_argument("--json-out", help="Write the result as JSON to this file.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --json-out file.")
    p.add_argument("--parallel", choices=["none", "data"], default="none", help="Under torchrun / accelerate launch: 'data' splits the token blocks across processes (per-block sums gathered).")
    add_fields(p, SequentialConfig, group="sequential estimation (stop once the error bar allows)")

    p = _command(sub, "demo", "demo", "Build a small demo pair and run a scan, a merge and a model card on it.")
    p.add_argument("--out", default="hf-llmc-demo", help="Output folder.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")

    p = _command(sub, "push", "push", "Upload a model folder to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`).")
    p.add_argument("dir", help="Model folder (config.json + weights, or a PEFT adapter).")
    p.add_argument("repo", help="Hub model repo id, e.g. user/name (created if missing).")
    p.add_argument("--private", action="store_true", help="Create the repo as private (an existing repo keeps its visibility).")
    p.add_argument("--revision", metavar="BRANCH", help="Branch to commit to (created from main if missing).")
    p.add_argument("--commit-message", metavar="M", help="Commit message.")
    p.add_argument("--create-pr", action="store_true", help="Open a pull request against main instead of committing.")

    p = _command(sub, "merge", "merge", "Write a layer-wise merge of A and B (streamed safetensors + model card).")
    add_pair_args(p, exclude=("dtype",), optional=True)
    g = p.add_argument_group("what to merge")
    add_fields(g, MergeSpec)
    g.add_argument("--set", dest="sets", action="append", metavar="LAYERS=ALPHA", help=_help(MergeSpec, "sets"))
    add_fields(p, AutoConfig, group="automatic choice")
    add_fields(p, MergekitOptions, group="mergekit configs")
    add_fields(p, ExportConfig, group="output")
    g = p.add_argument_group("evaluation (perplexities and barrier in the model card)")
    g.add_argument("--eval-data", "--data", dest="data", action="append", metavar="[NAME=]PATH", help=_help(DataConfig, "data"))
    g.add_argument("--eval-dataset", "--dataset", dest="dataset", action="append", metavar="[SET=]NAME", help=_help(DataConfig, "dataset"))
    add_fields(g, DataConfig, exclude=("data", "dataset"))
    g.add_argument("--batch-size", type=int, default=None, metavar="N", help="Blocks per forward (default: automatic).")
    add_fields(p, PushConfig, group="publishing")

    p = _command(sub, "run", "run", "Run a YAML recipe: model pairs, data, barriers, scans, merges, pushes.")
    p.add_argument("recipe", nargs="?", help="Recipe file (see recipes/ and `hf-llmc run --schema`).")
    p.add_argument("--check", action="store_true", help="Validate the recipe and print what it would write; load nothing.")
    p.add_argument("--schema", action="store_true", help="Print every recipe key with its type and help, then exit.")
    p.add_argument("--out", help="Output root (default: the recipe's out, else a folder named after the recipe).")
    p.add_argument("--overwrite", action="store_true", help="Replace existing outputs of every step (only outputs hf-llmc wrote).")
    p.add_argument("--trust-remote-code", action="store_true", help="Run custom modelling code shipped with the checkpoints, for every pair (a recipe cannot switch it on).")
    p.add_argument("--allow-pickle", action="store_true", help="Allow pickled .bin/.pt weights (torch.load(weights_only=True)), for every pair (a recipe cannot switch it on).")

    p = _command(sub, "scan", "scan", "Barriers of every layer, cumulative groups or moving windows; resumable, with a report.")
    add_pair_args(p)
    add_data_args(p)
    add_fields(p, ScanConfig, group="scan")
    add_fields(p, SequentialConfig, group="sequential estimation (stop each point once its error bar allows)")
    add_run_dir_args(p, "hf-llmc-scan", "results.jsonl, scan.json, summary.json, report.md/html, PNGs")
    p.add_argument("--parallel", choices=["none", "data", "points"], default="none", help="Under torchrun / accelerate launch: 'data' splits the token blocks across processes, 'points' splits the scan points (each process writes results.rank{r}.jsonl; process 0 merges).")

    p = _command(sub, "search", "search", "Search per-group α for two evaluation sets: Pareto front, paired intervals, the picked merge with its card.")
    add_pair_args(p)
    add_data_args(p)  # exactly two named sets
    add_fields(p, SearchConfig, group="search")
    add_run_dir_args(p, "hf-llmc-search", "search.jsonl, search.json, report.html, front.png, alpha_heatmap.png, merged/")
    p.add_argument("--no-merge", action="store_true", help="Do not write the picked merge (merged/).")

    p = _command(sub, "report", "report", "Re-render summary.json, report.md/html and the figures of a scan or robustness folder.")
    p.add_argument("out", metavar="OUT", help="Folder written by `hf-llmc scan` or `hf-llmc robustness`.")

    p = _command(sub, "distance", "distance", "Per-group weight distance, relative distance and cosine similarity (no data needed).")
    add_pair_args(p, only=("revision_a", "revision_b", "trust_remote_code", "allow_pickle"))
    p.add_argument("--granularity", choices=["block", "sublayer", "module"], default="block", help="Groups: block, sublayer or module.")
    p.add_argument("--layers", help="Layer spec instead of --granularity, e.g. attn.0-3,mlp.7.")
    p.add_argument("--json-out", help="Write the rows as JSON to this file.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --json-out file.")

    p = _command(sub, "robustness", "robustness", "Loss along random directions of the same norm as B − A, per group (paper, Section 5).")
    add_pair_args(p)
    add_data_args(p)
    add_fields(p, RobustnessConfig, group="robustness")
    add_run_dir_args(p, "hf-llmc-robustness", "results.jsonl, scan.json, summary.json, report, robustness.png")

    p = _command(sub, "sweep-report", "sweep_report", "Step × layer heatmap of scans at several revision pairs (e.g. a recipe sweeping Pythia steps).")
    p.add_argument("scans", nargs="+", metavar="DIR", help="Scan folders, or folders holding them (e.g. a recipe's output root).")
    p.add_argument("--base", choices=["a", "b"], default="a", help="Which scanned base to show.")
    p.add_argument("--out", help="Where sweep.json and sweep_heatmap.png go (default: the first DIR).")
    return parser
