import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


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
