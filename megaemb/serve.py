"""``megaemb serve``: an OpenAI-compatible embeddings server, or a Cohere / Jina / vLLM-shaped
rerank server, on an HF or megaemb checkpoint. The model's task decides its POST routes
(``Task.serve_routes``, parsed by ``Task.serve_parser``); another task's route is a 404 saying
what the model is.

    POST /v1/embeddings   (embedding) {"model", "input": str | [str] | [int] | [[int]],
                           "dimensions"?, "encoding_format"?: "float" | "base64"}
    POST /v1/rerank       (generative_reranker; also /rerank, /v2/rerank) {"model", "query",
                           "documents", "top_n"?, "return_documents"?, "instruction"?}:
                           ``megaemb.tasks.reranker_serve``
    GET  /v1/models       the one served model
    GET  /health          200 once the model is loaded

Threads: HTTP requests are parsed and validated by the handler threads of a
``ThreadingHTTPServer`` on global rank 0 and queued; the main thread of every rank runs
the model. Rank 0 takes what is queued (waiting up to ``batch_wait_ms`` for more, at most
``max_batch_texts`` texts), broadcasts the token ids to the other ranks of the model replica
(tensor / pipeline parallel; a dedicated gloo group whose timeout spans idle hours), and all
ranks run one collective forward (``inference.forward_embeddings``). Rank 0 then answers each
request (``Job.reply``); embeddings: Matryoshka truncation to ``dimensions`` (renormalised),
float lists or base64 of little-endian float32 (OpenAI's format), and ``usage`` token counts.

Texts are tokenised as ``megaemb embed`` does (the end token appended). Token-id inputs get
the end token appended unless they end with it. Bad requests get OpenAI's error shape,
``{"error": {"message", "type", "param", "code"}}``, with 400 (malformed JSON, missing,
empty, over-long, mistyped or non-Unicode input, a bad ``dimensions`` / ``encoding_format``, a
batch over ``max_batch_size`` inputs), 404 (unknown model or route), 405 (a method a route does
not take), 411 (no Content-Length), 413 (a body over 64 MiB) or 408 (a body shorter than its
Content-Length after ``read_timeout_s`` without data; the connection closes), and the server
keeps serving. Every read has that timeout: an idle or stalled connection is closed.
HTTP protocol errors (400 for a garbage request line, 414, 431, 501, 505: ``send_error``) and
a fault of the handler itself (500) get the same shape: every answer is JSON."""
from __future__ import annotations

import base64
import datetime
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
import torch.distributed as dist

from megaemb import tasks
from megaemb.benchmark import truncate

MAX_BATCH_SIZE = 2048  # inputs per request (OpenAI's limit)
MAX_BODY_BYTES = 64 << 20  # larger request bodies get a 413 without being read


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's texts as token ids (``seqs``), how its answer is written from the model's
    outputs for them (``reply(result) -> dict``; ``result``: ``[n, width]`` embeddings, or a
    scoring head's ``[n]`` scores, in ``seqs`` order) and where the answer goes."""

    seqs: list[list[int]]
    reply: Callable[[np.ndarray], dict]
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: str | None = None


@dataclass
class ServeConfig:
    name: str
    width: int  # the model's embedding width
    max_length: int
    vocab_size: int
    end_id: int
    max_batch_size: int = MAX_BATCH_SIZE
    max_batch_texts: int = 256
    batch_wait_ms: float = 5.0
    read_timeout_s: float = 60.0  # a client silent this long mid-request (or idle) is cut off


def read_request(body: bytes, cfg: ServeConfig) -> dict:
    """A POST body -> its JSON object, its ``model`` (when given) checked against the served
    name; ``RequestError`` otherwise."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "the body is nested too deeply") from None
    if not isinstance(req, dict):
        raise RequestError(400, "the body must be a JSON object")
    model = req.get("model")
    if model is not None and model != cfg.name:
        raise RequestError(404, f"The model `{model}` does not exist (this server serves `{cfg.name}`)",
                           "model", "model_not_found")
    return req


def check_text(text: str, where: str, param: str) -> None:
    """A request string the tokenizer can take: not blank, valid Unicode (``RequestError``
    naming ``where``, e.g. ``input[3]``, and ``param`` otherwise)."""
    if not text.strip():
        raise RequestError(400, f"{where} is empty", param)
    if not _is_unicode(text):
        raise RequestError(400, f"{where} is not valid Unicode (a lone surrogate escape such as "
                           "\\ud800)", param)


def parse_request(body: bytes, cfg: ServeConfig, tokenize) -> Job:
    """A POST /v1/embeddings body -> ``Job``; ``RequestError`` for every bad request class."""
    req = read_request(body, cfg)
    if "input" not in req:
        raise RequestError(400, "'input' is required", "input")
    items = req["input"]
    if isinstance(items, str) or (isinstance(items, list) and items and all(is_int(t) for t in items)):
        items = [items]
    if not isinstance(items, list) or not items:
        raise RequestError(400, "'input' must be a non-empty string, list of strings, or token id list(s)",
                           "input")
    if len(items) > cfg.max_batch_size:
        raise RequestError(400, f"'input' has {len(items)} items; at most {cfg.max_batch_size} per request",
                           "input")
    dims = req.get("dimensions")
    if dims is not None and (not is_int(dims) or not 1 <= dims <= cfg.width):
        raise RequestError(400, f"'dimensions' must be an integer in [1, {cfg.width}], got {dims!r}",
                           "dimensions")
    encoding = req.get("encoding_format", "float") or "float"
    if encoding not in ("float", "base64"):
        raise RequestError(400, f"'encoding_format' must be 'float' or 'base64', got {encoding!r}",
                           "encoding_format")
    texts = [i for i, x in enumerate(items) if isinstance(x, str)]
    for i, x in enumerate(items):
        if isinstance(x, str):
            check_text(x, f"input[{i}]", "input")
        elif not (isinstance(x, list) and x and all(is_int(t) and 0 <= t < cfg.vocab_size for t in x)):
            raise RequestError(400, f"input[{i}] must be a non-empty string or a list of token ids in "
                               f"[0, {cfg.vocab_size})", "input")
    encoded = dict(zip(texts, tokenize([items[i] for i in texts]))) if texts else {}
    seqs = []
    for i, x in enumerate(items):
        seq = encoded[i] if i in encoded else (list(x) if x[-1] == cfg.end_id else list(x) + [cfg.end_id])
        if len(seq) > cfg.max_length:
            raise RequestError(400, f"input[{i}] has {len(seq)} tokens (end token included), over this "
                               f"server's --max_length {cfg.max_length}", "input", "context_length_exceeded")
        seqs.append(seq)
    return Job(seqs, lambda result: _embeddings_answer(result, seqs, dims, encoding, cfg))


def embeddings_parser(hf_dir: str, cfg: ServeConfig, instruction: str | None = None):
    """The embedding task's ``serve_parser``: ``parse(body) -> Job`` for POST /v1/embeddings
    (texts tokenised as ``megaemb embed`` does, at full length: an over-long input is refused,
    not cut). ``instruction`` is not used (the task refuses ``--instruction``)."""
    from megaemb.data.tokenize import EmbeddingTokenizer

    full = EmbeddingTokenizer(hf_dir, 1 << 30)
    return lambda body: parse_request(body, cfg, full.encode)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_unicode(text: str) -> bool:
    """False for a string JSON let through with a lone surrogate (``"\\ud800"``), which the
    tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _embeddings_answer(result: np.ndarray, seqs: list[list[int]], dimensions: int | None,
                       encoding: str, cfg: ServeConfig) -> dict:
    """``result [n, width]`` -> the /v1/embeddings answer."""
    emb = truncate(result, dimensions).astype("<f4")
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(row.tobytes()).decode() if encoding == "base64"
             else row.tolist()} for i, row in enumerate(emb)]
    tokens = sum(len(s) for s in seqs)
    return {"object": "list", "data": data, "model": cfg.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def make_handler(cfg: ServeConfig, jobs: "queue.Queue[Job]", parse: Callable[[bytes], Job],
                 task: tasks.Task = tasks.EMBEDDING):
    """HTTP handler class: ``task.serve_routes`` take POST bodies, ``parse(body) -> Job``
    (one at a time: HF fast tokenizers are not safe to call from many threads at once), and
    answer once the model thread has run the job. Another task's routes get a 404 saying
    which kind of model this is."""
    lock = threading.Lock()
    others: dict[str, list[str]] = {}  # another task's route -> the tasks that answer it
    for other in tasks.TASKS.values():
        for r in other.serve_routes:
            if r not in task.serve_routes:
                others.setdefault(r, []).append(other.name)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = cfg.read_timeout_s  # every read of the connection: a stalled client is dropped

        def log_message(self, *args):  # no line per request
            pass

        def _send(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has headers only, or the next answer is garbled
                self.wfile.write(data)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None):
            """http.server's own errors (a garbage request line, an unknown method or HTTP version,
            an over-long line, too many headers) in OpenAI's JSON shape, not its HTML page; the
            connection closes."""
            if not self.request_version.startswith("HTTP/1."):
                self.request_version = "HTTP/1.0"  # a status line and headers even for an unreadable line
            self.close_connection = True
            status = HTTPStatus(code)
            self._send(code, RequestError(code, message or status.phrase, code=status.name.lower()).body())

        def _route(self) -> str:
            return self.path.split("?", 1)[0].rstrip("/")

        def _wrong_method(self):
            self._send(405, RequestError(405, f"{self.command} is not allowed on {self._route() or '/'}",
                                         code="method_not_allowed").body())

        def _no_route(self):
            route = self._route()
            if route in others:
                first, *aliases = task.serve_routes
                also = f" (or {', '.join(aliases)})" if aliases else ""
                self._send(404, RequestError(
                    404, f"`{cfg.name}` is a model of --task_type {task.name}: use POST {first}{also}; "
                    f"{route} is for --task_type {' or '.join(others[route])} models", code="wrong_model_task").body())
                return
            self._send(404, RequestError(404, f"no route {route or '/'}", code="not_found").body())

        def do_GET(self):
            route = self._route()
            if route == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": cfg.name, "object": "model", "created": 0, "owned_by": "megaemb"}]})
            elif route == "/health":
                self._send(200, {"status": "ok"})
            elif route in task.serve_routes:
                self._wrong_method()
            else:
                self._no_route()

        def do_POST(self):
            route = self._route()
            if "Content-Length" not in self.headers:
                self.close_connection = True  # a chunked or unsized body is not read
                self._send(411, RequestError(411, "a Content-Length header is required",
                                             code="length_required").body())
                return
            try:
                length = int(self.headers["Content-Length"])
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True  # the body is not read: the connection is unusable
                status = 413 if length > 0 else 400
                self._send(status, RequestError(
                    status, f"Content-Length must be an integer in [0, {MAX_BODY_BYTES}]",
                    code="invalid_body").body())
                return
            try:
                body = self.rfile.read(length) if length else b""
            except TimeoutError:  # socket.timeout: the body stopped short of its Content-Length
                body = None
            if body is None or len(body) < length:
                self.close_connection = True
                self._send(408, RequestError(408, f"the body stopped short of Content-Length={length} "
                                             f"bytes (no data for {cfg.read_timeout_s:g} s)",
                                             code="request_timeout").body())
                return
            if route in ("/v1/models", "/health"):
                self._wrong_method()
                return
            if route not in task.serve_routes:
                self._no_route()
                return
            try:
                with lock:
                    job = parse(body)
            except RequestError as e:
                self._send(e.status, e.body())
                return
            except Exception as e:  # a bug, not the client's fault: still an answer in OpenAI's shape
                self._send(500, RequestError(500, f"{type(e).__name__}: {e}").body())
                return
            jobs.put(job)
            job.done.wait()
            if job.error:
                self._send(500, RequestError(500, job.error).body())
            else:
                self._send(200, job.reply(job.result))

        def do_PUT(self):
            self._wrong_method()

        do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: socketserver's 5 refuses bursts of clients

    def handle_error(self, request, client_address):
        """A client that went away is no server error: no traceback for it."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)


def _take_batch(jobs: "queue.Queue[Job]", cfg: ServeConfig, stop: threading.Event) -> list[Job]:
    """Rank 0: block for a first job (until ``stop``), then gather more for up to
    ``batch_wait_ms`` or ``max_batch_texts`` texts."""
    while not stop.is_set():
        try:
            batch = [jobs.get(timeout=0.2)]
            break
        except queue.Empty:
            continue
    else:
        return []
    texts = len(batch[0].seqs)
    deadline = time.monotonic() + cfg.batch_wait_ms / 1000
    while texts < cfg.max_batch_texts:
        try:
            job = jobs.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        batch.append(job)
        texts += len(job.seqs)
    return batch


def serve(model, cfg: ServeConfig, parse: Callable[[bytes], Job], *, host: str, port: int,
          pad_id: int, packed: bool, micro_batch_size: int = 32, task: tasks.Task = tasks.EMBEDDING,
          stop: threading.Event | None = None) -> None:
    """Collective over the ranks of one model replica; returns when ``stop`` is set on rank 0
    (then it tells the other ranks). Rank 0 answers ``task.serve_routes`` with ``parse``
    (``task.make_serve_parser``); the model's outputs (embeddings, or a head's scores) go back
    to each job in its texts' order."""
    from megaemb.inference import forward_embeddings

    stop = stop or threading.Event()
    rank0 = dist.get_rank() == 0
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
    jobs: queue.Queue[Job] = queue.Queue()
    server = None
    if rank0:
        server = Server((host, port), make_handler(cfg, jobs, parse, task))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(f"megaemb serve: {cfg.name} ({task.name}) on http://{host}:{server.server_address[1]}/v1 "
              f"(POST {', '.join(task.serve_routes)}, GET /v1/models)", flush=True)
    try:
        while True:
            batch = _take_batch(jobs, cfg, stop) if rank0 else []
            message = [[job.seqs for job in batch] if batch or not rank0 else None]
            dist.broadcast_object_list(message, src=0, group=control)
            if message[0] is None:  # stop
                return
            seqs = [s for job_seqs in message[0] for s in job_seqs]
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
            try:
                out = forward_embeddings(model, [seqs[i] for i in order], pad_id=pad_id, packed=packed,
                                         micro_batch_size=micro_batch_size)
                emb = torch.empty_like(out)  # [n, width] or [n]
                emb[order] = out
                error = None
            except Exception as e:  # answer the requests; the next batch may well succeed
                emb, error = None, f"{type(e).__name__}: {e}"
            if rank0:
                at = 0
                for job in batch:
                    n = len(job.seqs)
                    if error:
                        job.error = error
                    else:
                        job.result = emb[at:at + n].cpu().numpy()
                    at += n
                    job.done.set()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
