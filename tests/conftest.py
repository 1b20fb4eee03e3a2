import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Training runs of the tests keep their token stores in a temporary folder, not ~/.cache
    (child processes inherit the variable)."""
    before = os.environ.get("MEGAEMB_CACHE")
    os.environ["MEGAEMB_CACHE"] = str(tmp_path_factory.mktemp("token_cache"))
    yield os.environ["MEGAEMB_CACHE"]
    if before is None:
        os.environ.pop("MEGAEMB_CACHE")
    else:
        os.environ["MEGAEMB_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random HF checkpoints: dense untied, dense tied, MoE."""
    from megaemb.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {
        "dense": make_tiny_checkpoint(str(root / "dense"), seed=1),
        "tied": make_tiny_checkpoint(str(root / "tied"), seed=2, tied=True),
        "moe": make_tiny_checkpoint(str(root / "moe"), seed=3, moe=True),
    }
