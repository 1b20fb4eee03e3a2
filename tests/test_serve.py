"""``megaemb serve`` on loopback: the official openai client and raw HTTP get the vectors
``megaemb embed`` writes, every bad request class gets its 4xx in OpenAI's error shape while
the server keeps serving, a bounded concurrent load completes without error, and a
tensor-parallel server (2 ranks) answers the same. A generative reranker's server answers
POST /v1/rerank with the Qwen3-Reranker model card snippet's P(yes) (1 and 2 ranks), and each
server refuses the other task's route."""
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

    def post(self, body, raw: bool = False, route: str = "/v1/embeddings"):
        data = body if raw else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data,
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
        status, reply = server.post({"query": "a", "documents": ["b"]}, route="/v1/rerank")
        assert status == 404 and reply["error"]["code"] == "wrong_model_task", reply
        assert "`tiny` is a model of --task_type embedding: use POST /v1/embeddings; /v1/rerank is for " \
            "--task_type generative_reranker or reranker models" \
            in reply["error"]["message"], reply
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


QUERY = "a text editor"
DOCS = ["GNU Emacs is an extensible, customizable text editor", "GNU C compiler",
        "fonts for the terminal", "a library for parsing JSON"]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    """A tiny random Qwen3-Reranker-shaped ``Qwen3ForCausalLM`` (untied ``lm_head``)."""
    from megaemb.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("reranker") / "rr"), seed=6, causal_lm=True)


def _rerank(server, body, route="/v1/rerank"):
    return server.post({"model": "tiny", **body}, route=route)


def _by_index(results) -> np.ndarray:
    return np.array([r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])])


@pytest.mark.timeout(600)
def test_rerank_server_scores_as_the_model_card(reranker):
    """POST /v1/rerank of a generative reranker: P(yes) of the model card's transformers snippet
    (fp32, 1e-5) in descending order, its instruction, top_n, return_documents, the /rerank and
    /v2/rerank aliases, every bad request class, the embedder's route refused, and concurrent
    requests batched together."""
    from test_reranker_export import _official_scores

    official = _official_scores(reranker, [(QUERY, d) for d in DOCS])[0].numpy()
    instructed = _official_scores(reranker, [(QUERY, d) for d in DOCS], "Find the Debian package")[0].numpy()
    assert official.max() - official.min() > 1e-3 and abs(instructed - official).max() > 1e-5
    server = Server(reranker, 1, "--task_type", "generative_reranker", "--max_length", "256")
    try:
        status, body = _rerank(server, {"query": QUERY, "documents": [DOCS[0], *({"text": d} for d in DOCS[1:])]})
        assert status == 200, body
        assert [r["index"] for r in body["results"]] == list(np.argsort(-official, kind="stable")), (body, official)
        assert abs(_by_index(body["results"]) - official).max() <= 1e-5, (body, official)
        assert [r["document"]["text"] for r in body["results"]] == [DOCS[r["index"]] for r in body["results"]]
        assert body["model"] == "tiny" and body["usage"]["total_tokens"] > 4 * 60, body
        for route in ("/rerank", "/v2/rerank"):
            status, alias = _rerank(server, {"query": QUERY, "documents": DOCS}, route)
            assert status == 200 and alias["results"] == body["results"], (route, alias)
        status, top = _rerank(server, {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False,
                                       "instruction": "Find the Debian package"})
        assert status == 200 and [r["index"] for r in top["results"]] == list(np.argsort(-instructed)[:2]), top
        assert all(set(r) == {"index", "relevance_score"} for r in top["results"]), top
        assert abs(np.array([r["relevance_score"] for r in top["results"]])
                   - np.sort(instructed)[::-1][:2]).max() <= 1e-5, (top, instructed)
        bad = {
            "malformed JSON": (b'{"query": ', 400, None),
            "missing query": ({"documents": DOCS}, 400, "query"),
            "empty query": ({"query": " ", "documents": DOCS}, 400, "query"),
            "query not a string": ({"query": ["a"], "documents": DOCS}, 400, "query"),
            "query too long": ({"query": "word " * 300, "documents": DOCS}, 400, "query"),
            "missing documents": ({"query": QUERY}, 400, "documents"),
            "empty documents": ({"query": QUERY, "documents": []}, 400, "documents"),
            "documents not a list": ({"query": QUERY, "documents": "a"}, 400, "documents"),
            "non-string document": ({"query": QUERY, "documents": ["a", 42]}, 400, "documents"),
            "object without text": ({"query": QUERY, "documents": [{"txt": "a"}]}, 400, "documents"),
            "empty document": ({"query": QUERY, "documents": ["a", ""]}, 400, "documents"),
            "too many documents": ({"query": QUERY, "documents": ["a"] * 2049}, 400, "documents"),
            "top_n 0": ({"query": QUERY, "documents": DOCS, "top_n": 0}, 400, "top_n"),
            "top_n a string": ({"query": QUERY, "documents": DOCS, "top_n": "2"}, 400, "top_n"),
            "top_n a float": ({"query": QUERY, "documents": DOCS, "top_n": 1.5}, 400, "top_n"),
            "top_n a bool": ({"query": QUERY, "documents": DOCS, "top_n": True}, 400, "top_n"),
            "bad return_documents": ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, 400,
                                     "return_documents"),
            "bad instruction": ({"query": QUERY, "documents": DOCS, "instruction": 5}, 400, "instruction"),
            "wrong model": ({"model": "gpt-4", "query": QUERY, "documents": DOCS}, 404, "model"),
        }
        for name, (request, want, param) in bad.items():
            status, reply = server.post(request, raw=isinstance(request, bytes), route="/v1/rerank")
            assert status == want and set(reply["error"]) == {"message", "type", "param", "code"} \
                and reply["error"]["param"] == param and "\n" not in reply["error"]["message"], (name, status, reply)
        status, reply = server.post({"input": "a"})
        assert status == 404 and reply["error"]["code"] == "wrong_model_task", reply
        assert "`tiny` is a model of --task_type generative_reranker: use POST /v1/rerank (or /rerank, " \
            "/v2/rerank); /v1/embeddings is for --task_type embedding models" == reply["error"]["message"], reply
        assert json.loads(urllib.request.urlopen(server.url + "/v1/models", timeout=30).read())["data"][0]["id"] \
            == "tiny"
        # concurrent requests (batched together by the model thread) each get their own answer
        answers, errors = {}, []

        def client(c):
            docs = DOCS[c % 4:] + DOCS[:c % 4]
            status, reply = _rerank(server, {"query": QUERY, "documents": docs})
            if status != 200:
                errors.append(reply)
            answers[c] = (docs, reply)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(answers) == 8, errors[:2]
        for docs, reply in answers.values():
            got = {docs[r["index"]]: r["relevance_score"] for r in reply["results"]}
            assert max(abs(got[d] - s) for d, s in zip(DOCS, official)) <= 1e-5, (docs, reply)
        # Ctrl-C of the single-process server: exit 130, one line, no traceback
        os.killpg(server.proc.pid, signal.SIGINT)
        assert server.proc.wait(timeout=60) == 130
        out = server.proc.stdout.read()
        assert out.rstrip().endswith("megaemb serve: stopped by SIGINT"), out[-3000:]
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_tensor_parallel_rerank_server_answers_the_same(reranker):
    """TP=2 (the output layer's yes/no rows on different ranks' vocabulary shards): the model
    card snippet's scores."""
    from test_reranker_export import _official_scores

    official = _official_scores(reranker, [(QUERY, d) for d in DOCS])[0].numpy()
    server = Server(reranker, 2, "--tensor_model_parallel_size", "2", "--task_type", "generative_reranker",
                    "--max_length", "256")
    try:
        status, body = _rerank(server, {"query": QUERY, "documents": DOCS})
        assert status == 200 and abs(_by_index(body["results"]) - official).max() <= 1e-5, (body, official)
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_rerank_answer_order_ties_and_top_n():
    """``parse_rerank``'s answer from given scores: sigmoid, descending, ties by index, top_n
    over the number of documents keeps them all; the instruction and document-only truncation
    are the prompt tokenizer's (the request's instruction wins over the server's)."""
    from transformers import AutoTokenizer

    from megaemb.serve import ServeConfig
    from megaemb.tasks.reranker_prompt import RerankPromptTokenizer
    from megaemb.tasks.reranker_serve import parse_rerank
    from megaemb.tiny import qwen3_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    cfg = ServeConfig(name="tiny", width=8, max_length=96, vocab_size=151669, end_id=0)
    prompts = RerankPromptTokenizer(tokenizer, 96, "server instruction")
    job = parse_rerank(json.dumps({"query": "q", "documents": ["a", "b", {"text": "c"}, "word " * 200],
                                   "top_n": 10}).encode(), cfg, prompts)
    assert job.seqs[:3] == prompts.encode_group("q", ["a", "b", "c"], source="x")
    # the long document is cut to fit, the scored suffix kept
    assert len(job.seqs[3]) == 96 and job.seqs[3][-len(prompts.suffix_ids):] == prompts.suffix_ids
    reply = job.reply(np.array([0.0, 2.0, 0.0, -1.0], np.float32))
    assert [(r["index"], r["document"]["text"]) for r in reply["results"]][:3] == [(1, "b"), (0, "a"), (2, "c")]
    assert [r["relevance_score"] for r in reply["results"]] == pytest.approx(
        [1 / (1 + np.exp(-2.0)), 0.5, 0.5, 1 / (1 + np.exp(1.0))], abs=1e-12)
    assert reply["usage"]["prompt_tokens"] == sum(map(len, job.seqs))
    own = parse_rerank(b'{"query": "q", "documents": ["a"], "instruction": "mine"}', cfg, prompts)
    assert own.seqs == prompts.encode_group("q", ["a"], source="x", instruction="mine") != job.seqs[:1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags, message", [
    (["--instruction", "x"], "--instruction is not supported with --task_type embedding"),
    (["--task_type", "cross_encoder"], "--task_type 'cross_encoder': expected one of"),
])
def test_bad_serve_task_flags_are_one_line(tiny_models, flags, message):
    r = _megaemb("serve", "--model", tiny_models["dense"], "--port", "0", *flags)
    lines = [l for l in r.stderr.splitlines() if l.startswith("megaemb serve: error:")]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_serve_task_follows_the_checkpoint(tmp_path):
    """A megaemb checkpoint's recorded task is what ``serve`` builds; ``--task_type`` naming
    another is a one-line error."""
    from argparse import Namespace

    from megaemb import tasks
    from megaemb.cli import serve_task

    (tmp_path / "megaemb.json").write_text(json.dumps({"format": "megaemb-mcore", "version": 2,
                                                       "task": "generative_reranker"}))
    args = Namespace(model=str(tmp_path), task_type=None, instruction="judge")
    assert serve_task(args) is tasks.GENERATIVE_RERANKER
    with pytest.raises(ValueError, match=r"^--model .*: a checkpoint of --task_type generative_reranker, "
                                         r"not embedding$"):
        serve_task(Namespace(model=str(tmp_path), task_type="embedding", instruction=None))
