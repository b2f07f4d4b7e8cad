"""A small in-memory Hugging Face Hub for tests: the endpoints ``HfApi`` uses to publish a model.

:class:`HubServer` runs a ``ThreadingHTTPServer`` on 127.0.0.1 (free port) and speaks the
parts of the Hub API that ``create_repo``, ``create_branch``, ``upload_folder`` (legacy LFS
path, i.e. ``HF_HUB_DISABLE_XET=1``), ``repo_info`` and ``list_repo_refs`` call in
huggingface_hub 2.x:

* ``POST /api/repos/create`` — 409 when the repo exists (``exist_ok`` relies on it);
* ``GET  /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` — repo info (also for a
  canonical id without a namespace, such as ``gpt2``; 404 ``RepoNotFound`` for a missing repo);
* ``GET  /api/models/{repo}/refs`` — branches;
* ``POST /api/models/{repo}/branch/{branch}`` — 409 when it exists;
* ``POST /api/validate-yaml`` — parses the README front matter with PyYAML;
* ``POST /api/models/{repo}/preupload/{rev}`` — ``lfs`` for weight files and files of at
  least ``lfs_threshold`` bytes, ``regular`` otherwise; returns the stored oid so that
  unchanged files are skipped like on the Hub;
* ``POST /{repo}.git/info/lfs/objects/batch`` — ``basic`` transfer, an ``upload`` href
  (signed, no auth, like a pre-signed S3 URL) and a ``verify`` href (auth);
* ``PUT  /lfs/upload/{oid}?sig=...`` — checks the sha256 and the size;
* ``POST /lfs/verify`` — the object must be stored with that size;
* ``POST /api/models/{repo}/commit/{rev}`` — ndjson (``header``, ``file``, ``lfsFile``,
  ``deletedFile``, ``deletedFolder``); LFS objects must have been uploaded before;
  ``?create_pr=1`` opens ``refs/pr/N``.

Every request needs ``authorization: Bearer <token>`` with a token from ``tokens``
(401 with the Hub's ``X-Error-Message`` otherwise; tokens in ``read_only_tokens`` get 403
on writes). ``faults`` maps a route name to an error reply (status, message) to inject;
``{authorization}`` in the message is replaced by the request's header, like a proxy
that echoes requests. Committed files are kept per
repo and revision in :attr:`HubServer.repos` for tests to read back; every request is
logged in :attr:`HubServer.log` (method, route, path) without headers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".zip")
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"


def git_blob_oid(data: bytes) -> str:
    """Git's sha1 of a blob (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    parent: str | None


@dataclass
class Ref:
    """One branch (or pull-request ref): its files, the LFS ones, and its history."""

    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.commits[-1].oid

    def copy(self) -> "Ref":
        return Ref(dict(self.files), set(self.lfs), list(self.commits))


@dataclass
class Repo:
    repo_id: str
    private: bool
    repo_type: str
    refs: dict[str, Ref] = field(default_factory=dict)
    pull_requests: int = 0


class ErrorReply(Exception):
    """An error reply: status, message, optional ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class HubServer:
    """In-memory Hub on 127.0.0.1; use as a context manager or ``start()``/``stop()``."""

    def __init__(
        self,
        tokens: tuple[str, ...] = ("hf_testtoken_write_0123456789",),
        *,
        read_only_tokens: tuple[str, ...] = (),
        user: str = "tester",
        lfs_threshold: int = 10 * 1024 * 1024,
    ):
        self.tokens = set(tokens)
        self.read_only_tokens = set(read_only_tokens)
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str]] = []
        self.faults: dict[str, tuple[int, str]] = {}
        self.errors: list[str] = []
        self._signatures: dict[str, str] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- reading back ----------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Committed files of ``repo_id`` at ``revision`` (a copy)."""
        with self._lock:
            return dict(self.repos[repo_id].refs[revision].files)

    def lfs_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        with self._lock:
            return set(self.repos[repo_id].refs[revision].lfs)

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        with self._lock:
            return list(self.repos[repo_id].refs[revision].commits)

    def routes(self) -> list[str]:
        """Route names of the requests served so far, in order."""
        with self._lock:
            return [route for _, route, _ in self.log]

    def add_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> Repo:
        """Create a repo whose ``main`` holds one initial commit with ``.gitattributes`` (as the Hub does)."""
        with self._lock:
            repo = Repo(repo_id, private, repo_type)
            main = Ref()
            main.files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            self.new_commit(main, "initial commit")
            repo.refs["main"] = main
            self.repos[repo_id] = repo
            return repo

    # -- helpers used by the handler -------------------------------------------------------
    def check_auth(self, header: str | None, *, write: bool) -> None:
        token = header[7:].strip() if header and header.lower().startswith("bearer ") else None
        if token is None:
            raise ErrorReply(401, "Authorization header is required", None)
        if token in self.read_only_tokens:
            if write:
                raise ErrorReply(403, "You don't have the rights to write to this repository (read-only token)")
            return
        if token not in self.tokens:
            raise ErrorReply(401, INVALID_TOKEN_MESSAGE)

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise ErrorReply(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def ref(self, repo: Repo, revision: str) -> Ref:
        if revision not in repo.refs:
            raise ErrorReply(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.refs[revision]

    def new_commit(self, ref: Ref, summary: str, description: str = "") -> Commit:
        parent = ref.commits[-1].oid if ref.commits else None
        digest = hashlib.sha1(json.dumps([parent, summary, sorted((p, git_blob_oid(d)) for p, d in ref.files.items())]).encode())
        digest.update(secrets.token_bytes(8))
        commit = Commit(digest.hexdigest(), summary, description, parent)
        ref.commits.append(commit)
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    server_version = "TestHub/1.0"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    # -- plumbing --------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, payload: object, *, content_type: str = "application/json", headers: dict | None = None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        try:
            body = self._body()
            route, handler, groups = self._match(method, path)
            with self.hub._lock:
                self.hub.log.append((method, route, path))
                fault = self.hub.faults.get(route)
            if fault is not None:  # "{authorization}" in the message echoes the header (a leaky proxy)
                status, message = fault
                raise ErrorReply(status, message.replace("{authorization}", self.headers.get("authorization", "")))
            if handler is None:
                raise ErrorReply(404, f"no route for {method} {path}")
            status, payload = handler(self, body, query, **{k: unquote(v) for k, v in groups.items() if v is not None})
            self._reply(status, payload)
        except Exception as err:  # noqa: BLE001 - every failure becomes an error reply
            if not isinstance(err, ErrorReply):
                with self.hub._lock:
                    self.hub.errors.append(f"{method} {path}: {type(err).__name__}: {err}")
                err = ErrorReply(500, f"internal error: {type(err).__name__}")
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._reply(err.status, {"error": err.message, **getattr(err, "extra", {})}, headers=headers)

    def _match(self, method: str, path: str):
        for route, (m, pattern, handler) in ROUTES.items():
            if m == method and (found := pattern.fullmatch(path)):
                return route, handler, found.groupdict()
        return "unknown", None, {}

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _auth(self, *, write: bool) -> None:
        self.hub.check_auth(self.headers.get("authorization"), write=write)

    # -- endpoints -------------------------------------------------------------------------
    def create_repo(self, body, query):
        self._auth(write=True)
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization") or self.hub.user
        if not name or not re.fullmatch(r"[\w.-]+", name) or not re.fullmatch(r"[\w.-]+", org):
            raise ErrorReply(400, f"invalid repo name: {org}/{name}")
        repo_id = f"{org}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub._lock:
            if repo_id in self.hub.repos:
                # like the Hub: the 409 body carries the url (create_repo(exist_ok=True) reads it)
                raise ErrorReply(409, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
            self.hub.add_repo(repo_id, private=private, repo_type=payload.get("type") or "model")
        return 200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def repo_info(self, body, query, repo, rev="main"):
        self._auth(write=False)
        with self.hub._lock:
            r = self.hub.repo(repo)
            ref = self.hub.ref(r, rev)
            return 200, {
                "id": repo,
                "modelId": repo,
                "sha": ref.head,
                "private": r.private,
                "siblings": [{"rfilename": p} for p in sorted(ref.files)],
            }

    def list_refs(self, body, query, repo):
        self._auth(write=False)
        with self.hub._lock:
            r = self.hub.repo(repo)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": ref.head}
                for name, ref in r.refs.items()
                if not name.startswith("refs/")
            ]
            prs = [{"name": n, "ref": n, "targetCommit": ref.head} for n, ref in r.refs.items() if n.startswith("refs/pr/")]
            return 200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs}

    def create_branch(self, body, query, repo, branch):
        self._auth(write=True)
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        with self.hub._lock:
            r = self.hub.repo(repo)
            if branch in r.refs:
                raise ErrorReply(409, "Reference already exists")
            r.refs[branch] = self.hub.ref(r, start).copy()
        return 200, {}

    def validate_yaml(self, body, query):
        self._auth(write=False)
        content = json.loads(body or b"{}").get("content", "")
        match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", content, flags=re.S)
        if match is None:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            import yaml

            meta = yaml.safe_load(match.group(1))
        except Exception as err:  # noqa: BLE001 - any YAML error is a 400 with a message
            return 400, {"errors": [{"message": f"invalid YAML: {str(err).splitlines()[0]}"}], "warnings": []}
        if meta is not None and not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, body, query, repo, rev):
        self._auth(write=True)
        files = json.loads(body)["files"]
        with self.hub._lock:
            r = self.hub.repo(repo)
            ref = r.refs.get(rev) if "create_pr" not in query else r.refs.get("main")
            if ref is None and "create_pr" not in query:
                raise ErrorReply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            out = []
            for f in files:
                path, size = f["path"], int(f["size"])
                lfs = path.endswith(LFS_SUFFIXES) or size >= self.hub.lfs_threshold
                oid = None
                if ref is not None and path in ref.files:
                    data = ref.files[path]
                    oid = hashlib.sha256(data).hexdigest() if path in ref.lfs else git_blob_oid(data)
                out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": out, "commitOid": ref.head if ref is not None else None}

    def lfs_batch(self, body, query, repo):
        self._auth(write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise ErrorReply(422, "only basic uploads are supported")
        objects = []
        with self.hub._lock:
            self.hub.repo(repo)
            for obj in payload["objects"]:
                oid, size = obj["oid"], int(obj["size"])
                if not re.fullmatch(r"[0-9a-f]{64}", oid):
                    objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}})
                    continue
                if len(self.hub.lfs_objects.get(oid, b"")) == size and oid in self.hub.lfs_objects:
                    objects.append({"oid": oid, "size": size})  # already stored: no actions
                    continue
                sig = secrets.token_hex(16)
                self.hub._signatures[sig] = oid
                objects.append({
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.hub.url}/lfs/upload/{oid}?sig={sig}&size={size}"},
                        "verify": {"href": f"{self.hub.url}/lfs/verify"},
                    },
                })
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_upload(self, body, query, oid):
        sig = (query.get("sig") or [""])[0]
        with self.hub._lock:
            if self.hub._signatures.get(sig) != oid:
                raise ErrorReply(403, "invalid or expired upload signature")
        if hashlib.sha256(body).hexdigest() != oid or len(body) != int(query["size"][0]):
            raise ErrorReply(400, "uploaded content does not match the announced oid/size")
        with self.hub._lock:
            self.hub.lfs_objects[oid] = body
            self.hub._signatures.pop(sig, None)
        return 200, {}

    def lfs_verify(self, body, query):
        self._auth(write=True)
        payload = json.loads(body)
        with self.hub._lock:
            data = self.hub.lfs_objects.get(payload["oid"])
        if data is None or len(data) != int(payload["size"]):
            raise ErrorReply(404, "object not found or size mismatch")
        return 200, {}

    def commit(self, body, query, repo, rev):
        self._auth(write=True)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise ErrorReply(400, "the first ndjson line must be the header")
        header = lines[0]["value"]
        with self.hub._lock:
            r = self.hub.repo(repo)
            if "create_pr" in query:
                r.pull_requests += 1
                num = r.pull_requests
                target = f"refs/pr/{num}"
                ref = self.hub.ref(r, rev).copy()
            else:
                target, num = rev, None
                ref = self.hub.ref(r, rev).copy()
            if header.get("parentCommit") and header["parentCommit"] != ref.head:
                raise ErrorReply(412, "parent commit is not the head of the revision")
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if path.startswith("/") or ".." in path.split("/"):
                    raise ErrorReply(400, f"invalid path: {path}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise ErrorReply(400, "file content must be base64")
                    ref.files[path] = base64.b64decode(value["content"])
                    ref.lfs.discard(path)
                elif key == "lfsFile":
                    data = self.hub.lfs_objects.get(value["oid"])
                    if data is None or ("size" in value and len(data) != int(value["size"])):
                        raise ErrorReply(422, f"LFS object for {path} was not uploaded")
                    ref.files[path] = data
                    ref.lfs.add(path)
                elif key == "deletedFile":
                    if ref.files.pop(path, None) is None:
                        raise ErrorReply(404, "A file with this name doesn't exist", "EntryNotFound")
                    ref.lfs.discard(path)
                elif key == "deletedFolder":
                    for p in [p for p in ref.files if p.startswith(path.rstrip("/") + "/")]:
                        ref.files.pop(p)
                        ref.lfs.discard(p)
                else:
                    raise ErrorReply(400, f"unknown commit operation {key!r}")
            commit = self.hub.new_commit(ref, header.get("summary", ""), header.get("description", ""))
            r.refs[target] = ref
        payload = {"commitOid": commit.oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}"}
        if num is not None:
            payload["pullRequestUrl"] = f"{self.hub.url}/{repo}/discussions/{num}"
        return 200, payload


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = {
    "create": ("POST", re.compile(r"/api/repos/create"), _Handler.create_repo),
    "validate-yaml": ("POST", re.compile(r"/api/validate-yaml"), _Handler.validate_yaml),
    "refs": ("GET", re.compile(rf"/api/models/{_REPO}/refs"), _Handler.list_refs),
    "info": ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), _Handler.repo_info),
    "info-canonical": ("GET", re.compile(r"/api/models/(?P<repo>[\w.-]+)"), _Handler.repo_info),  # e.g. gpt2
    "branch": ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>.+)"), _Handler.create_branch),
    "preupload": ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), _Handler.preupload),
    "lfs-batch": ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), _Handler.lfs_batch),
    "lfs-upload": ("PUT", re.compile(r"/lfs/upload/(?P<oid>[0-9a-f]{64})"), _Handler.lfs_upload),
    "lfs-verify": ("POST", re.compile(r"/lfs/verify"), _Handler.lfs_verify),
    "commit": ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), _Handler.commit),
}
