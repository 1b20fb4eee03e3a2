"""Qwen3 embedding model on megatron-core.

``platform.setup()`` runs before any megatron layer module is imported: megatron decorates
functions with its ``jit_fuser`` at import time, so the CPU layer must be in place first.
"""
from megaemb import platform

platform.setup()
