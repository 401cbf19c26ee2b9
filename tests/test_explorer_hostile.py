"""The explorer refuses, never 500s (issue 21, cases 5, 7 and the bad --host of 8), over real HTTP.

Every bad request field is a 422 naming the field (lone surrogates, booleans where integers are asked,
out-of-range or non-finite coefficients), a steering coefficient that overflows the model is a 400 naming
it, no hostile value gets a 500; only Host headers naming the bound host or a loopback name (plus
``--allow-host`` ones) are answered; a non-loopback address gets a warning at start; a bad ``--host`` is an
error about the host, before anything loads.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from sae_lens_attn import Site
from sae_lens_attn.frontends.cli import main
from sae_lens_attn.frontends.explorer import ExplorerSession
from sae_lens_attn.frontends.explorer.server import running
from sae_lens_attn.frontends.explorer.steer import MAX_COEFFICIENT

from .test_explorer import TEXT, random_sae

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _request(url: str, method: str = "GET", path: str = "/api/info", body: bytes | None = None,
             host: str | None = None) -> tuple[int, dict | None]:
    """One request with the Host header ``host`` (None: the URL's; "": none at all)."""
    netloc = url.split("//")[1].rstrip("/")
    conn = http.client.HTTPConnection(netloc, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=host is not None)
        if host:
            conn.putheader("Host", host)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if r.getheader("content-type", "").startswith("application/json") else None
    finally:
        conn.close()


def _post(url: str, endpoint: str, body: dict | bytes) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # json.dumps escapes surrogates
    return _request(url, "POST", "/api/" + endpoint, raw)


@pytest.fixture(scope="module")
def served(tiny_neox):
    loud = random_sae(tiny_neox, Site(1), 16, 2)
    with torch.no_grad():
        loud.W_dec.mul_(1e30)  # finite, but any coefficient near the bound overflows the model
    session = ExplorerSession(tiny_neox, {"L0.z": random_sae(tiny_neox, Site(0), 24, 1), "loud": loud})
    with running(session) as url:
        yield session, url


BASE = {"text": TEXT, "sae": "L0.z", "feature": 1, "pos": 2, "coefficient": 2.0, "n_tokens": 1, "top_k": 4, "n_logits": 5,
        "n_terms": 5, "top": 5, "analysis": "analyze", "options": {"n_seq": 2, "induction_length": 4}}
FIELDS = {"analyze": ("text", "top_k"), "activations": ("text", "sae", "feature"),
          "feature": ("text", "sae", "feature", "pos", "n_logits", "n_terms"),
          "steer": ("text", "sae", "feature", "coefficient", "n_tokens", "top"),
          "run": ("text", "sae", "analysis", "options")}


@pytest.mark.parametrize("endpoint,field,value,msg", [
    ("analyze", "text", "a\ud800b", r"text: Value error, holds a lone UTF-16 surrogate \(\\ud800\) at character 1"),
    ("analyze", "text", 5, r"text: Input should be a valid string"),
    ("analyze", "top_k", True, r"top_k: Input should be a valid integer"),
    ("activations", "feature", True, r"feature: Input should be a valid integer"),
    ("activations", "feature", "3", r"feature: Input should be a valid integer"),
    ("activations", "sae", "L0\udc00", r"sae: Value error, holds a lone UTF-16 surrogate"),
    ("feature", "pos", 2.0, r"pos: Input should be a valid integer"),
    ("feature", "n_terms", False, r"n_terms: Input should be a valid integer"),
    ("steer", "coefficient", 1e20, r"coefficient: Input should be less than or equal to 1000000"),
    ("steer", "coefficient", 1e308, r"coefficient: Input should be less than or equal to 1000000"),
    ("steer", "coefficient", -1e300, r"coefficient: Input should be greater than or equal to -1000000"),
    ("steer", "coefficient", float("nan"), r"coefficient: Input should be a finite number"),
    ("steer", "coefficient", True, r"coefficient: Input should be a valid number"),
    ("steer", "n_tokens", True, r"n_tokens: Input should be a valid integer"),
])
def test_a_bad_field_is_a_422_naming_it(served, endpoint, field, value, msg):
    """Today: a surrogate was a 500 with a traceback, 1e20 a 400 "Out of range float values are not JSON
    compliant", and ``feature: true`` feature 1."""
    _, url = served
    code, body = _post(url, endpoint, {k: BASE[k] for k in FIELDS[endpoint]} | {field: value})
    assert code == 422, body
    [err] = body["detail"]
    assert err["loc"] == ["body", field] and re.match(msg, err["msg"]), err
    assert set(err) == {"loc", "msg", "type"}  # the input is not echoed back


def test_no_hostile_value_gets_a_500(served):
    """Every field of every endpoint, each of these values: a 400/404/422 with a message, or an answer."""
    _, url = served
    hostile = [None, True, -1, 0, 10**30, 1e308, "x", [], {}, "", " ", "\u0000", "a\ud800", "\U0001f600" * 3]
    seen = set()
    for endpoint, fields in FIELDS.items():
        for field in fields:
            for value in hostile:
                code, body = _post(url, endpoint, {k: BASE[k] for k in fields} | {field: value})
                assert code in (200, 400, 404, 422), (endpoint, field, value, code, body)
                assert code == 200 or body["detail"], (endpoint, field, value)
                seen.add(code)
    assert seen == {200, 400, 404, 422}
    for name, value in [("top", 10**30), ("top", -1), ("top", 0), ("n_seq", 0), ("n_seq", -3), ("induction_length", 0),
                        ("induction_length", 10**9), ("top", 1e308), ("top", "\u0000")]:
        options = BASE["options"] | {name: value}
        code, body = _post(url, "run", {k: BASE[k] for k in FIELDS["run"]} | {"options": options})
        assert code in (200, 400, 422) and (code == 200 or body["detail"]), (name, value, code, body)
    code, body = _post(url, "analyze", b'{"text": "a\\ud800b", ')  # not even JSON: still a 422 naming the body
    assert code == 422 and re.match(r"body: not valid JSON \(.+\) at character 21$", body["detail"][0]["msg"]), body


def test_a_coefficient_that_overflows_the_model_is_named(served):
    session, url = served
    code, body = _post(url, "steer", BASE | {"sae": "loud", "coefficient": MAX_COEFFICIENT})
    assert code == 400 and body["detail"] == ("coefficient: 1e+06 drives the model's logits to inf/NaN; use a "
                                              "smaller coefficient")
    with pytest.raises(ValueError, match=r"^coefficient: must be a finite number in -1e\+06\.\.1e\+06, got 1e\+20$"):
        session.steer(TEXT, "L0.z", 1, 1e20)
    with pytest.raises(ValueError, match=r"^text: character 1 is a lone UTF-16 surrogate, not text"):
        session.analyze("a\ud800b")
    code, body = _post(url, "steer", BASE | {"coefficient": 3})  # an integer is a number: accepted
    assert code == 200 and body["coefficient"] == 3.0


def test_an_sae_that_overflows_on_a_prompt_is_a_400_naming_it(tiny_neox):
    """Finite weights whose encoder overflows float32 on every token: the SAE is named, no 500."""
    hot = random_sae(tiny_neox, Site(1), 16, 3)
    with torch.no_grad():
        hot.W_enc.copy_(torch.linspace(3e38, 1.5e38, 16) * torch.tensor([1.0, -1.0]).repeat(8))
        hot.b_dec.fill_(-10.0)
    with running(ExplorerSession(tiny_neox, {"hot": hot})) as url:
        code, body = _post(url, "analyze", {"text": TEXT})
    assert code == 400 and body["detail"].startswith(
        "the topk SAE on blocks.1.attn.hook_z: encode gave inf/NaN from finite input: its weights (largest |w| "
        "3e+38) overflow float32. Compute in a wider dtype"), body


def test_only_the_bound_host_and_loopback_names_are_answered(served, tiny_neox):
    """DNS rebinding: a page of another site whose name now resolves to 127.0.0.1 sends its own Host."""
    session, url = served
    port = int(url.rsplit(":", 1)[1].rstrip("/"))
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", None):
        code, body = _request(url, host=host)
        assert code == 200 and body["saes"][0]["id"] == "L0.z", host
    for host in (f"attacker.example:{port}", "127.0.0.1.attacker.example", f"192.168.1.9:{port}"):
        code, body = _request(url, host=host)
        name = host.rsplit(":", 1)[0] if host.endswith(f":{port}") else host
        assert code == 400 and body == {"detail": (
            f"Host header {host!r} is not a name this explorer answers (127.0.0.1, ::1, localhost); this stops "
            "pages of other sites from reading the local API. Open it by one of those names, or start it with "
            f"--allow-host {name}")}, body
        assert _request(url, "POST", "/api/analyze", json.dumps({"text": TEXT}).encode(), host=host)[0] == 400
    assert _request(url, host="")[0] == 400  # no Host header at all
    with running(session, allow_hosts=["explorer.lan"]) as url2:
        assert _request(url2, host="explorer.lan:80")[0] == 200
        assert _request(url2, host="other.lan")[0] == 400
    with running(session, allow_hosts=["*"]) as url3:
        assert _request(url3, host="anything.example")[0] == 200


@pytest.mark.parametrize("argv,msg", [
    (["--host", "nonsense.invalid"], r"cannot listen on --host 'nonsense\.invalid': the name does not resolve \(.*\); "
                                     r"use 127\.0\.0\.1 \(this machine only\), 0\.0\.0\.0 \(every interface\)"),
    (["--host", "192.0.2.1"], r"cannot listen on --host '192\.0\.2\.1': it is not an address of this machine "
                              r"\(EADDRNOTAVAIL\)"),
    (["--port", "70000"], r"--port must be an integer in 0\.\.65535 \(0: any free port\), got 70000"),
])
def test_a_bad_host_or_port_is_named_before_anything_loads(argv, msg, tmp_path, capsys):
    """The SAE folder does not exist: the host is checked first, and the error is about the host."""
    assert main(["explore", "--sae", str(tmp_path / "missing"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(r"sae-lens-attn: error: " + msg, err), err
    assert "choose another --port" not in err  # the port is not what is wrong


def test_a_busy_port_is_named_as_the_port(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        assert main(["explore", "--sae", str(tmp_path / "missing"), "--port", str(port)]) == 2
    finally:
        taken.close()
    assert capsys.readouterr().err == (f"sae-lens-attn: error: cannot listen on 127.0.0.1:{port}: the port is in use "
                                       "(EADDRINUSE); choose another --port (0: any free one)\n")


def test_listening_on_every_interface_warns_and_still_checks_the_host(tiny_neox, tiny_neox_dir, tmp_path):
    sae_dir = random_sae(tiny_neox, Site(1), 16, 5).save(tmp_path / "L1.z")
    cmd = [sys.executable, "-m", "sae_lens_attn.frontends.cli", "explore", "--sae", str(sae_dir), "--model",
           tiny_neox_dir, "--host", "0.0.0.0", "--port", "0", "--device", "cpu", "--allow-host", "explorer.lan"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://0\.0\.0\.0:(\d+)/", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{m.group(1)}/"
        for _ in range(100):  # the socket listens before uvicorn's loop runs
            try:
                code, _ = _request(url)
                break
            except ConnectionError:
                time.sleep(0.1)
        assert code == 200
        assert _request(url, host="explorer.lan")[0] == 200 and _request(url, host="evil.example")[0] == 400
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    warning = [x for x in err.splitlines() if x.startswith("sae-lens-attn: warning")]
    assert warning == [
        "sae-lens-attn: warning: the explorer listens on every network interface, and its API has no "
        "authentication: anyone who can reach this port can run the model and read /api/info (local SAE paths). "
        "It answers the Host names 0.0.0.0, 127.0.0.1, ::1, explorer.lan, localhost; --allow-host NAME adds the "
        "name clients use. Use --host 127.0.0.1 to keep it on this machine"], err
