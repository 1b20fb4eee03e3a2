"""What the shipped files claim about themselves is true.

- Layouts: every comment in ``launch/*`` and ``configs/*.yaml`` that states a layout
  (``2 nodes x 8 GPUs (TP=4 with SP, DP=4)``, ``2 processes (TP=2, DP=1)``) states what its
  config (plus the parallel flags of its example) gives on that many processes, and that
  layout is one megatron-core and the batch sizes accept.
- The Dockerfile pins the versions this test suite runs with, for every dependency of
  ``pyproject.toml`` the image does not bring itself.
"""
import glob
import os
import re
from importlib.metadata import version

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIM_FILES = sorted(glob.glob(os.path.join(ROOT, "launch", "*")) + glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
PARALLEL_FLAG = re.compile(r"--(tensor|pipeline|expert)_model_parallel_size\s+(\d+)|--sequence_parallel\s+(\w+)")
# the NVIDIA PyTorch image's own packages (docker/Dockerfile installs around them)
IMAGE_OWN = {"torch", "numpy", "pyarrow"}


def _blocks(path: str) -> list[str]:
    """The file's comment paragraphs (consecutive ``#`` lines), each one string."""
    blocks, current = [], []
    for line in open(path).read().splitlines() + [""]:
        text = line.strip()
        if text.startswith("#") and text.strip("# "):
            current.append(text.lstrip("#").strip())
        elif current:
            blocks.append(" ".join(current))
            current = []
    return blocks


def layout_claims(path: str) -> list[tuple[str, int, str, dict]]:
    """``(claim, processes, config path, claimed sizes)`` for each paragraph stating a layout;
    a config file's own paragraphs refer to itself."""
    claims = []
    for block in _blocks(path):
        sizes = {k: int(v) for k, v in re.findall(r"\b(TP|PP|EP|DP)=(\d+)", block)}
        if not sizes:
            continue
        nodes = re.search(r"(\d+) nodes? x (\d+) GPUs", block)
        procs = re.search(r"(\d+) processes", block)
        world = int(nodes[1]) * int(nodes[2]) if nodes else int(procs[1]) if procs else None
        assert world, f"{path}: a layout without a process count: {block!r}"
        config = re.search(r"configs/[\w.-]+\.yaml", block)
        config = os.path.join(ROOT, config[0]) if config else path
        assert config.endswith(".yaml"), f"{path}: a layout without a config: {block!r}"
        sizes["SP"] = bool(re.search(r"with SP|sequence parallel on", block))
        claims.append((block, world, config, sizes))
    return claims


def actual_layout(config: str, block: str, world: int) -> dict:
    """The sizes the config (and the parallel flags in ``block``) give on ``world`` processes,
    after the checks megaemb runs before any rank starts."""
    from megaemb.cli import build_parser, sft_config

    flags = []
    for m in PARALLEL_FLAG.finditer(block):
        flags += m[0].split()
    cfg = sft_config(build_parser().parse_args(["sft", "--config", config, "--model", "m",
                                                "--dataset", "d.jsonl", *flags]))
    parallel = cfg.parallel()
    parallel.check_world_size(world)
    dp = world // parallel.model_parallel_size
    cfg.check_batch(dp)
    return {"TP": parallel.tensor_model_parallel_size, "PP": parallel.pipeline_model_parallel_size,
            "EP": parallel.expert_model_parallel_size, "DP": dp, "SP": parallel.sequence_parallel}


def test_every_job_script_example_states_a_layout():
    claimed = {os.path.basename(p) for p in CLAIM_FILES if layout_claims(p)}
    assert {"torchrun.sh", "dlc.sh", "slurm.sbatch", "qwen3-embedding-8B.yaml",
            "qwen3-moe-embedder.yaml"} <= claimed, claimed


@pytest.mark.parametrize("path", CLAIM_FILES, ids=os.path.basename)
def test_layout_claims_match_the_configs(path):
    for block, world, config, sizes in layout_claims(path):
        actual = actual_layout(config, block, world)
        wrong = {k: (v, actual[k]) for k, v in sizes.items() if actual[k] != v}
        assert not wrong, f"{os.path.relpath(path, ROOT)}: {block!r} claims (claimed, actual) {wrong}"


def test_claim_parser_catches_a_wrong_layout(tmp_path):
    """The 8B example as it read before: TP=2, DP=8 against a TP=4 config."""
    script = tmp_path / "job.sh"
    script.write_text("# Qwen3-Embedding-8B on 2 nodes x 8 GPUs (TP=2 with SP, DP=8):\n"
                      "#   bash launch/torchrun.sh sft --config configs/qwen3-embedding-8B.yaml\n")
    [(block, world, config, sizes)] = layout_claims(str(script))
    assert (world, sizes) == (16, {"TP": 2, "DP": 8, "SP": True})
    assert actual_layout(config, block, world) == {"TP": 4, "PP": 1, "EP": 1, "DP": 4, "SP": True}


def _dockerfile_pins() -> dict[str, str]:
    text = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    return {name.lower(): ver for name, ver in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.]+)", text)}


def test_dockerfile_pins_the_tested_versions():
    pins = _dockerfile_pins()
    stale = {name: (ver, version(name)) for name, ver in pins.items() if version(name) != ver}
    assert stale == {}, "(pinned, tested) versions differ"
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    needed = {re.match(r"[A-Za-z][\w.-]*", dep)[0].lower() for dep in project["dependencies"]}
    assert needed - IMAGE_OWN - set(pins) == set(), "pyproject dependencies the Dockerfile does not pin"
