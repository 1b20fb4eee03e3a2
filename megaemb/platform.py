"""The one place that knows whether we run on CUDA or on a CPU.

On a CUDA machine this module only picks ``nccl`` and the current CUDA device; it changes
nothing in torch or megatron-core. On a machine without CUDA, :func:`setup` applies a small
compatibility layer so that *unmodified* megatron-core models, schedules, DDP, optimizers and
dist-checkpointing run on CPU under ``gloo``. Each fix below names the failure it cures
(see ``shared/notes/megatron-core-0.16-without-cuda.md``); ``tests/test_platform.py`` turns
each one on and checks the symptom is gone, so an upgrade that breaks one fails loudly.

Fixes (CPU only):
  1. ``torch.cuda.current_device/Stream/current_stream/Event/synchronize/set_device/...``
     point at their ``torch.cpu`` equivalents or no-ops.
  2. A ``TorchFunctionMode`` maps ``device="cuda"`` arguments, ``Tensor.cuda()`` and
     ``.to("cuda")`` to CPU and drops ``pin_memory``.
  3. Inside that mode ``Tensor.type()`` reports CPU float tensors under the ``torch.cuda.*``
     name, which megatron's optimizers dispatch on.
  4. A CPU RNG tracker (named CPU generator states) replaces the CUDA one, and megatron's
     private CUDA RNG get/set helpers (used by activation recompute) use the CPU generator.
  5. megatron's ``jit_fuser`` (torch.compile; inductor on CPU is slow) is disabled.
  7. MoE ``alltoall`` dispatcher: split sizes become plain lists for ``all_to_all_single``.
Fixes 6 and 8 are not CPU specific and are applied on every machine without TE:
  6. ``moe_utils.te_general_gemm`` is unbound without Transformer Engine.
  8. Loading a distributed-optimizer checkpoint into torch's Adam (no apex/TE): the
     ``fully_reshardable`` loader copies every state key, torch's per-parameter ``step``
     included, which it never provides (``KeyError: 'step'``); and ``load_state_dict`` gives
     every parameter the *same* ``step`` tensor, which Adam then increments once per parameter
     per step (wrong bias correction after a resume). Keep the restored step; one tensor each.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings
import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE: TorchFunctionMode | None = None


def has_cuda() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    """Process-group backend: ``nccl`` with CUDA, ``gloo`` without."""
    return "nccl" if has_cuda() else "gloo"


def device() -> torch.device:
    """The device this rank computes on."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def has_apex() -> bool:
    return importlib.util.find_spec("apex") is not None


# Warnings megatron-core gives per rank on every command that say nothing to a megaemb user:
# "not installed, falling back" once per module when Transformer Engine or apex is missing
# (``fallback_note`` says that once per job instead), the deprecation of its own default
# ``cuda_graph_scope``, and torch's deprecation of a collective megatron calls
_MEGATRON_NOISE = (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                   r"full scope is deprecated", r"`torch.distributed.all_gather_into_tensor` is deprecated")


def quiet_megatron_warnings() -> None:
    """Silence ``_MEGATRON_NOISE`` in this process (call it before megatron is imported)."""
    for text in _MEGATRON_NOISE:
        warnings.filterwarnings("ignore", message=text)


def fallback_note() -> str | None:
    """One line for the job when a CUDA machine lacks Transformer Engine or apex (megatron-core
    then falls back to slower torch code); None on CPU, where neither can run and the
    fallbacks are the expected path, and when both are installed."""
    if not has_cuda():
        return None
    missing = [name for name, present in (("Transformer Engine", has_transformer_engine()),
                                          ("apex", has_apex())) if not present]
    if not missing:
        return None
    return (f"megaemb: note: {' and '.join(missing)} not installed: megatron-core uses torch's "
            "optimizers, norms and kernels instead (slower; NVIDIA's PyTorch image, or the [gpu] "
            "extra for Transformer Engine, brings them)")


def has_flex_attention() -> bool:
    """FlexAttention (torch >= 2.5) compiled for CUDA: the packed-batch kernel."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return has_cuda()


def default_bf16() -> bool:
    """``--bf16`` for training when not given: bf16 weights and activations on CUDA (fp32
    main params in the optimizer, fp32 pooling, similarities and loss), fp32 on CPU."""
    return has_cuda()


def default_overlap_grad_reduce(data_parallel_size: int) -> bool:
    """Overlap the data-parallel gradient all-reduce (DDP buckets) with the backward pass:
    on CUDA when there is more than one replica."""
    return has_cuda() and data_parallel_size > 1


def has_apex_wgrad_fusion() -> bool:
    """apex's ``fused_weight_gradient_mlp_cuda``: what megatron's own (non-TE) linears need for
    gradient-accumulation fusion (``megatron/core/tensor_parallel/layers.py`` 44-48, 924)."""
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def fusions(attention: str) -> dict:
    """megatron ``TransformerConfig`` fusion switches for this machine and layer spec
    (``attention``: the resolved backend). On CUDA: the bias-SwiGLU fusion (megatron's own,
    compiled by torch); gradient-accumulation fusion (weight gradients written straight into
    fp32 ``main_grad``) with the TE spec (TE's linears) or, for the SDPA / local specs, with
    apex's kernel installed; and whenever Transformer Engine imports, whatever the spec, its
    fused RoPE (``rope_utils.apply_rotary_pos_emb``: sbhd and thd), MoE token permutation
    (``moe_permute_fusion``) and top-k router (``moe_router_fusion``); grouped-GEMM MoE experts
    (``TEGroupedMLP``; the conversion table reads its names) with the TE spec. On CPU none:
    each would compile or need CUDA kernels."""
    cuda, te, te_spec = has_cuda(), has_transformer_engine(), attention == "te"
    return dict(bias_activation_fusion=cuda, apply_rope_fusion=cuda and te,
                gradient_accumulation_fusion=cuda and (te_spec or has_apex_wgrad_fusion()),
                moe_grouped_gemm=cuda and te_spec, moe_permute_fusion=cuda and te,
                moe_router_fusion=cuda and te)


def pinned(batch):
    """``batch`` (anything with ``pin_memory()``) in page-locked host memory on CUDA, so that
    its copy to the GPU (``non_blocking``) does not wait; unchanged on CPU."""
    return batch.pin_memory() if has_cuda() else batch


def exact_fp32_matmuls() -> None:
    """fp32 matmuls are IEEE fp32 on CUDA, not TF32: the pooled embeddings, similarities and
    loss are fp32, and TF32's 10-bit mantissa puts ~1e-2 into InfoNCE logits at a temperature
    of 0.05 (the bf16 model's matmuls are bf16 either way). NVIDIA's containers set
    ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``, which turns TF32 on whatever torch's flags say;
    torch reads it once, at the first fp32 cuBLAS matmul, so it is cleared here, before any."""
    os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "0"
    torch.set_float32_matmul_precision("highest")


# module -> its distribution's name (as in reports and in megatron-core's requirements)
_VERSIONED = {"megatron.core": "megatron-core", "transformer_engine": "transformer-engine",
              "flash_attn": "flash-attn", "apex": "apex", "triton": "triton"}
_REPORTED = False


def versions() -> dict[str, str | None]:
    """What the GPU paths run with: torch, its CUDA and cuDNN, megatron-core, Transformer
    Engine, flash-attn, apex, triton (None: not installed / no CUDA)."""
    import importlib

    cudnn = torch.backends.cudnn.version() if has_cuda() and torch.backends.cudnn.is_available() else None
    found = {"torch": torch.__version__, "cuda": torch.version.cuda if has_cuda() else None,
             "cudnn": str(cudnn) if cudnn else None}
    for module, name in _VERSIONED.items():
        try:
            found[name] = str(getattr(importlib.import_module(module), "__version__", "installed"))
        except Exception:
            found[name] = None
    return found


def version_problems(found: dict[str, str | None]) -> list[str]:
    """Installed versions outside the ranges megatron-core's package metadata declares (0.16.1:
    ``torch>=2.6.0``, ``transformer-engine>=2.9.0a0,<2.12.0``)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    try:
        declared = [Requirement(r) for r in requires("megatron-core") or []]
    except PackageNotFoundError:
        return []
    problems = []
    for req in declared:
        have = found.get(req.name)
        try:
            ok = have is None or req.specifier.contains(Version(have).base_version, prereleases=True)
        except InvalidVersion:
            ok = True
        if not ok:
            problems.append(f"{req.name} {have} is outside megatron-core {found['megatron-core']}'s "
                            f"range {req.specifier}")
    return problems


def report_versions() -> None:
    """Print the versions line (and any range problems) once per process; the caller picks
    the rank (global rank 0: once per job)."""
    global _REPORTED
    if _REPORTED:
        return
    _REPORTED = True
    found = versions()
    print("versions: " + ", ".join(f"{k} {v or 'none'}" for k, v in found.items()), flush=True)
    for problem in version_problems(found):
        print(f"warning: {problem}", flush=True)


def shm_problem(path: str = "/dev/shm", min_gib: float = 1.0) -> str | None:
    """Why NCCL will fail between the ranks of this node, if ``path`` is too small: Docker's
    default 64 MB ``/dev/shm`` makes NCCL die with "failed to extend /dev/shm/nccl-... No
    space left on device". None when it is large enough (or missing: then nothing to say)."""
    try:
        total = shutil.disk_usage(path).total
    except OSError:
        return None
    if total >= min_gib * 2**30:
        return None
    return (f"{path} holds only {total / 2**20:.0f} MB; NCCL needs more between the GPUs of a "
            "node: run the container with --ipc=host or --shm-size=16g (or set NCCL_SHM_DISABLE=1, "
            "slower)")


def default_packing() -> bool:
    """``--packing`` when not given: padding-free batches on CUDA (FlexAttention or TE's THD
    kernels skip other documents' blocks); on CPU batches stay padded (the exact packed path
    there runs one attention call per text)."""
    return has_cuda()


_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops() -> float | None:
    """Dense bf16 peak of this accelerator, for MFU; None where unknown (CPU)."""
    if not has_cuda():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), None)


def accelerator_rng_state():
    """The CUDA generator state (None on CPU, where the CPU generator is the only one)."""
    return torch.cuda.get_rng_state() if has_cuda() else None


def set_accelerator_rng_state(state) -> None:
    if state is not None and has_cuda():
        torch.cuda.set_rng_state(state)


def memory_stats() -> dict[str, float]:
    """Peak memory of this rank in GiB: accelerator memory on CUDA, resident set size on CPU."""
    if has_cuda():
        return {"mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    import resource

    return {"mem_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class _Stub:
    """Stands in for a CUDA stream or event on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):  # record, record_event, wait_stream, synchronize, ...
        return lambda *a, **k: _Stub()

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cuda_to_cpu(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, int) and not isinstance(value, bool):
        return "cpu"  # a bare CUDA ordinal, as from torch.cuda.current_device()
    return value


_CUDA_TYPE = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class CudaOnCpuMode(TorchFunctionMode):
    """Fixes 2 and 3: CUDA placements go to CPU; ``Tensor.type()`` answers with CUDA names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _cuda_to_cpu(kwargs["device"])
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _cuda_to_cpu(args[1]) if not isinstance(args[1], int) else args[1], *args[2:])
        return func(*args, **kwargs)


def _install_cuda_stubs() -> None:
    """Fix 1: the ``torch.cuda`` calls megatron-core makes outside device placement."""
    c = torch.cuda
    c.current_device = lambda: "cpu"
    c.set_device = lambda *a, **k: None
    c.synchronize = lambda *a, **k: None
    c.Stream = _Stub
    c.Event = _Stub
    c.ExternalStream = _Stub
    c.current_stream = lambda *a, **k: _Stub()
    c.default_stream = lambda *a, **k: _Stub()
    c.stream = lambda *a, **k: contextlib.nullcontext()
    c.empty_cache = lambda: None
    c.memory_allocated = lambda *a, **k: 0
    c.max_memory_allocated = lambda *a, **k: 0
    c.memory_reserved = lambda *a, **k: 0
    c.device_count = lambda: 0


def _install_rng_tracker() -> None:
    """Fix 4: a CPU RNG tracker with the contract of megatron's ``CudaRNGStatesTracker``."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    # The default-stream state stands for "the CUDA generator": on CPU it is the CPU generator,
    # whose state megatron's recompute already saves, so these are consistent no-ops/reads.
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)


def _disable_jit_fuser() -> None:
    """Fix 5: megatron's ``jit_fuser`` is torch.compile; on CPU inductor costs seconds per op."""
    from megatron.core import jit

    jit.disable_jit_fuser()


def _bind_te_general_gemm() -> None:
    """Fix 6: ``te_general_gemm`` is only bound when TE imports, but the router reads it."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _fix_reshardable_optimizer_load() -> None:
    """Fix 8: restoring distributed-optimizer state into torch's Adam."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer.load_state_dict, "_megaemb_fix", False):
        return
    set_states, load_state_dict = (DistributedOptimizer._set_main_param_and_optimizer_states,
                                   DistributedOptimizer.load_state_dict)

    def set_states_but_step(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
        if "step" in state and "step" not in tensors:  # keep the step load_state_dict restored
            tensors = {**tensors, "step": state["step"]}
        set_states(self, model_param, tensors)

    def load_with_own_steps(self, state_dict):
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():  # one shared tensor: Adam would add 1 per param
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    load_with_own_steps._megaemb_fix = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_but_step
    DistributedOptimizer.load_state_dict = load_with_own_steps


def _fix_alltoall_splits() -> None:
    """Fix 7: on CPU the alltoall dispatcher's split sizes stay tensors; make them lists."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def setup() -> None:
    """Make megatron-core usable on this machine. Idempotent; a no-op on CUDA with TE."""
    global _APPLIED, _MODE
    if _APPLIED:
        return
    _APPLIED = True
    if not has_transformer_engine():
        _bind_te_general_gemm()
        _fix_reshardable_optimizer_load()
    if has_cuda():
        exact_fp32_matmuls()
        return
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _install_cuda_stubs()
    _install_rng_tracker()
    _disable_jit_fuser()
    _fix_alltoall_splits()
    _MODE = CudaOnCpuMode()
    _MODE.__enter__()


def is_applied() -> bool:
    """Whether the CPU compatibility layer is active in this process."""
    return _MODE is not None
