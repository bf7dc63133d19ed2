"""A local stand-in for the Hugging Face Hub's HTTP API, for tests (no network): repos with branches, commits that
keep every version of every file, tags, the commit list, the file tree and file downloads; enough for
huggingface_hub's create_commit / create_tag / list_repo_commits / snapshot_download and transformers'
from_pretrained(revision=...), and datasets' files (hf_hub_download(repo_type="dataset")). `fail_next` makes the
next N commits fail with a 500, as a Hub that is down; `fail_files[path] = N` the next N downloads of a file."""
import base64
import hashlib
import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class Repo:
    def __init__(self):
        self.commits: dict[str, dict] = {}
        root = self.new_commit(None, "initial commit", {".gitattributes": b""})
        self.branches, self.tags = {"main": root}, {}

    def new_commit(self, parent, title, files):
        oid = hashlib.sha1(f"{parent}{title}{len(self.commits)}".encode()).hexdigest()
        self.commits[oid] = dict(parent=parent, title=title, files=files,
                                 date=datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"))
        return oid

    def resolve(self, rev):
        rev = unquote(rev)
        return self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)

    def history(self, oid):
        while oid:
            yield oid, self.commits[oid]
            oid = self.commits[oid]["parent"]


class Hub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.fail_next, self.fail_files, self.downloads = 0, {}, []
        self.lock = threading.Lock()
        handler = type("Handler", (Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_dataset(self, repo: str, files: dict):
        """A dataset repo holding `files` {path: bytes} on main."""
        self.add_model(f"datasets/{repo}", files)

    def add_model(self, repo: str, files: dict):
        """A model repo (a tokenizer's, say) holding `files` {path: bytes} on main."""
        r = self.repos[repo] = Repo()
        r.branches["main"] = r.new_commit(r.branches["main"], "add files", {".gitattributes": b"", **files})

    def titles(self, repo, rev):
        r = self.repos[repo]
        return [c["title"] for _, c in r.history(r.resolve(rev))]

    def close(self):
        self.server.shutdown()


class Handler(BaseHTTPRequestHandler):
    hub: Hub

    def log_message(self, *args):
        pass

    def reply(self, obj=None, code=200, body=None, headers=()):
        body = json.dumps(obj).encode() if body is None else body
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json" if obj is not None else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def missing(self, code, what):
        self.reply({"error": what}, 404, headers=[("X-Error-Code", code), ("X-Error-Message", what)])

    def route(self):
        """(repo, verb, rest, query) of /api/models/<owner>/<name>/<verb>/<rest> or /<owner>/<name>/resolve/..."""
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts[0] == "api":
            parts = parts[1:] if parts[1] == "datasets" else parts[2:]  # models: no prefix in the repo key
        n = 3 if parts[0] == "datasets" else 2  # datasets/<owner>/<name>
        return "/".join(parts[:n]), (parts[n] if len(parts) > n else ""), parts[n + 1:], parse_qs(url.query)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization') or 'me'}/{req['name']}"
            with self.hub.lock:
                if repo in self.hub.repos:
                    return self.reply({"error": "exists", "url": f"{self.hub.url}/{repo}"}, 409)
                self.hub.repos[repo] = Repo()
            return self.reply({"url": f"{self.hub.url}/{repo}"})
        name, verb, rest, _ = self.route()
        repo = self.hub.repos.get(name)
        if repo is None:
            return self.missing("RepoNotFound", f"no repo {name}")
        with self.hub.lock:
            if verb == "branch":
                branch = unquote("/".join(rest))
                if branch in repo.branches:
                    return self.reply({"error": "branch exists"}, 409)
                repo.branches[branch] = repo.branches["main"]
                return self.reply({})
            if verb == "tag":
                tag, oid = json.loads(body)["tag"], repo.resolve("/".join(rest))
                if tag in repo.tags:
                    return self.reply({"error": f"tag {tag} exists"}, 409)
                repo.tags[tag] = oid
                return self.reply({})
            if verb == "preupload":
                files = json.loads(body)["files"]
                return self.reply({"files": [dict(path=f["path"], uploadMode="regular", shouldIgnore=False)
                                             for f in files]})
            if verb == "commit":
                if self.hub.fail_next:
                    self.hub.fail_next -= 1
                    return self.reply({"error": "the stand-in Hub is down"}, 500)
                branch = unquote("/".join(rest))
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files = dict(repo.commits[repo.branches[branch]]["files"])
                for x in lines:
                    if x["key"] == "file":
                        files[x["value"]["path"]] = base64.b64decode(x["value"]["content"])
                    elif x["key"] == "deletedFile":
                        files.pop(x["value"]["path"], None)
                oid = repo.new_commit(repo.branches[branch], header["summary"], files)
                repo.branches[branch] = oid
                return self.reply({"commitUrl": f"{self.hub.url}/{name}/commit/{oid}", "commitOid": oid})
        self.reply({"error": f"unexpected POST {self.path}"}, 404)

    def do_GET(self):
        name, verb, rest, query = self.route()
        repo = self.hub.repos.get(name)
        if repo is None:
            return self.missing("RepoNotFound", f"no repo {name}")
        if verb == "resolve":
            return self.file(repo, rest[0], unquote("/".join(rest[1:])))
        oid = repo.resolve(rest[0]) if rest else repo.branches["main"]
        if oid is None:
            return self.missing("RevisionNotFound", f"no revision {rest[0]}")
        files = repo.commits[oid]["files"]
        if verb == "revision" or verb == "":
            return self.reply(dict(id=name, modelId=name, sha=oid, private=False,
                                   siblings=[dict(rfilename=f) for f in sorted(files)]))
        if verb == "commits":
            return self.reply([dict(id=o, title=c["title"], message="", authors=[], date=c["date"])
                               for o, c in repo.history(oid)])
        if verb == "tree":
            under = unquote("/".join(rest[1:])).strip("/")
            return self.reply([dict(type="file", path=f, size=len(b), oid=hashlib.sha1(b).hexdigest())
                               for f, b in sorted(files.items()) if not under or f.startswith(under + "/")])
        if verb == "refs":
            ref = lambda k, v, kind: dict(name=k, ref=f"refs/{kind}/{k}", targetCommit=v)
            return self.reply(dict(branches=[ref(k, v, "heads") for k, v in repo.branches.items()],
                                   tags=[ref(k, v, "tags") for k, v in repo.tags.items()], converts=[]))
        self.reply({"error": f"unexpected GET {self.path}"}, 404)

    do_HEAD = do_GET

    def file(self, repo, rev, path):
        oid = repo.resolve(rev)
        if oid is None:
            return self.missing("RevisionNotFound", f"no revision {rev}")
        data = repo.commits[oid]["files"].get(path)
        if data is None:
            return self.missing("EntryNotFound", f"no file {path} at {rev}")
        if self.command == "GET":
            with self.hub.lock:
                self.hub.downloads.append(path)
                if self.hub.fail_files.get(path):
                    self.hub.fail_files[path] -= 1
                    return self.reply({"error": "the stand-in Hub is down"}, 500)
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        self.reply(body=data, headers=[("X-Repo-Commit", oid), ("ETag", etag)])
