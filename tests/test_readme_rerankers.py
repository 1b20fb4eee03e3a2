"""The README's Rerankers block, command by command, through the real CLI: the names become a
tiny untied Qwen3-Reranker-shaped model, a tiny embedder and small group files, and the long
runs' sizes shrink (``--train_iters 2``, ``--global_batch_size 8``, ``--top_k 5``); the
parallel layout stays (2 processes, TP=2). The exports must be a ``Qwen3ForCausalLM`` and a
``Qwen3ForSequenceClassification``, and the server must answer ``POST /v1/rerank``."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from test_serve import Server
from test_train import ROOT

SHRINK = {"--train_iters": "2", "--global_batch_size": "8", "--top_k": "5"}


def readme_block() -> list[str]:
    """The commands of the indented block under '## Rerankers' (continuations joined,
    comments dropped)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Rerankers"):]
    lines = []
    for line in section.splitlines()[1:]:
        if line.startswith("- "):
            break
        if line.startswith("    ") and not line.strip().startswith("#"):
            lines.append(line.strip())
    joined, current = [], ""
    for line in lines:
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            joined.append(re.sub(r"\s+#.*$", "", current.strip()))
            current = ""
    return joined


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    """README name -> a path here."""
    from megaemb.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("readme-rr")
    rows = [{"query": f"package for task {i}", "response": f"this package does task {i} well",
             "rejected_response": [f"an unrelated library number {i + j}" for j in range(2)]}
            for i in range(16)]
    for name, extra in (("groups.jsonl", {}), ("scored.jsonl", {"scores": [2.0, 0.5, -1.0]})):
        (root / name).write_text("".join(json.dumps({**r, **extra}) + "\n" for r in rows))
    out = {"Qwen3-Reranker-0.6B": make_tiny_checkpoint(str(root / "reranker"), seed=3, causal_lm=True),
           "Qwen3-Embedding-0.6B": make_tiny_checkpoint(str(root / "embedder"), seed=4),
           "groups.jsonl": str(root / "groups.jsonl"), "dev_groups.jsonl": str(root / "groups.jsonl"),
           "scored.jsonl": str(root / "scored.jsonl"), "beir_folder/": str(root / "groups.jsonl")}
    for d in ("rr/", "rr-seqcls/", "rr-distilled/", "rr-hf/", "rr-seqcls-hf/"):
        out[d] = str(root / d.rstrip("/"))
    return out


def _argv(command: str, names: dict) -> tuple[dict, list[str]]:
    words = shlex.split(command)
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "megaemb", command
    words = [names.get(w, w) for w in words[1:]]
    for flag, value in SHRINK.items():
        if flag in words:
            words[words.index(flag) + 1] = value
    return env, words


@pytest.mark.timeout(900)
def test_readme_reranker_commands_run(names):
    commands = readme_block()
    assert len(commands) == 7 and commands[-1].startswith("megaemb serve"), commands
    base = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "NPROC_PER_NODE"):
        base.pop(k, None)
    for command in commands[:-1]:
        env, argv = _argv(command, names)
        r = subprocess.run([sys.executable, "-m", "megaemb.cli", *argv], cwd=ROOT,
                           env={**base, **env}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-3000:])
        if argv[0] == "eval":
            assert re.search(r"^reranked\s", r.stdout, re.M) and re.search(r"^retriever\s", r.stdout, re.M), r.stdout
    for out, arch in (("rr-hf/", "Qwen3ForCausalLM"), ("rr-seqcls-hf/", "Qwen3ForSequenceClassification")):
        with open(os.path.join(names[out], "config.json")) as f:
            assert json.load(f)["architectures"] == [arch]
    for run, task in (("rr/", "generative_reranker"), ("rr-seqcls/", "reranker"),
                      ("rr-distilled/", "generative_reranker")):
        with open(os.path.join(names[run], "megaemb.json")) as f:
            assert json.load(f)["task"] == task
    _, argv = _argv(commands[-1], names)
    assert argv[:3] == ["serve", "--model", names["rr/"]]
    server = Server(names["rr/"], 1, "--max_length", "256")  # the template takes 72
    try:
        status, reply = server.post({"model": "tiny", "query": "package for task 1",
                                     "documents": ["an unrelated library", "this package does task 1 well"]},
                                    route="/v1/rerank")
    finally:
        server.stop()
    assert status == 200 and sorted(r["index"] for r in reply["results"]) == [0, 1], reply
    assert all(0 < r["relevance_score"] < 1 for r in reply["results"])
