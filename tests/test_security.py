"""Security defaults: no file name from a checkpoint or recipe leads outside its folder, pickles
are refused unless opted in (and then tensors only), and tokens never reach output or errors.

The CLI side of these guards (remote code, pickles without opt-in, an escaping shard, a token in
an argument) runs in subprocesses in test_bad_inputs.py; here the same guards are hit through the
Python API and ``cli.main`` in process, including the variants that suite leaves out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_llmc import CheckpointError, lazy_pair, save_merged
from hf_llmc.cli import main
from hf_llmc.cli.recipes import parse_recipe
from hf_llmc.config.errors import OutputExistsError, RecipeError
from hf_llmc.config.files import TMP_MARK
from hf_llmc.config.security import UnsafePathError, known_tokens, redact, safe_join
from hf_llmc.model.checkpoint import open_source

TOKEN = "tok-7e1f0c2a9b8d4e3f"  # not shaped like hf_..., so only the known-token guard can hide it


@pytest.fixture(scope="module")
def models(save_tiny_model, tiny_model, tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("security")
    out = {"a": save_tiny_model("gpt2", root / "a", seed=0), "b": save_tiny_model("gpt2", root / "b", seed=1),
           "sharded": root / "sharded"}
    tiny_model("gpt2", seed=0).save_pretrained(out["sharded"], max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(out["sharded"])
    return out


def listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# -- file names from checkpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil.safetensors", "ABSOLUTE", "sub/../../evil.safetensors", "..\\evil.safetensors"])
def test_index_naming_a_shard_outside_the_folder_is_refused(models, tmp_path, name):
    folder = tmp_path / "model"
    shutil.copytree(models["sharded"], folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "evil.safetensors"
    shutil.move(folder / victim, outside)  # the file exists: only the guard stops the read
    target = str(outside) if name == "ABSOLUTE" else name
    index["weight_map"] = {k: (target if v == victim else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lies outside the model folder; refusing to read it"):
        open_source(folder)
    # the merge writer reads through the same checkpoints: refused before anything is written
    with pytest.raises(CheckpointError, match="outside the model folder"):
        save_merged(lazy_pair(folder, models["b"]), "attn.0=0.5", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and listing(tmp_path) == {"model", "evil.safetensors", *(
        f"model/{n}" for n in listing(folder))}


def test_index_with_a_malformed_weight_map_is_a_checkpoint_error(models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(models["sharded"], folder)
    for weight_map in (["model-00001-of-00002.safetensors"], {"x": 3}, None):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match="unreadable index"):
            open_source(folder)


def test_tensor_names_never_become_file_names(models, tmp_path):
    """Tensor names are data in the safetensors header; a hostile one creates no file anywhere."""
    hostile = ["../../escaped.weight", "/tmp/hf_llmc_absolute.weight", "..", "a/../../b"]
    pair_dirs = {}
    for which in ("a", "b"):
        folder = tmp_path / "models" / which
        shutil.copytree(models[which], folder)
        state = load_file(folder / "model.safetensors")
        state.update({name: torch.full((3,), float(i)) for i, name in enumerate(hostile)})
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        pair_dirs[which] = folder
    work = tmp_path / "work"
    work.mkdir()
    before = listing(tmp_path)
    result = save_merged(lazy_pair(pair_dirs["a"], pair_dirs["b"]), "attn.0=0.5", work / "merged", max_shard_size="60KB")
    created = listing(tmp_path) - before
    assert created == {"work/merged", "work/merged/.hf-llmc", *(f"work/merged/{f}" for f in result.files)}
    assert all("/" not in f and ".." not in f for f in result.files)
    assert not Path("/tmp/hf_llmc_absolute.weight").exists()
    index = json.loads((work / "merged" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(hostile) <= set(index)  # stored as tensors (copied from A), as any other key
    merged = {}
    for shard in set(index.values()):
        merged.update(load_file(work / "merged" / shard))
    assert torch.equal(merged["../../escaped.weight"], torch.zeros(3))


@pytest.mark.parametrize("name", ["", "/abs", "../x", "a/../../x", "C:\\x", "..", "a\\..\\..\\x", "a\x00b"])
def test_safe_join_refuses(name):
    with pytest.raises(UnsafePathError):
        safe_join("/some/root", name)


@pytest.mark.parametrize("name", ["model.safetensors", "sub/model-1.safetensors", "a..b", ".hidden", "p/s"])
def test_safe_join_accepts(name):
    assert safe_join("/some/root", name) == Path("/some/root") / name


@pytest.mark.parametrize("step", [
    {"merge": {"layers": "attn.0", "out": "../outside"}},
    {"merge": {"layers": "attn.0", "out": "/tmp/anywhere"}},
    {"merge": {"layers": "attn.0", "out": "{pair}/../../x"}},
    {"merge": {"auto": True, "scan_dir": "../scan"}},
    {"push": {"folder": "/etc", "push_to_hub": "me/x"}},
])
def test_recipe_outputs_stay_inside_the_output_root(step):
    payload = {"pairs": [{"a": {"model": "org/a"}, "b": {"model": "org/b"}}], "data": {"data": "eval.txt"},
               "steps": [step]}
    with pytest.raises(RecipeError, match="must stay inside the output folder"):
        parse_recipe(payload, "r.yaml")
    kind = next(iter(step))
    ok = {k: ("{pair}/inside" if k in ("out", "scan_dir", "folder") else v) for k, v in step[kind].items()}
    parse_recipe({**payload, "steps": [{kind: ok}]}, "r.yaml")


# -- pickles -------------------------------------------------------------------------------------------
class _Exploit:
    """Unpickling this with full rights runs code (it writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",))


def test_pickle_is_refused_without_opt_in_and_runs_no_code_with_it(models, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(models["b"] / "config.json", folder / "config.json")
    marker = tmp_path / "PWNED"
    state = load_file(models["b"] / "model.safetensors")
    torch.save({**state, "exploit": _Exploit(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        open_source(folder)
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\) \(it refers to (builtins\.)?exec\)"):
        open_source(folder, allow_pickle=True)
    assert not marker.exists()
    # the same file with tensors only loads (opt-in), tensor for tensor
    torch.save(state, folder / "pytorch_model.bin")
    ckpt = open_source(folder, allow_pickle=True)
    assert ckpt.pickled and all(torch.equal(ckpt.get(k), v) for k, v in state.items())


# -- tokens ---------------------------------------------------------------------------------------------
def test_redact_known_and_token_shaped(monkeypatch, tmp_path):
    from huggingface_hub import constants

    stored = "stored-token-0c9d8e7f6a5b"
    (tmp_path / "token").write_text(stored)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert stored in known_tokens()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert TOKEN in known_tokens()
    text = f"url https://x/?t={TOKEN} and hf_abcdefgh12345678 and extra-secret-99 and hf_short"
    # only the actual token values: text merely shaped like a token (a model name) stays
    assert redact(text, extra=["extra-secret-99"]) == "url https://x/?t=*** and hf_abcdefgh12345678 and *** and hf_short"
    assert redact("model: hf_tinyllama7b") == "model: hf_tinyllama7b"
    monkeypatch.setenv("HF_TOKEN", "ab")  # too short to be a token: redaction never blanks common text
    assert redact("a b ab") == "a b ab"


def test_cli_errors_never_show_the_token(models, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    missing = tmp_path / f"model-{TOKEN}"
    assert main(["distance", str(missing), str(models["b"])]) == 1
    err = capsys.readouterr().err
    assert "no such model folder" in err and TOKEN not in err and "***" in err
    # --debug shows the traceback, redacted as well
    assert main(["--debug", "distance", str(missing), str(models["b"])]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointError" in err and TOKEN not in err
    # argparse errors (exit 2) are one line ending in a hint, redacted, with no usage dump
    with pytest.raises(SystemExit) as info:
        main(["barrier", str(models["a"]), str(models["b"]), "--data", "x.txt", "--method", TOKEN])
    err = capsys.readouterr().err
    assert info.value.code == 2 and TOKEN not in err
    assert err.splitlines() == ["hf-llmc barrier: error: argument --method: invalid choice: '***' (choose from 'lerp', 'slerp') "
                                "(see `hf-llmc barrier --help`)"]


# -- recipes: real paths with real names, no code switched on from a file ---------------------------------
def _recipe(tmp_path: Path, body: dict) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


RECIPE_PAIR = [{"a": {"model": "org/a"}, "b": {"model": "org/b"}}]


@pytest.mark.parametrize("payload, field", [
    ({"pairs": [{**RECIPE_PAIR[0], "name": "/abs/victim"}], "steps": [{"merge": {"layers": "attn.0", "out": "{pair}"}}]},
     "pairs[0].name"),
    ({"pairs": [{**RECIPE_PAIR[0], "name": ".."}], "steps": [{"merge": {"layers": "attn.0"}}]}, "pairs[0].name"),
    ({"pairs": RECIPE_PAIR, "steps": [{"merge": {"layers": "attn.0", "name": "a/../../b", "out": "{step}"}}]},
     "steps[0].merge.name"),
    ({"pairs": RECIPE_PAIR, "load": {"offload_folder": "/var/tmp/offload"}, "steps": [{"merge": {"layers": "attn.0"}}]},
     "load.offload_folder"),
    ({"pairs": RECIPE_PAIR, "steps": [{"merge": {"layers": "attn.0", "out": "~/x"}}]}, "steps[0].merge.out"),
])
def test_recipe_names_and_paths_are_checked_when_parsed(payload, field):
    with pytest.raises(RecipeError, match=re.escape(f"r.yaml.{field}: ")):
        parse_recipe(payload, "r.yaml")


def test_recipe_outputs_are_resolved_with_real_names_and_links(tmp_path, monkeypatch):
    from hf_llmc.cli.recipes import check_outputs, load_recipe

    (tmp_path / "outside").mkdir()
    tmp_path = tmp_path / "work"  # the working folder
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    # the recipe's own out: relative, below the working folder, also through links
    (tmp_path / "link-out").symlink_to(tmp_path.parent / "outside")
    for out, message in (("../x", "leads outside the working folder"), ("/tmp/x", "leads outside the working folder"),
                         ("link-out/x", "through a symbolic link")):
        recipe = load_recipe(_recipe(tmp_path, {"out": out, "pairs": RECIPE_PAIR, "steps": [{"merge": {"layers": "attn.0"}}]}))
        with pytest.raises(RecipeError, match=f"recipe.yaml.out: .*{message}"):
            check_outputs(recipe)
    # a pair folder that is a link out of the output root
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "p").symlink_to(tmp_path / "link-out")
    recipe = load_recipe(_recipe(tmp_path, {"out": "runs", "pairs": [{**RECIPE_PAIR[0], "name": "p"}],
                                            "data": {"data": "e.txt"},
                                            "steps": [{"scan": {}}, {"merge": {"auto": True, "scan_dir": "{pair}/scan"}}]}))
    with pytest.raises(RecipeError, match=r"steps\[0\]\.scan\.out: .*through a symbolic link"):
        check_outputs(recipe)
    # --out on the command line is the root; inside it every step gets its own folder
    planned = check_outputs(recipe, tmp_path / "elsewhere")
    assert [p.output for p in planned] == [tmp_path / "elsewhere" / "p" / "scan", tmp_path / "elsewhere" / "p" / "merge"]
    assert planned[1].scan_dir == tmp_path / "elsewhere" / "p" / "scan"
    nested = load_recipe(_recipe(tmp_path, {"pairs": RECIPE_PAIR, "data": {"data": "e.txt"},
                                            "steps": [{"scan": {"out": "x"}}, {"merge": {"layers": "attn.0", "out": "x/m"}}]}))
    with pytest.raises(RecipeError, match=r"steps\[1\]\.merge\.out: writes to x/m, which overlaps the output of"):
        check_outputs(nested, tmp_path / "r2")
    with pytest.raises(OutputExistsError, match="is the current folder"):
        check_outputs(nested, ".")


def test_recipe_cannot_switch_on_code_and_check_lists_what_it_needs(tmp_path, monkeypatch, capsys, models):
    from hf_llmc.cli.recipes import load_recipe, run_recipe

    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["a"], tmp_path / "remote")
    config = json.loads((tmp_path / "remote" / "config.json").read_text())
    (tmp_path / "remote" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}}))
    body = {"pairs": [{"a": {"model": "remote"}, "b": {"model": str(models["b"])}}], "load": {"trust_remote_code": True},
            "steps": [{"merge": {"layers": "attn.0"}}]}
    path = _recipe(tmp_path, body)
    assert main(["run", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "needs --trust-remote-code (declared by recipe.yaml.load.trust_remote_code" in out
    assert "may need --trust-remote-code: model A of pair-1 (remote) ships custom code" in out
    assert main(["run", str(path)]) == 2
    assert "load.trust_remote_code: a recipe cannot switch this on" in capsys.readouterr().err
    assert not (tmp_path / "recipe").exists()
    # the command line's flags apply to every pair (and are the only way to switch them on)
    seen = {}

    def fake_lazy_pair(a, b, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    import hf_llmc.model.pair as pair_module

    monkeypatch.setattr(pair_module, "lazy_pair", fake_lazy_pair)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(path), trust_remote_code=True, echo=lambda *_: None)
    assert seen["trust_remote_code"] is True and seen["allow_pickle"] is False
    del body["load"]
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(_recipe(tmp_path, body)), allow_pickle=True, echo=lambda *_: None)
    assert seen["trust_remote_code"] is False and seen["allow_pickle"] is True


# -- the output-folder policy ------------------------------------------------------------------------------
def test_output_policy_in_process(models, tmp_path, monkeypatch):
    from hf_llmc.engine import io

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    sources = [("model A", models["a"])]
    assert io.check_output_dir("~/merged") == home / "merged"  # ~ is expanded
    for out, message in ((models["a"], "is model A's folder"), (models["a"] / "x", "lies inside model A's folder"),
                         (models["a"].parent, "contains model A's folder"), (tmp_path, "is the current folder"),
                         (home, "is your home folder"), ("/", "is the root folder"), (tmp_path.parent, "contains (model A.s|the current)")):
        with pytest.raises(OutputExistsError, match=message):
            io.check_output_dir(out, True, sources=sources)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OutputExistsError, match="inside the Hugging Face Hub cache"):
        io.check_output_dir(tmp_path / "hub" / "models--x" / "m")
    # a folder hf-llmc did not write is never replaced; one it wrote is
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(OutputExistsError, match="was not written by hf-llmc"):
        io.check_output_dir("mine", True)
    io.write_marker(tmp_path / "mine", "merge")
    assert io.check_output_dir("mine", True) == tmp_path / "mine"
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(OutputExistsError, match="is a symbolic link"):
        io.check_output_dir("link", True)
    # free disk space: the estimated size + 10 %
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 0, 1050))
    io.check_output_dir("new", size=950)
    with pytest.raises(OutputExistsError, match=r"needs about 1\.1 KB of free disk space .*only 1\.1 KB is free|needs about"):
        io.check_output_dir("new", size=1000)


def test_atomic_outputs_leave_nothing_behind_and_are_fsynced(models, tmp_path, monkeypatch):
    from hf_llmc.config import files
    from hf_llmc.engine import io

    # an error inside the block: no temporary folder, no parent folder made for it
    with pytest.raises(RuntimeError):
        with io.atomic_output_dir(tmp_path / "new" / "deep" / "out") as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    # a failing rename of a JSON file: no temporary file
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        files.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # every file and folder of a merge is fsynced before the rename
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    result = save_merged(lazy_pair(models["a"], models["b"]), "attn.0=0.5", tmp_path / "merged", max_shard_size="60KB")
    names = {Path(p).name for p in synced}
    assert set(result.files) | {".hf-llmc"} <= names
    assert any(TMP_MARK in Path(p).name for p in synced)  # the folder, before its rename
    assert str(tmp_path) in synced  # the parent, after it
    assert json.loads((tmp_path / "merged" / ".hf-llmc").read_text())["written_by"] == "hf-llmc"


def test_stale_temporary_siblings_of_ended_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from hf_llmc.config.files import clean_stale, temp_name

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale_dir = tmp_path / f".merged{TMP_MARK}{pid}.1-abcd1234"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x")
    stale_file = tmp_path / f".scan.json{TMP_MARK}{pid}-abcd1234"  # an older name form
    stale_file.write_text("{")
    reused = tmp_path / f".other{TMP_MARK}{os.getppid()}.0-abcd1234"  # a running pid, but another start time
    reused.mkdir()
    mine = tmp_path / temp_name("mine")
    mine.mkdir()
    running = tmp_path / f".x{TMP_MARK}{os.getppid()}-abcd1234"  # a running process, no start time recorded
    running.mkdir()
    (tmp_path / "results").mkdir()
    removed = clean_stale(tmp_path)
    assert set(removed) == {stale_dir, stale_file, reused}
    assert mine.is_dir() and running.is_dir() and (tmp_path / "results").is_dir()


# -- checkpoints and configs -----------------------------------------------------------------------------
def test_b_config_is_checked_field_by_field(models, tmp_path):
    from hf_llmc import PairError

    b = tmp_path / "b"
    shutil.copytree(models["b"], b)
    config = json.loads((b / "config.json").read_text())
    for change, error, message in (({"n_layer": -1}, CheckpointError, "model B's config.json: n_layer is -1"),
                                   ({"n_head": 2.5}, CheckpointError, "n_head is 2.5, not a non-negative integer"),
                                   ({"n_head": True}, CheckpointError, "n_head is True"),
                                   ({"n_head": 8}, PairError, "config mismatch in the attention heads: A has n_head 4, B has n_head 8"),
                                   ({"vocab_size": 301}, PairError, "in the vocabulary: A has vocab_size 300")):
        (b / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(error, match=re.escape(message)):
            lazy_pair(models["a"], b)
    (b / "config.json").write_text(json.dumps(config))
    lazy_pair(models["a"], b)


def test_pickle_refusals_do_not_depend_on_torch_wording(tmp_path, monkeypatch):
    import pickle

    from hf_llmc.model.checkpoint import lazy

    state = {"w": torch.zeros(2)}
    payloads = {"zip": lambda f: torch.save({**state, "x": _System()}, f),
                "legacy": lambda f: torch.save({**state, "x": _System()}, f, _use_new_zipfile_serialization=False),
                "plain-pickle": lambda f: f.write_bytes(pickle.dumps({**state, "x": _System()}))}
    for name, write in payloads.items():
        file = tmp_path / f"{name}.bin"
        write(file)
        with pytest.raises(CheckpointError) as info:
            lazy._load_pickle(file)
        message = str(info.value)
        assert message.startswith(f"{file.name}: refused by torch.load(weights_only=True) ("), message
        assert "truncated" not in message and "\n" not in message
    # whatever torch says, a weights-only refusal is reported as one
    for text, detail in (("The weights_only unpickler met GLOBAL evil.payload, which is new wording", "it refers to evil.payload"),
                         ("Weights only load failed: Unsupported operand 149", "it holds more than plain tensors")):
        monkeypatch.setattr(lazy.torch, "load", lambda *a, text=text, **k: (_ for _ in ()).throw(pickle.UnpicklingError(text)))
        with pytest.raises(CheckpointError, match=re.escape(f"refused by torch.load(weights_only=True) ({detail})")):
            lazy._load_pickle(tmp_path / "zip.bin")


class _System:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


# -- secrets: only the real token is removed, wherever it appears -----------------------------------------
def test_token_shaped_names_survive_and_the_real_token_never_appears(models, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    real = "hf_" + "RealSecretValue" * 2
    stored = "hf_" + "StoredLoginToken" * 2
    (tmp_path / "token").write_text(stored)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setenv("HF_TOKEN", real)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["a"], tmp_path / "hf_tinyllama7b")
    shutil.copytree(models["b"], tmp_path / f"b-{real}")
    assert main(["merge", "hf_tinyllama7b", f"b-{real}", "--layers", "attn.0", "--out", "merged",
                 "--hub-id-a", "TinyLlama/TinyLlama-1.1B"]) == 0
    card, config = (tmp_path / "merged" / "README.md").read_text(), (tmp_path / "merged" / "hf_llmc_config.yaml").read_text()
    assert "model: hf_tinyllama7b" in config and "hf-llmc merge hf_tinyllama7b b-***" in card
    assert "- TinyLlama/TinyLlama-1.1B" in card and "`hf_tinyllama7b`, is a local folder" in card
    for path in (tmp_path / "merged").rglob("*"):
        data = path.read_bytes()
        assert real.encode() not in data and stored.encode() not in data, path
    assert real not in capsys.readouterr().out


def test_reads_check_that_every_byte_arrived(models, tmp_path):
    """A file shortened after its header was validated: every read path reports it in one line."""
    from hf_llmc.model.checkpoint.safetensors import SafetensorsFile

    path = tmp_path / "model.safetensors"
    shutil.copy(models["a"] / "model.safetensors", path)
    st = SafetensorsFile(path)
    name = max(st.keys(), key=lambda k: st.location(k)[1])  # the tensor stored last
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 4)
    for read in (lambda: st.get(name), lambda: list(st.iter_chunks(name, 1 << 20)),
                 lambda: st.read_into(name, torch.empty(st.shape(name), dtype=st.dtype(name)))):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: tensor '{re.escape(name)}': short read \(\d+ of \d+ bytes\)"):
            read()
