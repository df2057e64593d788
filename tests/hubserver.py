"""A small Hugging Face Hub look-alike on 127.0.0.1, for testing the real huggingface_hub client.

It serves what `hf_hub_download`, `HfApi.model_info`, `HfApi.create_repo` and
`HfApi.create_commit` ask of huggingface_hub 2.4.0 (read from its source):

- ``GET /api/models/{repo}[/revision/{rev}]``: model info, with ``sha`` (the resolved commit) and
  ``siblings`` (the file list);
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``ETag``, ``X-Repo-Commit`` and
  ``Content-Length`` headers, and ``Range`` requests (used to resume a dropped download). No Xet
  headers are sent, so the client downloads over plain HTTP;
- ``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}``
  (every file "regular", so its bytes travel inside the commit) and ``POST
  /api/models/{repo}/commit/{rev}`` (the NDJSON commit payload, recorded for the tests).

Errors carry the ``X-Error-Code`` header the client maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound). Private repositories need ``Authorization: Bearer <token>``; writes
need `FakeHub.write_token`. `FakeHub.interrupt` makes the next download of a file drop the connection
part-way and then fail the client's retry, like a network outage.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str


@dataclass
class Repo:
    private: bool = False
    token: str | None = None
    refs: dict[str, str] = field(default_factory=dict)  # branches and tags -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


class FakeHub:
    """An in-memory hub. ``url`` is its endpoint; ``requests`` and ``commits`` record traffic."""

    write_token = "hf_test_write_token"

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.commits: list[dict] = []  # {"repo", "revision", "header", "files": {path: bytes}}
        self.created: list[dict] = []
        self._interrupts: dict[tuple[str, str], int] = {}
        self._failing_resume: set[tuple[str, str]] = set()
        self._counter = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop answering: the port refuses connections and open keep-alive connections are cut."""
        self._server.shutdown()
        self._server.server_close()
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    # -- building repositories -----------------------------------------------------------------

    def _new_sha(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join([str(self._counter), *parts]).encode()).hexdigest()

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes | str | Path],
        *,
        branch: str = "main",
        message: str = "update",
        delete: tuple[str, ...] = (),
        private: bool = False,
        token: str | None = None,
    ) -> str:
        """Add a commit on ``branch`` (creating the repository) with ``files`` over the parent's; returns its sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private, token=token))
            parent = repo.commits[repo.refs[branch]].files if branch in repo.refs else {}
            content = dict(parent)
            for name in delete:
                content.pop(name, None)
            for name, value in files.items():
                content[name] = _as_bytes(value)
            sha = self._new_sha(repo_id, branch, message, *sorted(content))
            repo.commits[sha] = Commit(sha, content, message)
            repo.refs[branch] = sha
            return sha

    def tag(self, repo_id: str, tag: str, sha: str) -> None:
        self.repos[repo_id].refs[tag] = sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)].files

    def interrupt(self, repo_id: str, filename: str, after: int) -> None:
        """The next GET of ``filename`` sends ``after`` bytes then drops; the client's retry gets HTTP 503."""
        self._interrupts[(repo_id, filename)] = after

    def downloads(self, filename: str) -> int:
        """How many GETs (not HEADs) of a file name reached the server."""
        return sum(
            1 for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(filename)
        )


def _as_bytes(value: bytes | str | Path) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, Path):
        return value.read_bytes()
    return value.encode()


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def setup(self) -> None:
            super().setup()
            hub._connections.add(self.connection)

        def finish(self) -> None:
            hub._connections.discard(self.connection)
            with contextlib.suppress(OSError):
                super().finish()

        # -- plumbing ----------------------------------------------------------------------------

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
            extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
            self._json(status, {"error": message}, extra)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _record(self) -> None:
            hub.requests.append(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

        def _repo(self, repo_id: str) -> Repo | None:
            """The repository if it exists and the request may read it; otherwise answers 401/404."""
            repo = hub.repos.get(repo_id)
            if repo is not None and repo.private and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            return repo

        def _resolve(self, repo: Repo, revision: str) -> Commit | None:
            sha = repo.refs.get(revision, revision)
            commit = repo.commits.get(sha)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return commit

        def _writer(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {hub.write_token}":
                self._error(401, None, "Invalid credentials in Authorization header")
                return False
            return True

        # -- routes --------------------------------------------------------------------------------

        def do_HEAD(self) -> None:
            self._record()
            self._route()

        def do_GET(self) -> None:
            self._record()
            self._route()

        def do_POST(self) -> None:
            self._record()
            body = self._body()
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            if parts[:3] == ["api", "repos", "create"]:
                return self._create(json.loads(body))
            if parts[:2] == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body))
            if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
                repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                if not self._writer():
                    return None
                repo = self._repo(repo_id)
                if repo is None:
                    return None
                if action == "preupload":
                    return self._preupload(repo, revision, json.loads(body))
                return self._commit(repo_id, revision, body)
            return self._error(404, None, f"no route for POST {self.path}")

        def _route(self) -> None:
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            if len(parts) >= 4 and parts[:2] == ["api", "models"] and self.command == "GET":
                repo_id = f"{parts[2]}/{parts[3]}"
                if len(parts) == 4:
                    return self._model_info(repo_id, "main")
                if len(parts) >= 6 and parts[4] == "revision":
                    return self._model_info(repo_id, "/".join(parts[5:]))
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve_file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            return self._error(404, None, f"no route for {self.command} {self.path}")

        def _model_info(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id)
            commit = repo and self._resolve(repo, revision)
            if commit is None:
                return
            siblings = [{"rfilename": name} for name in sorted(commit.files)]
            self._json(200, {"id": repo_id, "sha": commit.sha, "private": repo.private, "siblings": siblings})

        def _resolve_file(self, repo_id: str, revision: str, filename: str) -> None:
            repo = self._repo(repo_id)
            commit = repo and self._resolve(repo, revision)
            if commit is None:
                return
            if filename not in commit.files:
                return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
            data = commit.files[filename]
            headers = {
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "X-Repo-Commit": commit.sha,
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            key = (repo_id, filename)
            range_header = self.headers.get("Range")
            if self.command == "GET" and key in hub._failing_resume:
                hub._failing_resume.discard(key)
                return self._error(503, None, "Service unavailable")
            if self.command == "GET" and not range_header and key in hub._interrupts:
                after = hub._interrupts.pop(key)
                hub._failing_resume.add(key)
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:after])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the peer sees the body end early
                self.close_connection = True
                return None
            if range_header and self.command == "GET":
                start_text, _, end_text = range_header.removeprefix("bytes=").partition("-")
                start = int(start_text)
                end = int(end_text) if end_text else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start : end + 1], headers)
            return self._send(200, data, headers)

        def _create(self, payload: dict) -> None:
            if not self._writer():
                return
            repo_id = f"{payload.get('organization')}/{payload['name']}"
            hub.created.append({"repo_id": repo_id, **payload})
            if repo_id in hub.repos:
                return self._error(409, None, "You already created this model repo")
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private", token=hub.write_token)
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self, payload: dict) -> None:
            text = payload["content"]
            try:
                meta = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else {}
            except yaml.YAMLError as exc:
                return self._json(400, {"errors": [{"message": str(exc)}]})
            if not isinstance(meta, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
            self._json(200, {"warnings": []})

        def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
            current = repo.commits[repo.refs[revision]].files if revision in repo.refs else {}
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": _git_blob_oid(current[f["path"]]) if f["path"] in current else None,
                }
                for f in payload["files"]
            ]
            self._json(200, {"files": files})

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files = {}
            for item in lines:
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self._error(400, None, f"this test hub does not handle {item['key']} operations")
            hub.commits.append({"repo": repo_id, "revision": revision, "header": header, "files": files})
            sha = hub.commit(repo_id, files, branch=revision, message=header["summary"])
            self._json(
                200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
            )

    return Handler


def serve(tmp_path: Path, monkeypatch):
    """Start a `FakeHub` and point huggingface_hub at it, with a cache, home and token of its own.

    huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is
    imported; this sets the module constants those variables become (and the variables themselves,
    for subprocesses, see `env`). Generator: use as ``yield from serve(tmp_path, monkeypatch)``.
    """
    from huggingface_hub import constants

    hub = FakeHub()
    home = tmp_path / "hf_home"
    cache = home / "hub"
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"), raising=False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    hub.cache = cache
    try:
        yield hub
    finally:
        hub.close()


def set_offline(monkeypatch, offline: bool = True) -> None:
    """What HF_HUB_OFFLINE=1 does to an already imported huggingface_hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
