"""Bad inputs to the real CLI: every case fails cleanly, changes nothing and leaks nothing.

Each case runs ``python -m hf_llmc ...`` in a subprocess, in its own work folder, with
``HF_TOKEN`` set to a sentinel, and checks:

* a non-zero exit status (2 for usage errors, 1 for models or files that cannot be used),
* exactly one non-empty line on stderr, ``hf-llmc CMD: error: ...`` naming the problem (no
  library's warning or log line before or after it), no traceback, nothing on stdout (no ``nan`` printed as a result),
* no file created, removed or changed in the work folder (listing + sha256 before and after) nor
  in the shared input models, and no temporary sibling (``*.hf-llmc-tmp-*``) left anywhere in it,
* the token appears nowhere: not in stdout, stderr, nor any file under the work folder, the
  Hugging Face home or the token cache.

Subprocesses pay the torch import (~4 s of CPU each), so one session fixture starts all cases,
at most ``PARALLEL`` at a time, and the parametrized tests assert on their case's result. The
Hub cases (push without a token, unreachable endpoint, token never shown) are in test_hub.py;
SIGKILLed scans and merges are in test_scan.py and test_merge.py; further guards (NaN in merges
and distances, absolute shard paths, malicious pickles, recipe paths) are tested in process in
test_security.py and test_numerics.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # one fixture starts ~40 CLI processes
from safetensors.torch import load_file, save_file

from hf_llmc.config.files import TMP_MARK

SENTINEL = "hf_SENTINELsentinel123456"
PARALLEL = 4
TIMEOUT = 240
SEQ = ["--seq-len", "32", "--max-tokens", "1024"]


# -- the cases ------------------------------------------------------------------------------------
@dataclass
class Case:
    """One bad input: argv after ``hf_llmc`` ({A}, {B}, ... name shared inputs), the expected exit
    status, a regex the error line must match, and an optional setup of the work folder."""

    id: str
    argv: list[str]
    code: int
    message: str
    setup: Callable[[Path, dict], None] | None = None
    unwritable: bool = False  # run without the right to write into read-only folders (also as root)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _poke(folder: Path, name: str, value: float) -> None:
    """Set element [0, 0] of tensor ``name`` of ``folder/model.safetensors`` to ``value``."""
    path = folder / "model.safetensors"
    state = load_file(path)
    state[name][0, 0] = value
    save_file(state, path, metadata={"format": "pt"})


def setup_nan(w: Path, inp: dict) -> None:
    _poke(_copy_model(inp["B"], w / "b_nan"), "transformer.h.1.mlp.c_fc.weight", float("nan"))


def setup_vocab(w: Path, inp: dict) -> None:
    other = _copy_model(inp["B"], w / "b_vocab")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["renamed_token"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tok))


def setup_truncated(w: Path, inp: dict) -> None:
    path = _copy_model(inp["B"], w / "b_cut") / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def setup_missing_shard(w: Path, inp: dict) -> None:
    folder = _copy_model(inp["SHARDED"], w / "b_sharded")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()


def setup_escape(w: Path, inp: dict) -> None:
    """A sharded copy of A whose index names a shard outside its folder (which does exist)."""
    folder = _copy_model(inp["SHARDED"], w / "a_escape")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    outside = w / "evil.safetensors"
    shutil.move(folder / victim, outside)
    index["weight_map"] = {k: ("../evil.safetensors" if v == victim else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


def setup_pickle(w: Path, inp: dict) -> None:
    folder = w / "b_pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(inp["B"] / name, folder / name)
    torch.save(load_file(inp["B"] / "model.safetensors"), folder / "pytorch_model.bin")


def setup_remote(w: Path, inp: dict) -> None:
    remote = _copy_model(inp["A"], w / "a_remote")
    cfg = json.loads((remote / "config.json").read_text())
    cfg["model_type"] = "evil_arch"
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    code = "open('PWNED', 'w').write('remote code ran')\n"
    (remote / "configuration_evil.py").write_text(code)
    (remote / "modeling_evil.py").write_text(code)


def setup_data(name: str, content: bytes) -> Callable[[Path, dict], None]:
    def setup(w: Path, inp: dict) -> None:
        (w / name).write_bytes(content)

    return setup


def setup_existing(name: str) -> Callable[[Path, dict], None]:
    def setup(w: Path, inp: dict) -> None:
        (w / name).mkdir()
        (w / name / "notes.txt").write_text("my earlier results\n")

    return setup


def setup_locked(w: Path, inp: dict) -> None:
    (w / "locked").mkdir()
    (w / "locked" / "keep.txt").write_text("read-only folder\n")
    os.chmod(w / "locked", 0o555)


def setup_prior_scan(w: Path, inp: dict) -> None:
    shutil.copytree(inp["SCAN"], w / "prior")


def setup_recipe(body: str) -> Callable[[Path, dict], None]:
    def setup(w: Path, inp: dict) -> None:
        (w / "recipe.yaml").write_text(body.format(**{k: str(v) for k, v in inp.items()}))

    return setup


# -- output folders, recipes and checkpoints that must not be trusted ----------------------------------
def setup_victim(w: Path, inp: dict) -> None:
    """Folders the user cares about: ``victim`` (notes) and ``thesis`` (a thesis and its data)."""
    (w / "victim").mkdir()
    (w / "victim" / "notes.txt").write_text("do not delete\n")
    (w / "thesis" / "sub").mkdir(parents=True)
    (w / "thesis" / "thesis.tex").write_text("\\documentclass{article}\n")
    (w / "thesis" / "sub" / "data.csv").write_text("x,y\n1,2\n")


def setup_model_copy(w: Path, inp: dict) -> None:
    _copy_model(inp["A"], w / "a_copy")
    (w / "models").mkdir()
    _copy_model(inp["A"], w / "models" / "a")


def setup_work_recipe(body: str, extra: Callable[[Path, dict], None] | None = None) -> Callable[[Path, dict], None]:
    """A recipe that may name the work folder ({WORK}) and the shared inputs ({A}, {B}, {DATA} ...)."""
    def setup(w: Path, inp: dict) -> None:
        setup_victim(w, inp)
        if extra is not None:
            extra(w, inp)
        values = {k: str(v) for k, v in inp.items()}
        (w / "recipe.yaml").write_text(body.format(WORK=str(w), **values))

    return setup


def setup_symlinked_pair(w: Path, inp: dict) -> None:
    (w / "runs").mkdir()
    (w / "runs" / "p").symlink_to(w / "victim", target_is_directory=True)


def setup_foreign_step_output(w: Path, inp: dict) -> None:
    folder = w / "runs" / "pair-1" / "merge"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("not hf-llmc's\n")


def _rewrite_header(folder: Path, change: Callable[[dict], object]) -> None:
    """Replace the safetensors header of ``folder/model.safetensors`` by ``change(header)`` (data kept)."""
    path = folder / "model.safetensors"
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    new = change(header)
    raw = new if isinstance(new, bytes) else json.dumps(header if new is None else new).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n:])


def setup_header(name: str, change: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    def setup(w: Path, inp: dict) -> None:
        _rewrite_header(_copy_model(inp["B"], w / name), change)

    return setup


def _alias_last_onto_first(header: dict) -> None:
    """A later tensor takes the offsets of an earlier tensor of the same size (they overlap)."""
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    size = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in tensors}
    later = next(k for i, k in enumerate(tensors) if size[k] and size[k] in [size[t] for t in tensors[:i]])
    earlier = next(k for k in tensors if size[k] == size[later])
    header[later]["data_offsets"] = list(header[earlier]["data_offsets"])


def _negative_shape(header: dict) -> None:
    entry = header["transformer.h.0.attn.c_attn.weight"]
    entry["shape"] = [-entry["shape"][0], -entry["shape"][1]]


def _first_entry(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def setup_huge_header_length(w: Path, inp: dict) -> None:
    path = _copy_model(inp["B"], w / "b_huge") / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + blob[8:])


def setup_config_b(w: Path, inp: dict) -> None:
    folder = _copy_model(inp["B"], w / "b_config")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_layer"] = -1
    (folder / "config.json").write_text(json.dumps(cfg))


class _System:
    """Unpickling this with full rights would run a shell command (it is never unpickled so)."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def setup_evil_pickle(w: Path, inp: dict) -> None:
    folder = w / "b_evil"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(inp["B"] / name, folder / name)
    torch.save({**load_file(inp["B"] / "model.safetensors"), "x": _System()}, folder / "pytorch_model.bin")


def setup_old_json(w: Path, inp: dict) -> None:
    (w / "old.json").write_text('{"mine": true}\n')


PAIR_YAML = "pairs:\n  - a: {{model: {A}}}\n    b: {{model: {B}}}\n"
DATA_YAML = "data: {{data: {DATA}, seq_len: 32}}\n"
BARRIER = ["barrier", "{A}", "{B}", "--data", "{DATA}", *SEQ]

CASES = [
    # models
    Case("model-path-missing", ["merge", "./no-such-model", "{B}", "--layers", "attn.0", "--out", "merged"], 1, r"no-such-model: no such model folder"),
    Case("hub-id-offline", ["merge", "someone/model-not-in-the-cache", "{B}", "--layers", "attn.0", "--out", "merged"], 1, r"the Hub cannot be reached \(offline"),
    Case("architecture-mismatch", ["barrier", "{A}", "{LLAMA}", "--data", "{DATA}"], 1, r"architecture mismatch: A is gpt2 .* B is llama"),
    Case("different-sizes", ["barrier", "{A}", "{WIDE}", "--data", "{DATA}"], 1,
         r"config mismatch in the hidden size: A has n_embd 32, B has n_embd 64"),
    Case("different-vocabularies", ["merge", "{A}", "b_vocab", "--layers", "attn.0", "--out", "merged"], 1,
         r"different tokenizer vocabularies", setup_vocab),
    # bitsandbytes logs a warning at import on some CPUs: it must not reach the terminal
    Case("quantized-spec-index-out-of-range", [*BARRIER, "--load-in-4bit", "--layers", "attn.7"], 2,
         r"attn\.7: block 7 is out of range"),
    Case("quantized-seq-len-above-positions", ["barrier", "{A}", "{B}", "--data", "{DATA}", "--load-in-4bit", "--seq-len", "4096"], 2,
         r"--seq-len 4096: above the model's maximum positions \(128\)"),
    Case("adapters-on-different-bases", ["merge", "{LORA_A}", "{LORA_B}", "--layers", "attn.0", "--out", "merged"], 1,
         r"adapters are on different base models"),
    Case("truncated-safetensors", ["merge", "{A}", "b_cut", "--layers", "attn.0", "--out", "merged"], 1, r"truncated", setup_truncated),
    Case("shard-missing", ["merge", "{A}", "b_sharded", "--layers", "attn.0", "--out", "merged"], 1,
         r"shard model-00002-of-\d+\.safetensors is listed in model\.safetensors\.index\.json but missing", setup_missing_shard),
    Case("pickle-without-opt-in", ["merge", "{A}", "b_pickled", "--layers", "attn.0", "--out", "merged"], 1, r"only pickled weights .*--allow-pickle", setup_pickle),
    Case("remote-code-without-flag", ["barrier", "a_remote", "{B}", "--data", "{DATA}"], 1, r"needs custom code; pass --trust-remote-code", setup_remote),
    Case("nan-in-b-barrier", ["barrier", "{A}", "b_nan", "--data", "{DATA}", *SEQ, "--json-out", "barrier.json"], 1,
         r"model B: non-finite loss \(nan\)", setup_nan),
    Case("barrier-json-out-exists", [*BARRIER, "--json-out", "old.json"], 2,
         r"--json-out old\.json: exists; pass --overwrite to replace it", setup_old_json),
    Case("distance-json-out-exists", ["distance", "{A}", "{B}", "--json-out", "old.json"], 2,
         r"--json-out old\.json: exists; pass --overwrite to replace it", setup_old_json),
    Case("index-shard-escapes-folder", ["merge", "a_escape", "{B}", "--layers", "attn.0", "--out", "merged"], 1,
         r"\.\./evil\.safetensors.* outside the model folder", setup_escape),
    Case("token-in-model-path", ["merge", f"./{SENTINEL}", "{B}", "--layers", "attn.0", "--out", "merged"], 1, r"\./\*\*\*: no such model folder"),
    Case("token-in-bad-option", [*BARRIER, "--base", SENTINEL], 2, r"argument --base: invalid choice: '\*\*\*'"),
    # layer specs and alphas
    Case("spec-unknown-kind", ["merge", "{A}", "{B}", "--layers", "ffn.1", "--out", "merged"], 2, r"ffn\.1: unknown kind 'ffn'"),
    Case("spec-index-out-of-range", [*BARRIER, "--layers", "attn.7"], 2, r"attn\.7: block 7 is out of range; the model has 3 blocks"),
    Case("spec-reversed-range", ["merge", "{A}", "{B}", "--layers", "attn.2-0", "--out", "merged"], 2, r"reversed range"),
    Case("spec-selects-nothing", ["layers", "{A}", "--select", "re:^no_such_parameter$"], 2, r"matches no parameter name"),
    Case("spec-bad-regex", ["merge", "{A}", "{B}", "--layers", "re:(attn", "--out", "merged"], 2, r"bad regular expression"),
    Case("alpha-outside-unit-interval", [*BARRIER, "--alphas", "0,0.5,1.5"], 2, r"alpha 1\.5 is outside \[0, 1\]; pass --allow-extrapolation"),
    Case("alphas-empty", [*BARRIER, "--alphas", ""], 2, r"--alphas: empty list"),
    Case("alphas-unparsable", [*BARRIER, "--alphas", "0,half,1"], 2, r"not a comma-separated list of numbers"),
    # evaluation data
    # B of another architecture: the missing file must be reported before any model is opened
    Case("data-missing", ["barrier", "{A}", "{LLAMA}", "--data", "no-such.txt"], 2, r"no-such\.txt: no such file"),
    Case("data-empty", ["barrier", "{A}", "{B}", "--data", "empty.txt"], 2, r"no tokens", setup_data("empty.txt", b"")),
    Case("data-binary", ["barrier", "{A}", "{B}", "--data", "blob.txt"], 2, r"looks binary",
         setup_data("blob.txt", bytes(range(256)) * 8)),
    Case("data-shorter-than-a-block", ["barrier", "{A}", "{B}", "--data", "short.txt", "--seq-len", "64"], 2,
         r"fewer than one block", setup_data("short.txt", b"a few words")),
    Case("data-no-text-column", ["barrier", "{A}", "{B}", "--data", "rows.jsonl"], 2, r"no column 'text' \(columns: content\)",
         setup_data("rows.jsonl", b'{"content": "one document"}\n{"content": "another"}\n')),
    Case("seq-len-zero", ["barrier", "{A}", "{B}", "--data", "{DATA}", "--seq-len", "0"], 2, r"--seq-len 0: must be at least 2"),
    Case("seq-len-negative", ["barrier", "{A}", "{B}", "--data", "{DATA}", "--seq-len", "-8"], 2, r"--seq-len -8: must be at least 2"),
    Case("seq-len-above-positions", ["barrier", "{A}", "{B}", "--data", "{DATA}", "--seq-len", "4096"], 2,
         r"--seq-len 4096: above the model's maximum positions \(128\)"),
    Case("max-tokens-zero", ["barrier", "{A}", "{B}", "--data", "{DATA}", "--max-tokens", "0"], 2, r"--max-tokens 0: must be at least 2"),
    # outputs
    Case("merge-out-not-empty", ["merge", "{A}", "{B}", "--layers", "attn.0", "--out", "merged"], 2,
         r"not empty; pass --overwrite", setup_existing("merged")),
    Case("merge-out-unwritable", ["merge", "{A}", "{B}", "--layers", "attn.0", "--out", "locked/merged"], 2,
         r"locked.*not writable", setup_locked, unwritable=True),
    Case("resume-other-settings", ["scan", "{A}", "{B}", "--data", "{DATA}", *SEQ, "--alphas", "0.25,0.5", "--out", "prior", "--resume"], 2,
         r"holds a run with different .*alphas", setup_prior_scan),
    # recipes from elsewhere: every path stays inside the output folder, no code runs without a flag
    Case("recipe-pair-name-escapes", ["run", "recipe.yaml"], 2,
         r"recipe\.yaml\.pairs\[0\]\.name: '/.*/victim' must be a plain folder name",
         setup_work_recipe("pairs:\n  - name: {WORK}/victim\n    a: {{model: {A}}}\n    b: {{model: {B}}}\n"
                           "steps:\n  - merge: {{layers: attn.0, out: '{{pair}}', overwrite: true}}\n")),
    Case("recipe-pair-name-escapes-check", ["run", "recipe.yaml", "--check"], 2, r"pairs\[0\]\.name: .* must be a plain folder name",
         setup_work_recipe("pairs:\n  - name: ../victim\n    a: {{model: {A}}}\n    b: {{model: {B}}}\n"
                           "steps:\n  - merge: {{layers: attn.0, out: '{{pair}}', overwrite: true}}\n")),
    Case("recipe-top-out-escapes", ["run", "recipe.yaml", "--check"], 2,
         r"recipe\.yaml\.out: '\.\./outside' leads outside the working folder",
         setup_work_recipe("out: ../outside\n" + PAIR_YAML + "steps:\n  - merge: {{layers: attn.0}}\n")),
    Case("recipe-top-out-absolute", ["run", "recipe.yaml"], 2, r"recipe\.yaml\.out: '/.*/victim' leads outside the working folder",
         setup_work_recipe("out: {WORK}/victim\n" + PAIR_YAML + "steps:\n  - merge: {{layers: attn.0, overwrite: true}}\n")),
    Case("recipe-step-name-escapes", ["run", "recipe.yaml", "--check"], 2,
         r"steps\[0\]\.merge\.name: '\.\./\.\./victim' must be a plain folder name",
         setup_work_recipe(PAIR_YAML + "steps:\n  - merge: {{layers: attn.0, name: ../../victim, out: '{{step}}'}}\n")),
    Case("recipe-push-folder-escapes", ["run", "recipe.yaml", "--check"], 2,
         r"steps\[0\]\.push\.folder: .* must stay inside the output folder",
         setup_work_recipe(PAIR_YAML + "steps:\n  - push: {{folder: '{{pair}}/../../..', push_to_hub: me/x}}\n")),
    Case("recipe-scan-dir-escapes", ["run", "recipe.yaml", "--check"], 2, r"steps\[0\]\.merge\.scan_dir: .* must stay inside",
         setup_work_recipe(PAIR_YAML + DATA_YAML + "steps:\n  - merge: {{auto: true, scan_dir: {WORK}/victim}}\n")),
    Case("recipe-symlink-escapes", ["run", "recipe.yaml"], 2,
         r"steps\[0\]\.merge\.out: '\{pair\}/m' gives 'p/m', which leads outside the output folder runs through a symbolic link",
         setup_work_recipe("out: runs\npairs:\n  - name: p\n    a: {{model: {A}}}\n    b: {{model: {B}}}\n"
                           "steps:\n  - merge: {{layers: attn.0, out: '{{pair}}/m'}}\n", setup_symlinked_pair)),
    Case("recipe-overwrites-foreign-folder", ["run", "recipe.yaml"], 2,
         r"steps\[0\]\.merge\.out \(pair-1/merge\): was not written by hf-llmc",
         setup_work_recipe("out: runs\n" + PAIR_YAML + "steps:\n  - merge: {{layers: attn.0, overwrite: true}}\n",
                           setup_foreign_step_output)),
    Case("recipe-trust-remote-code", ["run", "recipe.yaml"], 2,
         r"recipe\.yaml\.load\.trust_remote_code: a recipe cannot switch this on .*pass --trust-remote-code",
         setup_work_recipe("pairs:\n  - a: {{model: a_remote}}\n    b: {{model: {B}}}\nload: {{trust_remote_code: true}}\n"
                           "steps:\n  - merge: {{layers: attn.0}}\n", setup_remote)),
    Case("recipe-allow-pickle", ["run", "recipe.yaml"], 2,
         r"recipe\.yaml\.load\.allow_pickle: a recipe cannot switch this on .*pass --allow-pickle",
         setup_work_recipe("pairs:\n  - a: {{model: {A}}}\n    b: {{model: b_evil}}\nload: {{allow_pickle: true}}\n"
                           "steps:\n  - merge: {{layers: attn.0}}\n", setup_evil_pickle)),
    # the output-folder policy: never a source, the Hub cache, the current or home folder; overwrite only hf-llmc's
    Case("merge-out-is-model-a", ["merge", "a_copy", "{B}", "--layers", "attn.0", "--out", "a_copy", "--overwrite"], 2,
         r"--out a_copy: is model A's folder", setup_model_copy),
    Case("merge-out-inside-model-a", ["merge", "a_copy", "{B}", "--layers", "attn.0", "--out", "a_copy/merged"], 2,
         r"--out a_copy/merged: lies inside model A's folder", setup_model_copy),
    Case("merge-out-contains-model-a", ["merge", "models/a", "{B}", "--layers", "attn.0", "--out", "models", "--overwrite"], 2,
         r"--out models: contains model A's folder", setup_model_copy),
    Case("merge-out-current-folder", ["merge", "{A}", "{B}", "--layers", "attn.0", "--out", ".", "--overwrite"], 2,
         r"--out \.: is the current folder", setup_victim),
    Case("merge-out-home", ["merge", "{A}", "{B}", "--layers", "attn.0", "--out", "~", "--overwrite"], 2, r"--out ~: is your home folder"),
    Case("merge-out-hub-cache", ["merge", "{A}", "{B}", "--layers", "attn.0", "--out", "{HUB}/merged"], 2,
         r"lies inside the Hugging Face Hub cache"),
    Case("merge-overwrite-foreign-folder", ["merge", "{A}", "{B}", "--layers", "attn.0", "--out", "thesis", "--overwrite"], 2,
         r"--out thesis: was not written by hf-llmc \(no \.hf-llmc marker file\)", setup_victim),
    Case("scan-overwrite-foreign-folder", ["scan", "{A}", "{B}", "--data", "{DATA}", *SEQ, "--out", "thesis", "--overwrite"], 2,
         r"--out thesis: was not written by hf-llmc", setup_victim),
    Case("scan-out-is-model-a", ["scan", "a_copy", "{B}", "--data", "{DATA}", *SEQ, "--out", "a_copy", "--resume"], 2,
         r"--out a_copy: is model A's folder", setup_model_copy),
    Case("robustness-out-current-folder", ["robustness", "{A}", "{B}", "--data", "{DATA}", *SEQ, "--out", ".", "--overwrite"], 2,
         r"--out \.: is the current folder", setup_victim),
    Case("demo-overwrite-foreign-folder", ["demo", "--out", "thesis", "--overwrite"], 2, r"--out thesis: was not written by hf-llmc",
         setup_victim),
    # checkpoints: headers validated like the safetensors library, configs field by field, pickles refused
    Case("safetensors-overlapping-tensors", ["merge", "{A}", "b_overlap", "--layers", "attn.0", "--out", "merged"], 1,
         r"b_overlap/model\.safetensors: tensor '[\w.]+': its bytes \[\d+, \d+\] overlap those of tensor '[\w.]+'",
         setup_header("b_overlap", _alias_last_onto_first)),
    Case("safetensors-negative-shape", ["merge", "{A}", "b_negative", "--layers", "attn.0", "--out", "merged"], 1,
         r"tensor 'transformer\.h\.0\.attn\.c_attn\.weight': shape \[-32, -96\] is not a list of non-negative integers",
         setup_header("b_negative", _negative_shape)),
    Case("safetensors-huge-header-length", ["merge", "{A}", "b_huge", "--layers", "attn.0", "--out", "merged"], 1,
         r"b_huge/model\.safetensors: header length 1099511627776 is above the safetensors limit", setup_huge_header_length),
    Case("safetensors-begin-after-end", ["merge", "{A}", "b_reversed", "--layers", "attn.0", "--out", "merged"], 1,
         r"tensor '[\w.]+': data_offsets \[\d+, \d+\] begin after they end",
         setup_header("b_reversed", lambda h: _first_entry(h).update(data_offsets=_first_entry(h)["data_offsets"][::-1] if _first_entry(h)["data_offsets"][1] else [1, 0]))),
    Case("safetensors-list-header", ["merge", "{A}", "b_list", "--layers", "attn.0", "--out", "merged"], 1,
         r"b_list/model\.safetensors: header is a JSON list, not an object of tensors", setup_header("b_list", lambda h: [])),
    Case("safetensors-missing-offsets", ["merge", "{A}", "b_nooffsets", "--layers", "attn.0", "--out", "merged"], 1,
         r"tensor '[\w.]+': missing data_offsets", setup_header("b_nooffsets", lambda h: _first_entry(h).pop("data_offsets") and None)),
    Case("safetensors-string-offsets", ["merge", "{A}", "b_strings", "--layers", "attn.0", "--out", "merged"], 1,
         r"tensor '[\w.]+': data_offsets \[\"\d+\", \"\d+\"\] is not two non-negative integers",
         setup_header("b_strings", lambda h: _first_entry(h).update(data_offsets=[str(o) for o in _first_entry(h)["data_offsets"]]))),
    Case("config-b-negative-layers", ["merge", "{A}", "b_config", "--layers", "attn.0", "--out", "merged"], 1,
         r"model B's config\.json: n_layer is -1, not a non-negative integer", setup_config_b),
    Case("pickle-that-runs-code", ["merge", "{A}", "b_evil", "--layers", "attn.0", "--out", "merged", "--allow-pickle"], 1,
         r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\) \(it refers to posix\.system\); only plain tensors",
         setup_evil_pickle),
    # recipes
    Case("recipe-unknown-key", ["run", "recipe.yaml"], 2, r"recipe\.yaml\.steps\[0\]\.merge\.alpah: unknown key; did you mean 'alpha'",
         setup_recipe(PAIR_YAML + "steps:\n  - merge: {{layers: attn.0, alpah: 0.5}}\n")),
    Case("recipe-wrong-type", ["run", "recipe.yaml"], 2, r"steps\[0\]\.scan\.window: expected an integer, got string 'two'",
         setup_recipe(PAIR_YAML + DATA_YAML + "steps:\n  - scan: {{mode: window, window: two}}\n")),
    Case("recipe-missing-field", ["run", "recipe.yaml"], 2, r"pairs\[0\]: missing required key 'b'",
         setup_recipe("pairs:\n  - a: {{model: {A}}}\nsteps:\n  - barrier: {{}}\n" + DATA_YAML)),
]


# -- running ------------------------------------------------------------------------------------------
@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    work: Path


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (files), "dir" or the link target, for everything under ``root``."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel + "/"] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def files_containing(root: Path, needle: str) -> list[str]:
    data = needle.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and data in p.read_bytes()]


def _drop_write_override() -> None:
    """In the child, before exec: as root, drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the
    bounding set so file permissions apply (folders with mode 555 are really read-only)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def build_inputs(root: Path, save_tiny_model, tiny_model, tiny_tokenizer) -> dict[str, Path]:
    """Shared, never-modified inputs: tiny saved models (random init), adapters, data, a scan."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_llmc import DataConfig, ModelPair, ScanConfig, run_scan
    from hf_llmc.testing import synthetic_text

    inp = {
        "A": save_tiny_model("gpt2", root / "model-a", seed=0),
        "B": save_tiny_model("gpt2", root / "model-b", seed=1),
        "LLAMA": save_tiny_model("llama", root / "llama"),
        "WIDE": save_tiny_model("gpt2", root / "wide", hidden_size=64),
        "DATA": root / "eval.txt",
        "SHARDED": root / "sharded",
    }
    inp["DATA"].write_text(synthetic_text("mixed", 30, 0))
    tiny_model("gpt2", seed=1).save_pretrained(inp["SHARDED"], max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(inp["SHARDED"])
    for key, base in (("LORA_A", inp["A"]), ("LORA_B", inp["B"])):
        torch.manual_seed(0)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                    LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False))
        inp[key] = root / key.lower()
        peft_model.save_pretrained(inp[key])
    # A finished scan (settings: block granularity, alpha 0.5), copied into the resume cases.
    saved = os.environ.get("HF_LLMC_CACHE")
    os.environ["HF_LLMC_CACHE"] = str(root.parent / "cache")
    try:
        pair = ModelPair.from_pretrained(inp["A"], inp["B"], device="cpu")
        blocks = pair.blocks(DataConfig(data=str(inp["DATA"]), seq_len=32, max_tokens=1024))
        inp["SCAN"] = root / "scan"
        run_scan(pair, blocks, ScanConfig(alphas="0.5"), inp["SCAN"], progress=False)
    finally:
        if saved is None:
            os.environ.pop("HF_LLMC_CACHE", None)
        else:
            os.environ["HF_LLMC_CACHE"] = saved
    return inp


@pytest.fixture(scope="session")
def bad_input_runs(request, tmp_path_factory, save_tiny_model, tiny_model, tiny_tokenizer):
    # only the cases this session runs (e.g. ``-k token``), all of them otherwise
    chosen = {item.callspec.params["case"].id for item in request.session.items
              if getattr(item, "callspec", None) is not None and isinstance(item.callspec.params.get("case"), Case)}
    cases = [c for c in CASES if c.id in chosen] or CASES
    root = tmp_path_factory.mktemp("bad_inputs")
    inputs_dir = root / "inputs"
    inp = build_inputs(inputs_dir, save_tiny_model, tiny_model, tiny_tokenizer)
    hf_home, cache = root / "hf_home", root / "cache"
    hf_home.mkdir()
    cache.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "HUGGINGFACE"))}
    env.update(HF_TOKEN=SENTINEL, HF_HOME=str(hf_home), HF_LLMC_CACHE=str(cache), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", COLUMNS="200")
    inp["HUB"] = hf_home / "hub"  # huggingface_hub.constants.HF_HUB_CACHE of the child processes
    shared_before = snapshot(inputs_dir)

    pending = []
    for case in cases:
        work = root / "cases" / case.id
        work.mkdir(parents=True)
        if case.setup is not None:
            case.setup(work, inp)
        argv = [a.format(**{k: str(v) for k, v in inp.items()}) if "{" in a else a for a in case.argv]
        pending.append((case, work, argv, snapshot(work)))

    results: dict[str, Result] = {}
    running: list[tuple] = []
    try:
        while pending or running:
            while pending and len(running) < PARALLEL:
                case, work, argv, before = pending.pop(0)
                proc = subprocess.Popen(
                    [sys.executable, "-m", "hf_llmc", *argv], cwd=work, env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, preexec_fn=_drop_write_override if case.unwritable else None,
                )
                running.append((case, work, before, proc, time.monotonic()))
            for item in list(running):
                case, work, before, proc, started = item
                if proc.poll() is None and time.monotonic() - started < TIMEOUT:
                    continue
                if proc.poll() is None:
                    proc.kill()
                out, err = proc.communicate()
                results[case.id] = Result(proc.returncode, out, err, before, snapshot(work), work)
                running.remove(item)
            time.sleep(0.05)
    finally:
        for _, _, _, proc, _ in running:
            proc.kill()
            proc.wait()
        for locked in root.glob("cases/*/locked"):
            os.chmod(locked, 0o755)
    return {"results": results, "shared_before": shared_before, "shared_after": snapshot(inputs_dir),
            "inputs": inputs_dir, "hf_home": hf_home, "cache": cache}


# -- assertions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(bad_input_runs, case):
    r = bad_input_runs["results"][case.id]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    command = case.argv[0]
    assert r.code == case.code, f"exit {r.code}, expected {case.code}\nstderr: {r.stderr[-3000:]}\nstdout: {r.stdout[-1000:]}"
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"hf-llmc {command}: error: "), r.stderr
    assert re.search(case.message, lines[0]), f"{case.message!r} not in {lines[0]!r}"
    assert r.stdout.strip() == "", r.stdout  # no table, and no nan printed as a result
    assert r.after == r.before, {k: (r.before.get(k), r.after.get(k)) for k in set(r.before) ^ set(r.after) | {
        k for k in r.before if r.after.get(k) != r.before[k]}}
    assert not [k for k in r.after if TMP_MARK in k], "a temporary sibling was left behind"
    assert SENTINEL not in r.stdout and SENTINEL not in r.stderr
    assert files_containing(r.work, SENTINEL) == []


def test_shared_inputs_untouched_and_token_in_no_file(bad_input_runs):
    assert bad_input_runs["shared_after"] == bad_input_runs["shared_before"]
    for key in ("inputs", "hf_home", "cache"):
        assert files_containing(bad_input_runs[key], SENTINEL) == [], key

