"""Hub publishing: ``hf-llmc push`` and ``hf_llmc.hub.push_folder`` against a local Hub server.

The server (tests/hub_server.py) is real HTTP on 127.0.0.1 and speaks the endpoints that
huggingface_hub calls; the CLI runs in subprocesses with ``HF_ENDPOINT`` and
``HF_HUB_DISABLE_XET=1`` set before huggingface_hub is imported. The subprocesses of one
module run concurrently (each pays the torch/transformers import) to keep the file fast.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from hub_server import HubServer

VALID = "hf_validtoken0123456789abcdef"
READ_ONLY = "hf_readonlytoken0123456789ab"
# not shaped like an hf_ token, so only the real guards (not the hf_ regex) can hide it
SENTINEL = "sentinel-7f3a9c2e1b5d4e6f"
PUSH_TIMEOUT = 120


# -- helpers ---------------------------------------------------------------------------------------
def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_contains(root: Path, needle: str) -> list[str]:
    data = needle.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


def build_model_folder(out: Path) -> Path:
    """A real tiny GPT-2 saved in 3 safetensors shards + index, a model card, a nested file."""
    from huggingface_hub import ModelCard, ModelCardData

    from hf_llmc.testing import init_model, tiny_config

    model = init_model(tiny_config("gpt2", num_layers=2, hidden_size=64, vocab_size=500), seed=3)
    model.save_pretrained(out, max_shard_size="250KB")
    data = ModelCardData(
        base_model=["org/model-a"],  # a Hub model (the test Hub holds it)
        base_model_relation="merge",
        library_name="transformers",
        tags=["merge", "hf-llmc", "layer-wise-lmc"],
    )
    ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n# Merged model\n\nattn.0-1 at 0.5\n").save(out / "README.md")
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("layer-wise merge\n")
    return out


def cli_env(tmp: Path, endpoint: str, token: str | None, *, stored_token: str | None = None) -> dict[str, str]:
    """Environment of one CLI run: its own HF_HOME (optionally with a stored login)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_HUB_", "HUGGINGFACE_"))}
    home = tmp / "hf_home"
    home.mkdir(parents=True, exist_ok=True)
    if stored_token is not None:
        (home / "token").write_text(stored_token)
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    env.pop("TRANSFORMERS_OFFLINE", None)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def with_local_base_models(model_dir: Path, out: Path) -> Path:
    """A copy of the model folder whose card names local folders (and a path) as base models, with
    hf-llmc's marker file, as an older hf-llmc wrote them."""
    import shutil

    from huggingface_hub import ModelCard

    shutil.copytree(model_dir, out)
    card = ModelCard.load(out / "README.md")
    card.data.base_model = ["org/model-a", "model-b", "../models/local-c"]
    card.save(out / "README.md")
    (out / ".hf-llmc").write_text('{"written_by": "hf-llmc", "kind": "merge"}\n')
    return out


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens=(VALID,), read_only_tokens=(READ_ONLY,)) as server:
        server.add_repo("org/model-a")
        yield server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("hub") / "merged-model")


@pytest.fixture(scope="module")
def runs(hub, model_dir, tmp_path_factory):
    """Run every CLI case at once; returns name -> (returncode, stdout, stderr, case folder)."""
    base = tmp_path_factory.mktemp("cli")
    dead = f"http://127.0.0.1:{closed_port()}"
    hub.add_repo("tester/branchy")  # exists: the branch push goes through create_repo's 409 (exist_ok) path
    local_bases = with_local_base_models(model_dir, base / "folders" / "local-bases")
    cases = {
        "local-bases": ([str(local_bases), "tester/local-bases"], hub.url, VALID, None),
        "push": ([str(model_dir), "tester/merged", "--private", "--commit-message", "first merge"], hub.url, VALID, None),
        "branch": ([str(model_dir), "tester/branchy", "--revision", "exp/v1"], hub.url, None, VALID),  # stored login
        "no-token": ([str(model_dir), "tester/none"], dead, None, None),
        "wrong-token": ([str(model_dir), "tester/wrong"], hub.url, SENTINEL, None),
        "unreachable": ([str(model_dir), "tester/dead"], dead, SENTINEL, None),
        "imports": ([str(model_dir), "tester/light"], hub.url, VALID, None),  # run with -X importtime
    }
    procs = {}
    for name, (argv, endpoint, token, stored) in cases.items():
        case_dir = base / name
        case_dir.mkdir()
        procs[name] = (
            subprocess.Popen(
                [sys.executable, *(["-X", "importtime"] if name == "imports" else []), "-m", "hf_llmc", "push", *argv],
                cwd=case_dir,
                env=cli_env(case_dir, endpoint, token, stored_token=stored),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            case_dir,
        )
    results = {}
    try:
        for name, (proc, case_dir) in procs.items():
            out, err = proc.communicate(timeout=PUSH_TIMEOUT)
            results[name] = (proc.returncode, out, err, case_dir)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture
def inprocess(monkeypatch, tmp_path):
    """huggingface_hub in this process as the CLI sees it: LFS uploads, online, no stored login."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)


# -- CLI end to end --------------------------------------------------------------------------------
def test_push_uploads_every_file_byte_for_byte(runs, hub, model_dir):
    rc, out, err, _ = runs["push"]
    assert rc == 0, err
    local = folder_files(model_dir)
    assert sum(name.endswith(".safetensors") for name in local) >= 2, "the model should be sharded"
    remote = hub.files("tester/merged")
    assert set(remote) == set(local) | {".gitattributes"}
    for name, data in local.items():
        assert remote[name] == data, name
    # weights went through LFS (batch + PUT + verify), the small text files inline
    assert hub.lfs_paths("tester/merged") == {n for n in local if n.endswith(".safetensors")}
    for name in hub.lfs_paths("tester/merged"):
        assert hub.lfs_objects[hashlib.sha256(local[name]).hexdigest()] == local[name]
    routes = hub.routes()
    for route in ("create", "validate-yaml", "preupload", "lfs-batch", "lfs-upload", "lfs-verify", "commit"):
        assert route in routes, route
    assert "unknown" not in routes and hub.errors == []
    # one commit with our message; the printed URL is that commit's
    head = hub.commits("tester/merged")[-1]
    assert head.summary == "first merge"
    assert out.strip().endswith(f"{hub.url}/tester/merged/commit/{head.oid}")
    assert str(model_dir.parent) not in out  # a local folder is shown by its name only


def test_push_private_flag_reaches_server(runs, hub):
    assert runs["push"][0] == 0
    assert hub.repos["tester/merged"].private is True
    assert runs["branch"][0] == 0, runs["branch"][2]
    assert hub.repos["tester/branchy"].private is False


def test_push_to_branch_with_stored_login(runs, hub, model_dir):
    rc, out, err, _ = runs["branch"]
    assert rc == 0, err
    assert "tester/branchy@exp/v1" in out
    assert hub.files("tester/branchy", "exp/v1") == {**folder_files(model_dir), ".gitattributes": hub.files("tester/branchy")[".gitattributes"]}
    assert set(hub.files("tester/branchy", "main")) == {".gitattributes"}  # main untouched
    assert hub.commits("tester/branchy", "exp/v1")[-1].summary == "Upload merged-model with hf-llmc"


def test_push_imports_neither_torch_nor_transformers(runs, hub):
    rc, out, err, _ = runs["imports"]
    assert rc == 0, err[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "huggingface_hub" in imported  # the import list was read
    assert not {m.split(".")[0] for m in imported} & {"torch", "transformers"}
    assert "tester/light" in hub.repos


def test_push_drops_base_models_that_are_not_on_the_hub(runs, hub):
    """A card naming local folders as base models: one warning line, and the uploaded card lists
    only the Hub model; every other file goes up byte for byte, the marker file not at all, and
    the local folder is not changed."""
    from huggingface_hub import ModelCard

    rc, out, err, case_dir = runs["local-bases"]
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hf-llmc push: warning: README.md names base_model 'model-b', "
                                                   "'../models/local-c', which are not Hub models; dropped"), err
    local = folder_files(case_dir.parent / "folders" / "local-bases")
    remote = hub.files("tester/local-bases")
    assert set(remote) == set(local) - {".hf-llmc"} | {".gitattributes"}
    assert all(remote[name] == data for name, data in local.items() if name not in (".hf-llmc", "README.md"))
    uploaded = ModelCard(remote["README.md"].decode())
    assert uploaded.data.base_model == ["org/model-a"] and uploaded.text == ModelCard(local["README.md"].decode()).text
    assert ModelCard(local["README.md"].decode()).data.base_model == ["org/model-a", "model-b", "../models/local-c"]


def test_token_anywhere_in_a_large_file_is_found(hub, model_dir, tmp_path, inprocess, monkeypatch):
    """The leak guard reads every byte of every file (streamed): a token at the end of an 11 MB file,
    and one split across two read chunks, are both found before anything is sent."""
    import shutil

    from hf_llmc import HubError, push_folder
    from hf_llmc.outputs import hub as hub_module

    leaky = tmp_path / "leaky-large"
    shutil.copytree(model_dir, leaky)
    with open(leaky / "extra" / "big.bin", "wb") as fh:
        fh.write(b"\0" * (11 * 1024 * 1024))
        fh.write(VALID.encode())
    before = len(hub.log)
    with pytest.raises(HubError, match="extra/big.bin contains an access token"):
        push_folder(leaky, "tester/api-large", token=VALID, endpoint=hub.url)
    assert len(hub.log) == before
    monkeypatch.setattr(hub_module, "_SCAN_CHUNK_BYTES", 1000)
    split = tmp_path / "split.bin"
    split.write_bytes(b"x" * 990 + VALID.encode() + b"y" * 2000)  # the token spans bytes 990-1019
    assert hub_module._file_contains(split, [VALID.encode()])
    assert not hub_module._file_contains(split, [READ_ONLY.encode()])


def _assert_one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-llmc push: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_push_without_token(runs, hub):
    rc, out, err, _ = runs["no-token"]
    assert rc == 1
    line = _assert_one_line_error(err)
    assert "not logged in: run `hf auth login` or set HF_TOKEN" in line
    assert "tester/none" not in hub.repos


@pytest.mark.parametrize("case", ["wrong-token", "unreachable"])
def test_push_failures_never_show_the_token(runs, hub, case):
    rc, out, err, case_dir = runs[case]
    assert rc == 1
    line = _assert_one_line_error(err)
    if case == "wrong-token":
        assert "authentication failed" in line and "401" in line
        assert "tester/wrong" not in hub.repos
    else:
        assert "cannot reach http://127.0.0.1:" in line
    assert SENTINEL not in out and SENTINEL not in err
    assert tree_contains(case_dir, SENTINEL) == []


def test_push_not_a_model_is_a_usage_error(hub, tmp_path, capsys, monkeypatch):
    """Exit 2 before any request (the CLI's main() in process: no environment needed)."""
    from hf_llmc.cli import main

    monkeypatch.setenv("HF_TOKEN", VALID)
    card_only = tmp_path / "card-only"
    card_only.mkdir()
    (card_only / "README.md").write_text("# just a card\n")
    before = len(hub.log)
    for folder, expected in ((card_only, "does not contain a model: expected config.json"), (tmp_path / "missing", "no such folder")):
        assert main(["push", str(folder), "tester/card-only"]) == 2
        line = _assert_one_line_error(capsys.readouterr().err)
        assert expected in line
    assert len(hub.log) == before and "tester/card-only" not in hub.repos


# -- Python API (in process) -----------------------------------------------------------------------
def test_exception_does_not_carry_the_token(hub, model_dir, inprocess):
    from hf_llmc import HubError, push_folder

    with pytest.raises(HubError) as info:
        push_folder(model_dir, "tester/api-wrong", token=SENTINEL, endpoint=hub.url)
    err = info.value
    assert "authentication failed" in str(err) and "\n" not in str(err)
    assert err.__cause__ is None and err.__context__ is None  # no request objects with headers
    assert SENTINEL not in "".join(traceback.format_exception(err)) and SENTINEL not in repr(err.args)


def test_read_only_token_gets_permission_message(hub, model_dir, inprocess):
    from hf_llmc import HubError, push_folder

    with pytest.raises(HubError, match=r"permission denied .*HTTP 403.*write access"):
        push_folder(model_dir, "tester/api-readonly", token=READ_ONLY, endpoint=hub.url)


def _push_with_fault(hub, model_dir, endpoint: str, fault: tuple[int, str], repo: str, token: str):
    """The HubError of a push while the server answers ``endpoint`` with ``fault`` (status, body)."""
    from hf_llmc import HubError, push_folder

    hub.faults[endpoint] = fault
    try:
        with pytest.raises(HubError) as info:
            push_folder(model_dir, repo, token=token, endpoint=hub.url)
    finally:
        hub.faults.clear()
    return info.value


def test_server_error_gives_status_and_reason(hub, model_dir, inprocess):
    message = str(_push_with_fault(hub, model_dir, "commit", (500, "storage backend down"), "tester/api-500", VALID))
    assert "HTTP 500" in message and "storage backend down" in message and "uploading the folder" in message
    assert "\n" not in message
    assert len(hub.commits("tester/api-500")) == 1  # only the repo's initial commit


def test_server_echoing_the_token_is_redacted(hub, model_dir, inprocess):
    error = _push_with_fault(hub, model_dir, "create", (502, "bad gateway for request with {authorization}"), "tester/api-echo", SENTINEL)
    message = str(error)
    assert "HTTP 502" in message and "bad gateway for request with Bearer ***" in message
    assert SENTINEL not in "".join(traceback.format_exception(error))


def test_unchanged_push_makes_no_commit_and_pr(hub, model_dir, inprocess):
    from hf_llmc import push_folder

    url = push_folder(model_dir, "tester/api-again", token=VALID, endpoint=hub.url)
    first = hub.commits("tester/api-again")[-1]
    assert url == f"{hub.url}/tester/api-again/commit/{first.oid}"
    again = push_folder(model_dir, "tester/api-again", token=VALID, endpoint=hub.url)
    assert again == url and hub.commits("tester/api-again")[-1] == first  # files unchanged: no commit
    # a changed card as a pull request: main keeps the old card
    changed = model_dir.parent / "changed-model"
    build_model_folder(changed)
    (changed / "README.md").write_text((changed / "README.md").read_text() + "\nrevised\n")
    pr_url = push_folder(changed, "tester/api-again", token=VALID, endpoint=hub.url, create_pr=True)
    assert pr_url == f"{hub.url}/tester/api-again/discussions/1"
    assert hub.files("tester/api-again", "refs/pr/1")["README.md"].endswith(b"revised\n")
    assert not hub.files("tester/api-again")["README.md"].endswith(b"revised\n")


def test_invalid_card_metadata_is_one_line(hub, model_dir, tmp_path, inprocess):
    import shutil

    from hf_llmc import HubError, push_folder

    bad = tmp_path / "bad-card"
    shutil.copytree(model_dir, bad)
    (bad / "README.md").write_text("---\ntags: [merge\n---\n# card\n")
    with pytest.raises(HubError, match=r"Invalid metadata in README.md.*invalid YAML") as info:
        push_folder(bad, "tester/api-yaml", token=VALID, endpoint=hub.url)
    assert "\n" not in str(info.value)
    assert "tester/api-yaml" not in hub.repos or set(hub.files("tester/api-yaml")) == {".gitattributes"}


def test_refuses_folder_that_contains_the_token(hub, model_dir, tmp_path, inprocess):
    import shutil

    from hf_llmc import HubError, push_folder

    leaky = tmp_path / "leaky"
    shutil.copytree(model_dir, leaky)
    (leaky / "hf_llmc_config.yaml").write_text(f"token: {VALID}\n")
    before = len(hub.log)
    with pytest.raises(HubError, match="hf_llmc_config.yaml contains an access token") as info:
        push_folder(leaky, "tester/api-leak", token=VALID, endpoint=hub.url)
    assert VALID not in str(info.value)
    assert len(hub.log) == before  # nothing was sent


def test_model_folder_checks(model_dir, tmp_path):
    import shutil

    from hf_llmc.config.errors import ModelFolderError
    from hf_llmc.outputs.hub import check_model_folder

    with pytest.raises(ModelFolderError, match="no such folder"):
        check_model_folder(tmp_path / "missing")
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    shard = sorted(partial.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelFolderError, match=f"lists {shard.name}, which is missing"):
        check_model_folder(partial)
    linked = tmp_path / "linked"
    shutil.copytree(model_dir, linked)
    secret = tmp_path / "token"
    secret.write_text(VALID)
    (linked / "token").symlink_to(secret)
    with pytest.raises(ModelFolderError, match="link to a file outside the folder"):
        check_model_folder(linked)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    assert check_model_folder(adapter) == adapter.resolve()
    assert check_model_folder(model_dir) == model_dir.resolve()


def test_timeouts_and_offline_map_to_cannot_reach():
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    from hf_llmc.outputs.hub import _describe

    kw = dict(endpoint="http://hub.example", repo_id="u/r", step="uploading the folder")
    timeout = _describe(httpx2.ReadTimeout("read timed out"), **kw)
    assert timeout.startswith("cannot reach http://hub.example: timed out while uploading the folder")
    wrapped = RuntimeError("Error while uploading 'model.safetensors' to the Hub.")
    wrapped.__cause__ = httpx2.ConnectError("[Errno 111] Connection refused")
    assert _describe(wrapped, **kw).startswith("cannot reach http://hub.example ([Errno 111] Connection refused)")
    assert "HF_HUB_OFFLINE" in _describe(OfflineModeIsEnabled("offline"), **kw)
