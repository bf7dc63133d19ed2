"""Hub upload against a local stand-in for the Hub's HTTP API (no network), and when the Hub is unreachable."""
import base64
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import train


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub endpoints huggingface_hub uses to create a repo and a branch and commit small files."""
    commits: list = []
    branches: set = set()

    def log_message(self, *args):
        pass

    def reply(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        host = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            req = json.loads(body)
            return self.reply({"url": f"{host}/{req.get('organization')}/{req['name']}"})
        if "/branch/" in self.path:
            FakeHub.branches.add(self.path.rsplit("/branch/", 1)[1])
            return self.reply({})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self.reply({"files": [dict(path=f["path"], uploadMode="regular", shouldIgnore=False) for f in files]})
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            files = {x["value"]["path"]: len(base64.b64decode(x["value"]["content"])) for x in lines if x["key"] == "file"}
            FakeHub.commits.append(dict(title=header["summary"], revision=self.path.rsplit("/commit/", 1)[1], files=files))
            repo = self.path.split("/api/models/", 1)[1].rsplit("/commit/", 1)[0]
            return self.reply({"commitUrl": f"{host}/{repo}/commit/{len(FakeHub.commits):040x}",
                               "commitOid": f"{len(FakeHub.commits):040x}"})
        self.reply({"error": f"unexpected {self.path}"}, 404)


def test_checkpoints_and_dynamics_go_to_a_branch_per_run(tiny_cfg, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_from_the_environment")
    try:
        cfg = tiny_cfg("train.steps=2", "checkpoint.every_steps=0", "name=run-a", "checkpoint.hf_repo_id=me/pico",
                       f"checkpoint.hf_endpoint=http://127.0.0.1:{server.server_port}",
                       "checkpoint.dynamics.layers=[attention.v]")
        train.Trainer(cfg).run()
    finally:
        server.shutdown()
    titles = [c["title"] for c in FakeHub.commits]
    for step in (0, 2):
        assert f"Saving Checkpoint -- Step {step}" in titles
        assert f"Saving Learning Dynamics Data (train) -- Step {step}" in titles
        assert f"Saving Learning Dynamics Data (val) -- Step {step}" in titles
    assert FakeHub.branches == {"run-a"} and {c["revision"] for c in FakeHub.commits} == {"run-a"}
    dyn = next(c for c in FakeHub.commits if c["title"] == "Saving Learning Dynamics Data (train) -- Step 2")
    assert list(dyn["files"]) == ["learning_dynamics/2/train.safetensors"] and dyn["files"]["learning_dynamics/2/train.safetensors"] > 0
    ckpt = next(c for c in FakeHub.commits if c["title"] == "Saving Checkpoint -- Step 2")
    assert any(p.startswith("checkpoints/2/state/") for p in ckpt["files"])


def test_unreachable_hub_warns_and_training_goes_on(tiny_cfg, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_cfg("train.steps=2", "checkpoint.every_steps=0", "checkpoint.hf_repo_id=me/pico",
                   f"checkpoint.hf_endpoint=http://127.0.0.1:{port}")
    final = train.Trainer(cfg).run()
    assert final["step"] == 2 and "val_loss" in final
    out = capsys.readouterr().out
    assert "warning: Hub upload of step 0 to me/pico@" in out and "training goes on" in out
