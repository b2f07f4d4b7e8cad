"""Security defaults: no file name from a checkpoint or recipe leads outside its folder, pickles
are refused unless opted in (and then tensors only), and tokens never reach output or errors.

The CLI side of these guards (remote code, pickles without opt-in, an escaping shard, a token in
an argument) runs in subprocesses in test_bad_inputs.py; here the same guards are hit through the
Python API and ``cli.main`` in process, including the variants that suite leaves out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_llmc import CheckpointError, lazy_pair, save_merged
from hf_llmc.cli import main
from hf_llmc.cli.recipes import parse_recipe
from hf_llmc.config.errors import RecipeError
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
    assert created == {"work/merged", *(f"work/merged/{f}" for f in result.files)}
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
    assert redact(text, extra=["extra-secret-99"]) == "url https://x/?t=*** and *** and *** and hf_short"
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
