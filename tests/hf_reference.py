"""Independent reference: transformers' Qwen3Model / Qwen3MoeModel + last-token pooling."""
import torch
import torch.nn.functional as F

PAD = 151643  # <|endoftext|>: Qwen3's end and pad token


def random_batch(seed: int = 0, n: int = 6, max_len: int = 13, vocab: int = 151669):
    """Right-padded ids with varied lengths (one full-length row, one of length 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g)
    lengths[0], lengths[1] = max_len, 1
    ids = torch.randint(0, vocab, (n, max_len), generator=g)
    ids[torch.arange(max_len)[None] >= lengths[:, None]] = PAD
    return ids, lengths


def token_lists(ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Right-padded ``[n, s]`` -> the ``n`` unpadded token-id lists."""
    return [ids[i, :lengths[i]].tolist() for i in range(len(ids))]


@torch.no_grad()
def hf_embeddings(model_dir: str, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return F.normalize(hidden[torch.arange(ids.shape[0]), lengths - 1], dim=-1)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"cos_min": F.cosine_similarity(a, b, dim=-1).min().item(),
            "max_abs": (a - b).abs().max().item()}


def assert_same_weights(hf_dir: str, other_dir: str) -> None:
    """Both HF folders' ``model.safetensors`` hold the same tensor names, bit for bit."""
    import os

    from safetensors.torch import load_file

    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = load_file(os.path.join(other_dir, "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert torch.equal(tensor, exported[key]), key
