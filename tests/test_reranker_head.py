"""YesNoHead under a real gloo TP=2 group vs plain PyTorch full-vocabulary logits (TP=1).

One 2-process group runs every check (starting ranks costs seconds each): padded, packed and
sequence-parallel hidden states; the output layer untied (column-parallel ``output_layer``) or
tied (the vocab-parallel word embedding); "yes" and "no" rows on one rank or on two.
"""
import pytest
import torch

from distributed import run_distributed

VOCAB, HIDDEN, TP = 1000, 64, 2  # padded to 1024: rows 0..511 on rank 0, 512..1023 on rank 1
PAIRS = {"split": (700, 100), "rank0": (9, 300), "rank1": (600, 1000 - 1)}
LAYOUTS = ("padded", "packed", "padded-sp", "packed-sp")
TOL = 1e-5


def _shape():
    from megaemb.shape import Qwen3Shape
    from megaemb.tiny import tiny_config

    return Qwen3Shape.from_hf(tiny_config(vocab_size=VOCAB, hidden_size=HIDDEN).to_dict())


def _weight_module(kind, config, shape):
    """The real megatron module holding ``W`` for ``kind``: untied output layer or tied embedding."""
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

    from megaemb.model.heads import output_layer

    if kind == "untied":
        return output_layer(config, shape)
    return LanguageModelEmbedding(config=config, vocab_size=shape.padded_vocab_size,
                                  max_sequence_length=64,
                                  position_embedding_type="rope").word_embeddings


def _batch(layout):
    from megaemb.data.batching import text_batch

    g = torch.Generator().manual_seed(3)
    lengths = [7, 1, 12, 4, 9]
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    return text_batch(seqs, pad_id=0, packed=layout.startswith("packed"), multiple=TP)


def _reference(hidden, weight, pool_index, yes, no, coef):
    """Plain PyTorch: full logits ``[s*b, V]``, then ``l_yes - l_no`` at the last tokens."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    scores = logits[pool_index, yes] - logits[pool_index, no]
    (scores * coef).sum().backward()
    return scores.detach(), weight.grad, hidden.grad


def _largest_forward_dim(fn) -> int:
    """The largest dimension of any tensor an op creates while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    largest = [0]

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.ndim:
                    largest[0] = max(largest[0], max(t.shape))
            return out

    with Record():
        fn()
    return largest[0]


def _head_group(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megaemb.config import ParallelConfig
    from megaemb.model.heads import YesNoHead
    from megaemb.model.qwen3 import transformer_config
    from megaemb.parallel import init_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=TP)
    init_parallel(parallel)
    shape = _shape()
    config = transformer_config(shape, parallel)
    g = torch.Generator().manual_seed(0)
    full_w = torch.randn(shape.padded_vocab_size, HIDDEN, generator=g)
    per = shape.padded_vocab_size // TP
    tp_group = parallel_state.get_tensor_model_parallel_group()
    results = {}
    for kind in ("untied", "tied"):
        weight = _weight_module(kind, config, shape).weight
        assert tuple(weight.shape) == (per, HIDDEN)
        with torch.no_grad():
            weight.copy_(full_w[rank * per:(rank + 1) * per])
        for layout in LAYOUTS:
            batch = _batch(layout)
            sp = layout.endswith("-sp")
            s, b = batch.input_ids.shape[1], batch.input_ids.shape[0]
            full_h = torch.randn(s, b, HIDDEN, generator=g)
            coef = torch.randn(batch.num_texts, generator=g)
            for pair, (yes, no) in PAIRS.items():
                head = YesNoHead(yes, no, vocab_size=VOCAB, sequence_parallel=sp)
                leaf = full_h.clone().requires_grad_()
                hidden = leaf.chunk(TP, dim=0)[rank] if sp else leaf
                weight.grad = None
                scores = head(hidden, batch.pool_index, weight)
                (scores * coef).sum().backward()
                ref_scores, ref_wgrad, ref_hgrad = _reference(full_h, full_w, batch.pool_index,
                                                              yes, no, coef)
                assert weight.grad.is_sparse  # two rows, never a dense [V/tp, h] gradient
                grad_w = weight.grad.to_dense()
                shards = [torch.empty_like(grad_w) for _ in range(TP)]
                dist.all_gather(shards, grad_w, group=tp_group)
                if sp:  # each rank gets the gradient of the positions it holds, zero elsewhere
                    mine = torch.zeros_like(ref_hgrad)
                    mine.chunk(TP, dim=0)[rank].copy_(ref_hgrad.chunk(TP, dim=0)[rank])
                    ref_hgrad = mine
                results[f"{kind}/{layout}/{pair}"] = {
                    "score": (scores - ref_scores).abs().max().item(),
                    "grad_w": (torch.cat(shards) - ref_wgrad).abs().max().item(),
                    "grad_hidden": (leaf.grad - ref_hgrad).abs().max().item(),
                    "score_scale": ref_scores.abs().max().item(),
                }
    batch = _batch("packed-sp")
    head = YesNoHead(*PAIRS["split"], vocab_size=VOCAB, sequence_parallel=True)
    hidden = torch.randn(batch.input_ids.shape[1] // TP, 1, HIDDEN)
    results["largest_dim"] = _largest_forward_dim(lambda: head(hidden, batch.pool_index, weight))
    results["vocab_per_rank"] = per
    return results


@pytest.fixture(scope="module")
def head_results():
    return run_distributed(_head_group, TP, timeout=300)


@pytest.mark.timeout(360)
@pytest.mark.parametrize("label", [f"{k}/{l}/{p}" for k in ("untied", "tied") for l in LAYOUTS
                                   for p in PAIRS])
def test_yes_no_head_matches_full_logits(head_results, label):
    for rank, res in enumerate(head_results):
        r = res[label]
        assert r["score_scale"] > 1, (rank, label, r)  # the scores are not trivially zero
        assert r["score"] < TOL and r["grad_w"] < TOL and r["grad_hidden"] < TOL, (rank, label, r)


@pytest.mark.timeout(360)
def test_yes_no_head_builds_no_vocabulary_logits(head_results):
    for res in head_results:
        assert res["largest_dim"] < res["vocab_per_rank"], res


@pytest.mark.timeout(30)
@pytest.mark.parametrize("yes,no,message", [(1000, 2, "'yes' token id 1000 is outside"),
                                            (5, -1, "'no' token id -1 is outside"),
                                            (7, 7, "both 7")])
def test_yes_no_head_rejects_bad_token_ids(yes, no, message):
    from megaemb.model.heads import YesNoHead

    with pytest.raises(ValueError, match=message):
        YesNoHead(yes, no, vocab_size=VOCAB)
