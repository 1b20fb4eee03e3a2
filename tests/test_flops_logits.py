"""The vocabulary logits megaemb's reranker head does not build, at Qwen3-Reranker shapes."""
import pytest

from megaemb.model.flops import vocab_logits_bytes
from megaemb.shape import Qwen3Shape
from megaemb.tiny import QWEN3_VOCAB

COMMON = dict(model_type="qwen3", vocab_size=QWEN3_VOCAB, num_key_value_heads=8, head_dim=128)
RERANKERS = {  # Qwen3-Reranker config.json fields that matter here
    "0.6B": dict(COMMON, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                 intermediate_size=3072, tie_word_embeddings=True),
    "8B": dict(COMMON, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
               intermediate_size=12288, tie_word_embeddings=False),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", RERANKERS)
def test_vocab_logits_at_reranker_shapes(size):
    shape = Qwen3Shape.from_hf(RERANKERS[size])
    assert shape.padded_vocab_size == 151680
    # ms-swift's Megatron reranker example: micro-batch 16 x 4,096 tokens, TP=2
    tokens = 16 * 4096
    assert vocab_logits_bytes(shape, tokens, tensor_parallel=2) == tokens * 75840 * 2  # 9.94 GB bf16
    assert vocab_logits_bytes(shape, tokens, 2, bytes_per_value=4) == 19_881_000_960  # 19.9 GB fp32
    # one 8,192-token pair on one GPU: 2.49 GB of bf16 logits where 2 numbers are used
    assert vocab_logits_bytes(shape, 8192) == 2_485_125_120


@pytest.mark.timeout(30)
def test_reranker_head_flops_are_counted():
    """A reranker step's model FLOPs (the MFU's): the backbone's plus the head's 2 rows,
    2 * 2h forward per pair, x3 with backward; by hand at Qwen3-Reranker-0.6B."""
    from megaemb import tasks
    from megaemb.model.flops import matmul_params_per_token, train_flops

    shape = Qwen3Shape.from_hf(RERANKERS["0.6B"])
    # q 1024x2048, k and v 1024x1024, o 2048x1024; MLP 3 x 1024x3072; 28 layers
    assert matmul_params_per_token(shape) == 28 * (2 * 1024 * 2048 + 2 * 1024 * 1024 + 3 * 1024 * 3072)
    lengths = [512, 300, 77]
    backbone = 6 * 440_401_920 * sum(lengths) + 6 * 28 * 16 * 128 * sum(n * n for n in lengths)
    assert train_flops(shape, lengths) == backbone
    rows = tasks.GENERATIVE_RERANKER.head_rows
    assert rows == 2 and tasks.EMBEDDING.head_rows == 0
    assert train_flops(shape, lengths, rows) == backbone + 3 * (2 * 2 * 1024) * len(lengths)
