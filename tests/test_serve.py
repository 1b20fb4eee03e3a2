"""``megaemb serve`` on loopback: the official openai client and raw HTTP get the vectors
``megaemb embed`` writes, every bad request class gets its 4xx in OpenAI's error shape while
the server keeps serving, a bounded concurrent load completes without error, and a
tensor-parallel server (2 ranks) answers the same."""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from test_train import ROOT, _megaemb

TEXTS = ["apt package manager", "a library for parsing JSON", "GNU C compiler",
         "fonts for the terminal"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, nproc=1, *extra):
        self.port = _port()
        env = dict(os.environ, PYTHONWARNINGS="ignore", NPROC_PER_NODE=str(nproc))
        for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
            env.pop(k, None)
        self.proc = subprocess.Popen([sys.executable, "-m", "megaemb.cli", "serve", "--model", model,
                                      "--port", str(self.port), "--served_model_name", "tiny",
                                      "--max_length", "64", *extra],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stdout.read()[-3000:])
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise AssertionError("server did not start within 240 s")

    def post(self, body, raw: bool = False):
        data = body if raw else json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/v1/embeddings", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _reference(model, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    r = _megaemb("embed", "--model", model, "--input", str(path), "--output", str(tmp_path / "ref.npy"))
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(tmp_path / "ref.npy")


def _load(server, clients=32, requests=50):
    """``clients`` threads x ``requests`` sequential requests of 1-4 texts; latencies in s."""
    latencies, errors = [], []

    def client(c):
        for i in range(requests):
            texts = [TEXTS[(c + i + j) % len(TEXTS)] + f" {c}-{i}" for j in range(1 + (c + i) % 4)]
            t = time.perf_counter()
            try:
                status, body = server.post({"model": "tiny", "input": texts})
            except Exception as e:  # a refused or reset connection is an error too
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - t)
            if status != 200 or len(body["data"]) != len(texts):
                errors.append((status, body))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return latencies, errors, time.perf_counter() - start, any(t.is_alive() for t in threads)


@pytest.mark.timeout(900)
def test_serve_openai_http_errors_and_load(tiny_models, tmp_path):
    from openai import OpenAI

    model = tiny_models["dense"]
    ref = _reference(model, tmp_path)
    server = Server(model)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        got = client.embeddings.create(model="tiny", input=TEXTS)
        openai_vectors = np.array([d.embedding for d in got.data])
        assert abs(openai_vectors - ref).max() < 1e-5, abs(openai_vectors - ref).max()
        assert got.usage.prompt_tokens > len(TEXTS)
        # raw HTTP: floats, base64 (the openai client's default), dimensions, token ids
        status, body = server.post({"model": "tiny", "input": TEXTS[0]})
        assert status == 200 and abs(np.array(body["data"][0]["embedding"]) - ref[0]).max() < 1e-5
        status, body = server.post({"input": TEXTS, "encoding_format": "base64"})
        decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]])
        assert status == 200 and abs(decoded - ref).max() < 1e-5
        status, body = server.post({"input": TEXTS, "dimensions": 16})
        cut = ref[:, :16] / np.linalg.norm(ref[:, :16], axis=1, keepdims=True)
        assert status == 200 and abs(np.array([d["embedding"] for d in body["data"]]) - cut).max() < 1e-5
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model)(TEXTS[:2], add_special_tokens=False)["input_ids"]
        status, body = server.post({"input": ids})
        assert status == 200 and abs(np.array([d["embedding"] for d in body["data"]]) - ref[:2]).max() < 1e-5
        status, body = server.post({"input": ids[0]})  # one token list
        assert status == 200 and len(body["data"]) == 1
        # every bad request class: its 4xx, OpenAI's error shape
        bad = {
            "malformed JSON": (b'{"input": [', 400),
            "not an object": (b'["a"]', 400),
            "missing input": ({"model": "tiny"}, 400),
            "empty input": ({"input": ""}, 400),
            "empty list": ({"input": []}, 400),
            "wrong type": ({"input": [{"a": 1}]}, 400),
            "token out of range": ({"input": [[10 ** 9]]}, 400),
            "over-long": ({"input": "word " * 200}, 400),
            "wrong model": ({"model": "gpt-4", "input": "a"}, 404),
            "oversized batch": ({"input": ["a"] * 2049}, 400),
            "bad dimensions": ({"input": "a", "dimensions": 0}, 400),
            "bad encoding": ({"input": "a", "encoding_format": "int8"}, 400),
            "nested too deeply": (b"[" * 100000, 400),
        }
        for name, (body, want) in bad.items():
            status, reply = server.post(body, raw=isinstance(body, bytes))
            assert status == want and set(reply["error"]) == {"message", "type", "param", "code"}, (name, status, reply)
        # routes and methods; a query string is ignored
        import http.client

        for method, path, body, want in (("POST", "/v2/other", b"{}", 404), ("GET", "/v1/embeddings", None, 405),
                                         ("POST", "/v1/models", b"{}", 405), ("DELETE", "/v1/models", None, 405),
                                         ("POST", "/v1/embeddings?x=1", b'{"input": "a"}', 200)):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request(method, path, body=body)
            reply = conn.getresponse()
            assert reply.status == want, (method, path, reply.status)
            assert "error" in json.loads(reply.read()) or want == 200
            conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # no Content-Length
        conn.putrequest("POST", "/v1/embeddings")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(b"5\r\nhello\r\n0\r\n\r\n")
        assert conn.getresponse().status == 411
        conn.close()
        # still serving, then a bounded concurrent load
        assert server.post({"input": TEXTS[0]})[0] == 200
        latencies, errors, elapsed, hung = _load(server)
        assert not hung and not errors, errors[:3]
        p = np.percentile(np.array(latencies) * 1000, [50, 90, 99])
        print(f"serve load: {len(latencies)} requests from 32 clients in {elapsed:.1f} s "
              f"({len(latencies) / elapsed:.0f} req/s); latency p50 {p[0]:.0f} ms, p90 {p[1]:.0f} ms, "
              f"p99 {p[2]:.0f} ms")
        assert len(latencies) == 32 * 50
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_tensor_parallel_server_answers_the_same(tiny_models, tmp_path):
    model = tiny_models["dense"]
    ref = _reference(model, tmp_path)
    server = Server(model, 2, "--tensor_model_parallel_size", "2")
    try:
        status, body = server.post({"model": "tiny", "input": TEXTS})
        assert status == 200 and abs(np.array([d["embedding"] for d in body["data"]]) - ref).max() < 1e-5
        latencies, errors, _, hung = _load(server, clients=8, requests=10)
        assert not hung and not errors, errors[:3]
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_port_in_use_is_one_line_before_loading(tiny_models):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = _megaemb("serve", "--model", tiny_models["dense"], "--port", str(busy.getsockname()[1]))
    lines = [l for l in r.stderr.splitlines() if l.startswith("megaemb serve: error:")]
    assert r.returncode == 2 and len(lines) == 1 and "cannot listen there" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.fixture
def http_layer(request):
    """The HTTP layer of ``megaemb serve`` in this process, without a model: a worker thread
    answers every queued job with zero vectors; the tokenizer refuses what the HF one refuses
    (a string that is not valid Unicode) and fails on the text "crash" (a handler fault)."""
    import queue

    from megaemb.serve import ServeConfig, Server, make_handler, parse_request

    def tokenize(texts):
        if "crash" in texts:
            raise RuntimeError("tokenizer crashed")
        return [list(t.encode("utf-8")) + [255] for t in texts]

    def worker():
        while (job := jobs.get()) is not None:
            job.result = np.zeros((len(job.seqs), 8), np.float32)
            job.done.set()

    jobs = queue.Queue()
    cfg = ServeConfig(name="tiny", width=8, max_length=64, vocab_size=256, end_id=255,
                      read_timeout_s=getattr(request, "param", 60.0))
    server = Server(("127.0.0.1", 0), make_handler(cfg, jobs, lambda body: parse_request(body, cfg, tokenize)))
    threads = [threading.Thread(target=server.serve_forever, daemon=True), threading.Thread(target=worker)]
    for t in threads:
        t.start()
    yield server.server_address[1]
    jobs.put(None)
    server.shutdown()
    server.server_close()
    threads[1].join(timeout=10)


def _raw_exchange(port: int, data: bytes) -> tuple[bytes, dict, bytes]:
    """Send ``data`` on a fresh connection, read until the server closes it: (status line,
    headers, body)."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:  # the server closed with part of an over-long request unread
            pass
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status.encode(), dict(line.split(": ", 1) for line in lines), body


@pytest.mark.timeout(60)
@pytest.mark.parametrize("request_bytes, status, code", [
    (b"hello\r\n\r\n", 400, "bad_request"),
    (b"GET /health HTTP/1.1x\r\n\r\n", 400, "bad_request"),
    (b"GET /health HTTP/9.9\r\n\r\n", 505, "http_version_not_supported"),
    (b"BREW /v1/embeddings HTTP/1.1\r\nHost: x\r\n\r\n", 501, "not_implemented"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "request_uri_too_long"),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, "request_header_fields_too_large"),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431,
     "request_header_fields_too_large"),
], ids=["garbage line", "bad version", "HTTP/9.9", "unknown method", "long line", "long header",
        "too many headers"])
def test_protocol_errors_are_json(http_layer, request_bytes, status, code):
    """Errors http.server raises itself get a full HTTP response with OpenAI's JSON error body
    (not an HTML page, and for a garbage line not a bare page without a status line)."""
    line, headers, body = _raw_exchange(http_layer, request_bytes)
    assert line.startswith(b"HTTP/1.") and int(line.split()[1]) == status, line
    assert headers["Content-Type"] == "application/json" and headers["Connection"] == "close", headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert urllib.request.urlopen(f"http://127.0.0.1:{http_layer}/health", timeout=30).status == 200


@pytest.mark.timeout(60)
@pytest.mark.parametrize("http_layer", [1.0], indirect=True)
def test_stalled_body_times_out(http_layer):
    """A client that sends 9 of 100 announced body bytes and then goes silent gets a 408 in
    OpenAI's shape and the connection closes after ``read_timeout_s`` (it was held forever);
    an idle connection that never sends a request line is closed too."""
    start = time.monotonic()
    line, headers, body = _raw_exchange(http_layer, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: 100\r\n\r\n{\"input\":")
    assert int(line.split()[1]) == 408 and headers["Connection"] == "close", (line, headers)
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert _raw_exchange(http_layer, b"")[0] == b""  # idle: closed without an answer
    assert time.monotonic() - start < 20
    assert urllib.request.urlopen(f"http://127.0.0.1:{http_layer}/health", timeout=30).status == 200


@pytest.mark.timeout(60)
def test_head_answer_has_no_body(http_layer):
    """A HEAD answer has headers only, so the next answer on the connection starts right after
    them (a client reading the two does not take a body for the next status line)."""
    line, headers, rest = _raw_exchange(http_layer, b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                                        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert int(line.split()[1]) == 405 and int(headers["Content-Length"]) > 0, (line, headers)
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:200]


@pytest.mark.timeout(60)
def test_bad_unicode_and_handler_faults_are_json(http_layer):
    """A string with a lone surrogate (valid JSON the tokenizer cannot take) is a 400, a fault
    in the handler a 500, both in OpenAI's shape, and the connection goes on serving."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", http_layer, timeout=30)
    for body, status in ((b'{"input": "a\\ud800b"}', 400), (b'{"input": "crash"}', 500),
                         (b'{"input": "fine"}', 200)):
        conn.request("POST", "/v1/embeddings", body=body)
        reply = conn.getresponse()
        answer = json.loads(reply.read())
        assert reply.status == status and ("error" in answer) == (status != 200), (body, reply.status, answer)
    conn.close()
