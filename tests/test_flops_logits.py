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
