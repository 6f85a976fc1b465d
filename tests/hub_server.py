"""A loopback Hugging Face Hub endpoint for offline tests.

It implements the few HTTP routes that `huggingface_hub` 2.x and `transformers` use to push a folder and
to load it back, storing repositories under a temporary folder:

    POST /api/repos/create                           create_repo (409 when it exists)
    POST /api/validate-yaml                          model-card metadata check (parses the YAML)
    POST /api/{type}s/{repo}/preupload/{rev}         upload modes: always "regular" (inline base64 in the commit)
    POST /api/{type}s/{repo}/commit/{rev}            NDJSON commit: header, file, deletedFile, deletedFolder
    GET  /api/{type}s/{repo}[/revision/{rev}]        repo info (sha, siblings)
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]     file listing (snapshot_download)
    POST /api/{type}s/{repo}/paths-info/{rev}        info on given paths
    HEAD/GET /{repo}/resolve/{rev}/{file}            file metadata (X-Repo-Commit, ETag) and bytes
    (datasets and spaces are prefixed `/datasets/`, `/spaces/` in the resolve route, as on the Hub)

Errors carry the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound) so the client
raises the same exception types as against the real Hub. Writes require an `Authorization: Bearer` header.

Use it as a context manager; it also shuts itself down after `lifetime_s` so a failed test never leaves a
thread serving forever:

    with HubServer() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_dummy"}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = ("model", "dataset", "space")


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which the Hub uses as the ETag of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Repo:
    """One repository: content-addressed blobs plus one tree (path -> oid) per commit; `main` is the head."""

    def __init__(self, root: Path, repo_type: str, repo_id: str, private: bool) -> None:
        self.root, self.repo_type, self.repo_id, self.private = root, repo_type, repo_id, private
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.commits: dict[str, dict[str, str]] = {}
        self.order: list[str] = []
        self.commit({}, "initial commit")

    @property
    def head(self) -> str:
        return self.order[-1]

    def commit(self, tree: dict[str, str], message: str) -> str:
        payload = json.dumps(
            {
                "parent": self.order[-1] if self.order else None,
                "tree": tree,
                "msg": message,
                "n": len(self.order),
                "t": time.time(),
            },
            sort_keys=True,
        )
        oid = hashlib.sha1(payload.encode()).hexdigest()
        self.commits[oid] = dict(tree)
        self.order.append(oid)
        return oid

    def store(self, content: bytes) -> str:
        oid = git_blob_oid(content)
        path = self.root / "blobs" / oid
        if not path.exists():
            path.write_bytes(content)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def resolve(self, revision: str) -> str | None:
        """Commit id of a revision: `main` (the head) or a full commit id."""
        revision = unquote(revision)
        if revision == "main":
            return self.head
        return revision if revision in self.commits else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply sets Content-Length
    server: _Server

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr access log
        self.server.requests.append(f"{self.command} {self.path}")

    def _reply(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        if (self.headers.get("Authorization") or "").startswith("Bearer "):
            return True
        self._error(401, None, "Invalid credentials in Authorization header")
        return False

    def _repo(self, repo_type: str, repo_id: str) -> _Repo | None:
        repo = self.server.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_type} {repo_id}")
        return repo

    # ------------------------------------------------------------------ routes
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self._route("POST")

    def do_GET(self) -> None:  # noqa: N802
        self._route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        body = self._body() if method == "POST" else b""
        try:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body or b"{}"))
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body or b"{}"))
            match = re.fullmatch(r"/api/(model|dataset|space)s/([^/]+/[^/]+)(/.*)?", path)
            if match:
                return self._api(method, match.group(1), unquote(match.group(2)), match.group(3) or "", body, query)
            match = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if match and method in ("GET", "HEAD"):
                repo_type = {"datasets": "dataset", "spaces": "space"}.get(match.group(1) or "", "model")
                return self._resolve(repo_type, unquote(match.group(2)), match.group(3), unquote(match.group(4)))
            self._error(404, None, f"The loopback hub does not implement {method} {path}")
        except Exception as error:  # a bug in the test server must show up as a clear HTTP error, not a hang
            self._error(500, None, f"loopback hub error: {type(error).__name__}: {error}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        if not self._authorized():
            return
        name, organization = payload.get("name"), payload.get("organization") or "user"
        repo_type = payload.get("type") or "model"
        repo_id = f"{organization}/{name}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.server.url}/{prefix}{repo_id}"
        with self.server.lock:
            if (repo_type, repo_id) in self.server.repos:
                return self._json(409, {"error": "You already created this repo", "url": url})
            root = self.server.root / repo_type / repo_id
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.server.repos[(repo_type, repo_id)] = _Repo(root, repo_type, repo_id, private)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        # The client sends the whole README.md; the Hub checks its front matter (between the first two `---`).
        content = payload.get("content", "")
        match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", content, flags=re.DOTALL)
        if match is None:
            return self._json(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            return self._json(400, {"errors": [{"message": str(error)}], "warnings": []})
        if not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []})
        if not isinstance(metadata.get("tags", []), list):
            return self._json(400, {"errors": [{"message": '"tags" must be a list'}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _api(self, method: str, repo_type: str, repo_id: str, rest: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return
        parts = rest.strip("/").split("/", 1) if rest.strip("/") else []
        action = parts[0] if parts else ""
        revision = parts[1].split("/", 1)[0] if len(parts) > 1 else "main"
        if action in ("preupload", "commit") and method == "POST":
            if not self._authorized():
                return
            return self._preupload(repo, json.loads(body)) if action == "preupload" else self._commit(repo, body)
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        tree = repo.commits[commit]
        if method == "GET" and action in ("", "revision"):
            return self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": repo.private,
                    "disabled": False,
                    "gated": False,
                    "lastModified": "2024-01-01T00:00:00.000Z",
                    "tags": [],
                    "siblings": [{"rfilename": p} for p in sorted(tree)],
                },
            )
        if method == "GET" and action == "tree":
            sub = unquote(parts[1].split("/", 1)[1]) if "/" in parts[1] else ""
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(200, self._listing(repo, tree, sub, recursive))
        if method == "POST" and action == "paths-info":
            wanted = _form_or_json_paths(body, self.headers.get("Content-Type", ""))
            return self._json(200, [e for e in self._listing(repo, tree, "", True) if e["path"] in wanted])
        self._error(404, None, f"The loopback hub does not implement {method} /api/{repo_type}s/{repo_id}{rest}")

    def _listing(self, repo: _Repo, tree: dict[str, str], sub: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        files, folders = [], set()
        for path, oid in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            if recursive:
                pieces = rest.split("/")[:-1]
                folders.update(prefix + "/".join(pieces[: i + 1]) for i in range(len(pieces)))
            size = (repo.root / "blobs" / oid).stat().st_size
            files.append({"type": "file", "path": path, "size": size, "oid": oid})
        dirs = [{"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()} for p in sorted(folders)]
        return dirs + files

    def _preupload(self, repo: _Repo, payload: dict[str, Any]) -> None:
        tree = repo.commits[repo.head]
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": repo.head})

    def _commit(self, repo: _Repo, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        message = "commit"
        with self.server.lock:
            tree = dict(repo.commits[repo.head])
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary") or message
                elif key == "file":
                    content = (
                        base64.b64decode(value["content"])
                        if value.get("encoding") == "base64"
                        else value["content"].encode()
                    )
                    tree[value["path"]] = repo.store(content)
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    tree = {p: o for p, o in tree.items() if not p.startswith(folder)}
                else:  # lfsFile etc.: preupload never asks for LFS, so a client sending it is a client bug
                    return self._error(400, None, f"The loopback hub only takes inline files, got {key!r}")
            oid = repo.commit(tree, message)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self._json(
            200,
            {
                "commitUrl": f"{self.server.url}/{prefix}{repo.repo_id}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
                "success": True,
            },
        )

    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        oid = repo.commits[commit].get(filename)
        headers = {"X-Repo-Commit": commit}
        if oid is None:
            self._reply(
                404,
                b'{"error": "Entry not found"}',
                {**headers, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"},
            )
            return
        content = repo.blob(oid)
        self._reply(200, content, {**headers, "ETag": f'"{oid}"'}, content_type="application/octet-stream")


def _form_or_json_paths(body: bytes, content_type: str) -> set[str]:
    if "json" in content_type:
        return set(json.loads(body or b"{}").get("paths", []))
    return {unquote(v) for v in parse_qs(body.decode()).get("paths", [])}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """Loopback Hub on 127.0.0.1:<free port>, repositories under a temporary folder.

    Args:
        root: where repositories are stored (default: a fresh temporary folder, removed on stop).
        lifetime_s: the server stops by itself after this many seconds, whatever the test does.
    """

    def __init__(self, root: str | Path | None = None, lifetime_s: float = 300.0) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="loopback-hub-"))
        self.lifetime_s = lifetime_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        return self._server.url

    @property
    def requests(self) -> list[str]:
        """`METHOD path` of every request served, for tests that check what the client called."""
        return list(self._server.requests) if self._server else []

    def env(self, token: str = "hf_loopback_dummy_token") -> dict[str, str]:
        """Environment for a client process: this endpoint, no Xet, a dummy token."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": token,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
        }

    def start(self) -> HubServer:
        self._server = _Server(self.root)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self._shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python tests/hub_server.py  (serves for 10 minutes)
    with HubServer(lifetime_s=600) as hub:
        print(f"export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_dummy", flush=True)
        hub._thread.join()
