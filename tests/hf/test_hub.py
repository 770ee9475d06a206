"""push_to_hub end to end against a stand-in for the Hub on 127.0.0.1; offline / no token / unreachable."""
import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from http.server import BaseHTTPRequestHandler

import pytest

from flax_gpt2v.training import trainer as tr
from flax_gpt2v.config import ConfigError

import helpers as t
from helpers import ROOT, TESTS, serving

TOKEN = "hf_fake_token_for_tests"
USER = "tester"  # the namespace the stand-in gives a repo id without one, as the Hub does for the token's user
MAX_REQUESTS = 200  # the stand-in stops answering after this many, so a runaway client cannot loop forever


class FakeHub:
    """Just the endpoints huggingface_hub's create_repo and upload_folder call: repo creation, preupload
    (every file "regular", so that the commit carries it inline) and the NDJSON commit. Each commit is
    kept as {path in repo: bytes}; any other request is recorded in `unexpected` and answered 404."""

    def __init__(self):
        self.repos, self.commits, self.unexpected, self.requests = set(), [], [], 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests += 1
                if self.path != "/api/agent-harnesses":  # huggingface_hub's user-agent registry; it copes with 404
                    hub.unexpected.append(f"GET {self.path}")
                self.reply(404, {"error": "not in the stand-in"})

            def do_POST(self):
                hub.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if hub.requests > MAX_REQUESTS:
                    return self.reply(429, {"error": "too many requests for a test"})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.reply(401, {"error": "Invalid credentials"})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or USER}/{req['name']}"
                    hub.repos.add((repo, req.get("visibility")))
                    return self.reply(200, {"url": f"{hub.endpoint}/{repo}"})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/main", path)
                if not m or m.group(1) not in {r for r, _ in hub.repos}:
                    hub.unexpected.append(f"POST {self.path}")
                    return self.reply(404, {"error": "Repository not found"})
                if m.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                       "oid": None} for f in files]})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header, ops = lines[0], lines[1:]
                assert header["key"] == "header"
                files = {}
                for op in ops:
                    if op["key"] != "file" or op["value"]["encoding"] != "base64":
                        hub.unexpected.append(f"commit operation {op['key']}")
                        continue
                    files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                hub.commits.append({"repo": m.group(1), "message": header["value"]["summary"], "files": files})
                oid = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
                return self.reply(200, {"commitUrl": f"{hub.endpoint}/{m.group(1)}/commit/{oid}", "commitOid": oid})

        self.handler, self.endpoint = Handler, None

    @contextlib.contextmanager
    def running(self):
        with serving(self.handler) as self.endpoint:
            yield self


def read_dir(d):
    return {os.path.relpath(os.path.join(root, f), d): open(os.path.join(root, f), "rb").read()
            for root, _, names in os.walk(d) for f in names}


RUN = """
import sys
sys.path.insert(0, {tests!r})
import helpers as t
from flax_gpt2v.training import trainer as tr
tr.train(t.tiny_config({model_type!r}, {out!r}, **{extra!r}), prepared=t.corpus(), log=print)
"""


def test_push_to_hub_uploads_each_save_and_the_final_export(tmp_path):
    # A variant with a modeling file; hub_token given in the config (kept out of every file written).
    # The warmup spans the first two steps, so a run stopped at step 2 has the same learning rates.
    extra = dict(max_steps=4, warmup_steps=2, save_steps=2, eval_steps=2, logging_steps=2, export_hf=True,
                 push_to_hub=True, hub_model_id="tiny-rotating", hub_token=TOKEN, hub_private_repo=True,
                 hub_strategy="all_checkpoints")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    with FakeHub().running() as hub:
        r = subprocess.run([sys.executable, "-c", RUN.format(tests=TESTS, out=str(out),
                                                             model_type="rotating-head-gpt2", extra=extra)],
                           capture_output=True, text=True, cwd=ROOT,
                           env={**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stdout, r.stdout
    assert hub.unexpected == []
    assert hub.repos == {(f"{USER}/tiny-rotating", "private")}
    assert [(c["repo"], c["message"]) for c in hub.commits] == [
        (f"{USER}/tiny-rotating", "Training in progress, step 2"), (f"{USER}/tiny-rotating", "Checkpoint at step 2"),
        (f"{USER}/tiny-rotating", "End of training")]
    final = read_dir(out / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(final)
    assert any(name.endswith(".py") for name in final)  # the variant's modeling file
    assert hub.commits[2]["files"] == final
    assert hub.commits[1]["files"] == {f"checkpoint-2/{name}": data for name, data in hub.commits[0]["files"].items()}
    # The step-2 push is the export of the parameters at step 2: the same run stopped there exports them.
    ref = tmp_path / "ref"
    tr.train(t.tiny_config("rotating-head-gpt2", ref, **{**extra, "max_steps": 2, "push_to_hub": False}),
             prepared=t.corpus(), log=lambda m: None)
    assert hub.commits[0]["files"] == read_dir(ref / "hf")
    assert hub.commits[0]["files"]["model.safetensors"] != final["model.safetensors"]
    assert not (out / ".hub-push").exists()
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert TOKEN.encode() not in written


def test_hub_strategy_end_pushes_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    out = tmp_path / "run"
    lines = []
    with FakeHub().running() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        tr.train(t.tiny_config("gpt2", out, max_steps=4, save_steps=1, eval_steps=2, export_hf=True, push_to_hub=True,
                               hub_model_id="team/tiny", hub_token=TOKEN, hub_strategy="end"),
                 prepared=t.corpus(), log=lines.append)
    assert not [m for m in lines if "push_to_hub" in m] and hub.unexpected == []
    assert hub.repos == {("team/tiny", None)}
    assert [(c["repo"], c["message"]) for c in hub.commits] == [("team/tiny", "End of training")]
    assert hub.commits[0]["files"] == read_dir(out / "hf")


def closed_port_endpoint():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more: connections are refused
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("case", ["no token", "unreachable", "offline"])
def test_push_failure_is_one_warning_and_a_complete_run(case, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    endpoint = closed_port_endpoint()
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    if case != "no token":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", case == "offline")  # whatever the environment says
    out = tmp_path / "run"
    lines = []
    summary = tr.train(t.tiny_config("gpt2", out, max_steps=4, save_steps=1, eval_steps=2, export_hf=True,
                                     push_to_hub=True, hub_model_id="someone/tiny"),
                       prepared=t.corpus(), log=lines.append)
    warnings = [m for m in lines if "push_to_hub" in m]
    assert len(warnings) == 1 and warnings[0].startswith("warning: push_to_hub: ") and "\n" not in warnings[0]
    assert {"no token": "no Hugging Face token", "unreachable": f"push_to_hub: {endpoint}: ",
            "offline": "HF_HUB_OFFLINE"}[case] in warnings[0]
    assert f"{out}/hf" in warnings[0]
    assert summary["step"] == 4 and sorted(os.listdir(out / "checkpoints")) == ["1", "2", "3", "4"]
    assert (out / "hf" / "model.safetensors").is_file() and not (out / ".hub-push").exists()


@pytest.mark.parametrize("train, key", [
    ({"push_to_hub": True, "hub_strategy": "checkpoint"}, "hub_strategy"),
    ({"push_to_hub": True, "hub_model_id": 3}, "hub_model_id"),
    ({"push_to_hub": True, "export_hf": False}, "export_hf"),
    ({"hub_private_repo": "yes"}, "hub_private_repo"),
    ({"push_to_hub": "true"}, "push_to_hub"),
])
def test_hub_option_errors_name_the_key(train, key, tmp_path):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        tr.train(t.tiny_config("gpt2", tmp_path / "run", **train), prepared=t.corpus(), log=lambda m: None)
