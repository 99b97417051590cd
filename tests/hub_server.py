"""A small in-memory Hugging Face Hub for tests (standard library only).

Point the real clients at it with ``HF_ENDPOINT=HubServer().start()``. It implements the routes that
huggingface_hub, timm and transformers call (see /work/shared/HUB.md): repo creation, preupload and
ndjson commits (every file is "regular", so content arrives base64 in the commit: no LFS, no Xet),
resolve (HEAD/GET), model info, tree, refs and pull requests (discussions). Unknown routes answer a
JSON 404 and are logged to stderr.

Model: repos keyed by "org/name"; each has branches ("main", "refs/pr/N") pointing at commits; a
commit is an immutable {path: bytes} snapshot with a 40-hex sha and a parent. Like the real Hub, a
new repo starts with one commit holding ``.gitattributes``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
NOW = "2025-01-01T00:00:00.000Z"
USER = "tester"  # whoami's name, and the namespace of repos created without an organization


def blob_sha(data: bytes) -> str:
    """Git blob id, as the Hub reports for regular files (and as the client computes to skip unchanged files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    parent: str | None
    summary: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    discussions: dict[int, dict] = field(default_factory=dict)
    fail_commits: list[int] = field(default_factory=list)  # statuses of the next commits to refuse

    def commit(self, files: dict[str, bytes], parent: str | None, summary: str) -> Commit:
        seed = json.dumps([self.repo_id, parent, summary, len(self.commits), time.time_ns()])
        sha = hashlib.sha1(seed.encode() + b"".join(blob_sha(v).encode() for v in files.values())).hexdigest()
        self.commits[sha] = Commit(sha, dict(files), parent, summary)
        return self.commits[sha]

    def resolve(self, rev: str) -> Commit:
        sha = self.branches.get(rev) or self.branches.get(rev.removeprefix("refs/heads/"))
        if sha is None and rev in self.commits:
            sha = rev
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self.commits[sha]


class HubServer:
    """In-memory Hub on 127.0.0.1 at an ephemeral port. ``with HubServer() as url: ...`` also works."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.endpoint = ""
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> str:
        if self._httpd is None:
            self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
            self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
            threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()
        return self.endpoint

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test helpers ----------------------------------------------------------------------------
    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            return dict(self._repo(repo_id).resolve(revision).files)

    def commits(self, repo_id: str) -> list[str]:
        """Commit shas on main, oldest first (the creation commit included)."""
        with self.lock:
            repo = self._repo(repo_id)
            shas, sha = [], repo.branches["main"]
            while sha is not None:
                shas.append(sha)
                sha = repo.commits[sha].parent
            return shas[::-1]

    def fail_next_commit(self, repo_id: str, status: int = 500, times: int = 1) -> None:
        """The next ``times`` commits to the repo answer ``status`` and change nothing.

        Note: ``upload_folder`` (with hf_xet installed) retries 5xx commits with backoff (1, 2, 4, 8, 8 s),
        so a single 500 is absorbed; use a 4xx ``status`` to make it fail at once."""
        with self.lock:
            self._repo(repo_id).fail_commits.extend([status] * times)

    def set_gated(self, repo_id: str, gated: bool = True) -> None:
        """File downloads from a gated repo answer 403 with ``X-Error-Code: GatedRepo``."""
        with self.lock:
            self._repo(repo_id).gated = gated

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id, private)
            repo.branches["main"] = repo.commit({".gitattributes": GITATTRIBUTES}, None, "initial commit").sha
            return repo

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository Not Found for url: {self.endpoint}/{repo_id}", "RepoNotFound")
        return self.repos[repo_id]

    # -- routes: each gets (repo or None, path segments after the repo, query, body) -------------
    def route(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, object, dict]:
        segs = [unquote(s) for s in path.strip("/").split("/")]
        if segs[:2] == ["api", "models"] and len(segs) >= 4:
            repo_id, rest = "/".join(segs[2:4]), segs[4:]
            key = (method, rest[0] if rest else "")
            handler = {
                ("GET", ""): self.h_info,
                ("GET", "revision"): self.h_info,
                ("GET", "tree"): self.h_tree,
                ("GET", "refs"): self.h_refs,
                ("POST", "preupload"): self.h_preupload,
                ("POST", "commit"): self.h_commit,
                ("POST", "discussions"): self.h_discussions,
                ("GET", "discussions"): self.h_discussions,
            }.get(key)
            if handler:
                return handler(self._repo(repo_id), rest[1:], query, body)
        elif len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self.h_resolve(self._repo("/".join(segs[:2])), segs[3:], query, body)
        elif (method, path) == ("POST", "/api/repos/create"):
            return self.h_create(None, [], query, body)
        elif (method, path) == ("GET", "/api/whoami-v2"):
            user = {"type": "user", "name": USER, "fullname": "Test User", "orgs": [{"name": "org"}]}
            return 200, {**user, "auth": {"type": "access_token", "accessToken": {"role": "write"}}}, {}
        elif (method, path) == ("POST", "/api/validate-yaml"):
            return 200, {"errors": [], "warnings": []}, {}
        elif path == "/api/agent-harnesses":
            raise HubError(404, "Not Found")
        print(f"[hub_server] unknown route: {method} {path}", file=sys.stderr)
        raise HubError(404, f"Unknown route {method} {path}")

    def h_create(self, _repo, _rest, _query, body) -> tuple[int, object, dict]:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"  # no org: the user's namespace
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        self.create_repo(repo_id, private=payload.get("private") or payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id}, {}

    def h_info(self, repo: Repo, rest, _query, _body) -> tuple[int, object, dict]:
        commit = repo.resolve(rest[0] if rest else "main")
        siblings = [
            {"rfilename": p, "size": len(d), "blobId": blob_sha(d)} for p, d in sorted(commit.files.items())
        ]
        info = {"_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.sha}
        info |= {"private": repo.private, "gated": "manual" if repo.gated else False, "disabled": False}
        info |= {"lastModified": NOW, "createdAt": NOW, "tags": [], "downloads": 0, "likes": 0}
        return 200, {**info, "siblings": siblings}, {}

    def h_tree(self, repo: Repo, rest, query, _body) -> tuple[int, object, dict]:
        if not rest:
            raise HubError(404, "Missing revision")
        commit, prefix = repo.resolve(rest[0]), "/".join(rest[1:]).strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # directories on the way
                d = base + "/".join(parts[:i])
                entries.setdefault(
                    d, {"type": "directory", "path": d, "oid": blob_sha(d.encode()), "size": 0}
                )
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": blob_sha(data)}
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        return 200, list(entries.values()), {}

    def h_refs(self, repo: Repo, _rest, query, _body) -> tuple[int, object, dict]:
        def ref(name: str, sha: str, full: str) -> dict:
            return {"name": name, "ref": full, "targetCommit": sha}

        branches = [
            ref(b, s, f"refs/heads/{b}") for b, s in repo.branches.items() if not b.startswith("refs/")
        ]
        out: dict = {"branches": branches, "converts": [], "tags": []}
        if query.get("include_prs", ["0"])[0] in ("1", "true"):
            out["pullRequests"] = [ref(b, s, b) for b, s in repo.branches.items() if b.startswith("refs/pr/")]
        return 200, out, {}

    def h_preupload(self, repo: Repo, rest, _query, body) -> tuple[int, object, dict]:
        current = repo.resolve(rest[0]).files if rest and rest[0] in repo.branches else {}
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            | ({"oid": blob_sha(current[f["path"]])} if f["path"] in current else {})
            for f in json.loads(body)["files"]
        ]
        return 200, {"files": files, "commitOid": repo.branches.get(rest[0] if rest else "main")}, {}

    def h_commit(self, repo: Repo, rest, query, body) -> tuple[int, object, dict]:
        if repo.fail_commits:
            raise HubError(repo.fail_commits.pop(0), "Injected commit failure (HubServer.fail_next_commit)")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        rev, pr_url = rest[0] if rest else "main", None
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        parent = repo.resolve(rev).sha
        wanted = header.get("parentCommit")
        if query.get("create_pr", ["0"])[0] in ("1", "true"):
            num = self._new_discussion(repo, header.get("summary", ""), is_pr=True, head=wanted or parent)
            rev, pr_url = f"refs/pr/{num}", f"{self.endpoint}/{repo.repo_id}/discussions/{num}"
            parent = repo.branches[rev]
        elif wanted and not parent.startswith(wanted):
            raise HubError(412, f"Parent commit {wanted} is not the head of {rev} ({parent})")
        files = dict(repo.commits[parent].files)
        for op in lines:
            key, value = op["key"], op.get("value", {})
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(
                        404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound"
                    )
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            elif key != "header":
                raise HubError(400, f"HubServer does not support commit operation {key!r} (LFS/Xet/copy)")
        commit = repo.commit(files, parent, header.get("summary", ""))
        repo.branches[rev] = commit.sha
        url = f"{self.endpoint}/{repo.repo_id}/commit/{commit.sha}"
        return 200, {"commitUrl": url, "commitOid": commit.sha, "pullRequestUrl": pr_url, "success": True}, {}

    def _new_discussion(self, repo: Repo, title: str, is_pr: bool, head: str | None = None) -> int:
        num = len(repo.discussions) + 1
        repo.discussions[num] = {"num": num, "title": title, "isPullRequest": is_pr, "status": "draft"}
        if is_pr:
            repo.branches[f"refs/pr/{num}"] = head or repo.branches["main"]
        return num

    def h_discussions(self, repo: Repo, rest, _query, body) -> tuple[int, object, dict]:
        if not rest:  # POST: create
            payload = json.loads(body or b"{}")
            num = self._new_discussion(repo, payload.get("title", ""), bool(payload.get("pullRequest")))
            if not payload.get("pullRequest"):
                repo.discussions[num]["status"] = "open"
            return 200, {"num": num, "url": f"{self.endpoint}/{repo.repo_id}/discussions/{num}"}, {}
        d = repo.discussions.get(int(rest[0]) if rest[0].isdigit() else -1)
        if d is None:
            raise HubError(404, f"Discussion {rest[0]} not found")
        extra = {
            "author": {"name": USER},
            "createdAt": NOW,
            "repo": {"name": repo.repo_id, "type": "model"},
        }
        changes = {"base": "refs/heads/main"} if d["isPullRequest"] else {}
        return 200, {**d, **extra, "events": [], "changes": changes, "filesWithConflicts": [], "diff": ""}, {}

    def h_resolve(self, repo: Repo, rest, _query, _body) -> tuple[int, object, dict]:
        commit, path = repo.resolve(rest[0]), "/".join(rest[1:])
        headers = {"X-Repo-Commit": commit.sha}
        if repo.gated:
            msg = f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated."
            raise HubError(403, msg, "GatedRepo", headers)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        data = commit.files[path]
        return (
            200,
            data,
            {**headers, "ETag": f'"{blob_sha(data)}"', "Content-Type": "application/octet-stream"},
        )


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            url = urlsplit(self.path)
            body = self._body()
            try:
                with hub.lock:
                    status, payload, headers = hub.route(self.command, url.path, parse_qs(url.query), body)
            except HubError as e:
                status, payload, headers = (
                    e.status,
                    {"error": e.message},
                    {**e.headers, "X-Error-Message": e.message},
                )
                if e.code:
                    headers["X-Error-Code"] = e.code
            except Exception as e:  # a server bug: answer 500 rather than hang the client
                print(f"[hub_server] error on {self.command} {self.path}: {e!r}", file=sys.stderr)
                status, payload, headers = 500, {"error": repr(e)}, {}
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            if not isinstance(payload, bytes):
                headers.setdefault("Content-Type", "application/json")
            for name, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

        def log_message(self, *args) -> None:  # quiet: unknown routes are logged in HubServer.route
            pass

    return Handler
