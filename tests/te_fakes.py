"""A CPU stand-in for Transformer Engine's layer spec, to test spec independence without TE.

``install()`` puts :class:`FakeTESpecProvider` and a fake ``TENorm`` into
``megatron.core.models.gpt.gpt_layer_specs`` (where megatron binds them only when TE imports)
and makes ``platform.has_transformer_engine()`` answer True, so that ``block_spec(config,
"te")`` (and ``"auto"``) runs megatron's REAL ``get_gpt_decoder_block_spec(...,
use_transformer_engine=True)``: megatron decides which norms are fused or ``IdentityOp``,
that MoE layers keep ``pre_mlp_layernorm``, the experts' module (``SequentialMLP`` with the
provider's column/row linears, as TE >= 1.7 gives without grouped GEMM) and the layers'
``sharded_state_dict_keys_map``. The fakes below only supply modules with TE's parameter names
and the TE behaviour that matters to conversion and checkpoints:

* ``FakeTELayerNormColumnParallelLinear``: RMSNorm (weight ``layer_norm_weight``, eps =
  ``config.layernorm_epsilon``, marked ``sequence_parallel`` as TE does) then the
  column-parallel matmul; rejects experts like TE. With ``return_layernorm_output`` it returns
  the norm's output as megatron's wrapper passes TE's on: ``((out, ln_out), None)`` (TE v2.11
  ``module/layernorm_linear.py`` L1599-1611; megatron-core 0.16.1
  ``extensions/transformer_engine.py`` ``TELayerNormColumnParallelLinear.forward``), the
  gradient of ``ln_out`` flowing into the norm (L964-965). ``return_layernorm_output_gathered``
  is not faked: megaemb does not use it (see ``megaemb/model/lora.py``).
* the fake linears keep megatron's TE-wrapper attributes, not megatron's local ones: the group
  in ``_tp_group``, no ``is_expert``, and TE's ``sequence_parallel = tp_size > 1 and
  config.sequence_parallel`` with TP size 1 for experts under megatron's explicit expert
  communication (``TELinear.__init__``; TE ``layernorm_linear.py`` L1209).
* ``FakeTEGroupedLinear`` (with ``moe_grouped_gemm``; megatron's REAL ``TEGroupedMLP`` holds
  them): TE ``GroupedLinear``'s ``weight{i}`` per local expert, ``forward(x, m_splits)``, and
  megatron's ``TEGroupedLinear._sharded_state_dict_grouped`` keys (those of SequentialMLP).
* all fake linears and the fake core attention save a non-empty ``_extra_state`` and, like TE
  (unlike megatron's local linears), do not fill in a missing one on ``load_state_dict``.
* ``FakeTERowParallelLinear`` for experts under expert/tensor parallelism records
  ``partition_dim = 0`` on its weight although it is split on dim 1 (TE builds its expert linears
  with ``parallel_mode=None`` and then labels the weight with dim 0).
* the fakes refuse to be built on the ``meta`` device, standing for TE modules that cannot be
  (megaemb's export builds a weightless model there).

Must run after ``platform.setup()`` (which binds ``te_general_gemm`` only when TE is absent);
``install`` calls it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megaemb import platform
from megaemb.model.attention import SDPAAttention
from megaemb.model.norm import HeadRMSNorm, RMSNorm

EXTRA_STATE = b"fake TE fp8 metadata"


def _refuse_meta():
    if torch.empty(0).device.type == "meta":
        raise RuntimeError("fake TE: Transformer Engine modules cannot be built on the meta device")


class _TEExtraState:
    """TE modules' ``_extra_state``: always saved, never defaulted when missing on load."""

    def get_extra_state(self):
        return torch.frombuffer(bytearray(EXTRA_STATE), dtype=torch.uint8)

    def set_extra_state(self, state):
        self.loaded_extra_state = state

    def _drop_default_extra_state_hook(self):
        # megatron's local linears register a pre-hook that fills in a missing _extra_state;
        # TE's modules have none, so a strict load without it fails there.
        self._load_state_dict_pre_hooks.clear()


def _te_wrapper_attributes(module, config, is_expert: bool) -> None:
    """What megatron's TE wrappers expose instead of the local linears' attributes
    (megatron-core 0.16.1 ``extensions/transformer_engine.py`` ``TELinear.__init__``,
    ``TELayerNormColumnParallelLinear.__init__``): ``_tp_group`` (megatron's group), no
    ``is_expert``, and TE's ``sequence_parallel`` (TE ``layernorm_linear.py`` L1209, TE TP size
    1 for experts under explicit expert communication)."""
    module._tp_group = module.tp_group
    explicit_expert_comm = is_expert and (module.tp_group.size() > 1 or config.expert_model_parallel_size > 1)
    te_tp_size = 1 if explicit_expert_comm else module.tp_group.size()
    module.sequence_parallel = te_tp_size > 1 and config.sequence_parallel
    module.te_return_bias = module.skip_bias_add and module.bias is not None
    del module.is_expert


class FakeTEColumnParallelLinear(_TEExtraState, ColumnParallelLinear):
    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias,
                 skip_bias_add, is_expert, skip_weight_param_allocation=False,
                 tp_comm_buffer_name=None, tp_group=None, stride=1):
        _refuse_meta()
        if gather_output:
            raise ValueError("Transformer Engine linear layers do not support gather_output = True")
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         gather_output=False, stride=stride, skip_bias_add=skip_bias_add,
                         skip_weight_param_allocation=skip_weight_param_allocation,
                         is_expert=is_expert, tp_group=tp_group)
        self._drop_default_extra_state_hook()
        _te_wrapper_attributes(self, config, is_expert)


class FakeTELayerNormColumnParallelLinear(FakeTEColumnParallelLinear):
    """TE's ``LayerNormLinear``: the previous norm lives here as ``layer_norm_weight``."""

    def __init__(self, input_size, output_size, *, config, is_expert, **kw):
        if is_expert:
            raise ValueError("Transformer Engine linear layers do not yet support MoE")
        super().__init__(input_size, output_size, config=config, is_expert=False, **kw)
        self.layer_norm_weight = torch.nn.Parameter(
            torch.ones(input_size, dtype=config.params_dtype, device=platform.device()))
        self.layer_norm_weight.sequence_parallel = config.sequence_parallel
        self.eps = config.layernorm_epsilon
        self.return_layernorm_output = False  # megatron builds it so (LoRA turns it on)

    def forward(self, x):
        # norm on this rank's tokens ([s/tp, b, h] under sequence parallel), then gather + matmul
        ln_out = F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
        out, bias = super().forward(ln_out)
        if not self.return_layernorm_output:
            return out, bias
        return (out, bias, ln_out) if self.te_return_bias else ((out, ln_out), None)


class FakeTERowParallelLinear(_TEExtraState, RowParallelLinear):
    def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel,
                 skip_bias_add, is_expert, tp_comm_buffer_name=None, tp_group=None):
        _refuse_meta()
        if not input_is_parallel:
            raise ValueError("Transformer Engine linear layers do not support input_is_parallel = False")
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         input_is_parallel=True, skip_bias_add=skip_bias_add, is_expert=is_expert,
                         tp_group=tp_group)
        self._drop_default_extra_state_hook()
        if is_expert and (self.tp_group.size() > 1 or config.expert_model_parallel_size > 1):
            # TE's explicit expert communication: parallel_mode None -> attribute says dim 0
            self.weight.partition_dim = 0
        _te_wrapper_attributes(self, config, is_expert)


class FakeTEGroupedLinear(_TEExtraState, torch.nn.Module):
    """megatron's ``TEGroupedLinear`` over TE's ``GroupedLinear`` (one GEMM per local expert,
    weights ``weight{i}``), for experts only; TE's TP communication is off under explicit
    expert communication, so the math is local (megatron-core 0.16.1
    ``extensions/transformer_engine.py`` ``TEGroupedLinear``)."""

    tp_axis = 0  # column: weights split on dim 0 (rows: dim 1)
    parallel_mode = "column"

    def __init__(self, num_gemms, input_size, output_size, *, config, init_method, bias,
                 skip_bias_add, is_expert, tp_comm_buffer_name=None, pg_collection=None):
        _refuse_meta()
        super().__init__()
        assert is_expert, "TEGroupedLinear only supports expert parallelism"
        self._pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self._tp_group = self._pg_collection.expt_tp
        tp_size = self._tp_group.size()
        if tp_size > 1 or config.expert_model_parallel_size > 1:  # explicit expert communication
            if self.parallel_mode == "column":
                output_size //= tp_size
            else:
                input_size //= tp_size
        self.num_gemms, self.use_bias, self.te_return_bias = num_gemms, bias, skip_bias_add and bias
        for i in range(num_gemms):
            weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype,
                                                    device=platform.device()))
            init_method(weight)
            weight.allreduce = not config.expert_model_parallel_size > 1
            self.register_parameter(f"weight{i}", weight)
        if bias:
            raise NotImplementedError("Qwen3 experts have no bias")

    def forward(self, x, m_splits):
        chunks = torch.split(x, m_splits)
        out = torch.cat([F.linear(c, getattr(self, f"weight{i}")) for i, c in enumerate(chunks)])
        return out, None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """``TEGroupedLinear._sharded_state_dict_grouped`` (without FP8, whose extra state
        TE splits per GEMM: ``[state] * num_gemms``): the keys of SequentialMLP's experts."""
        full = self.state_dict(prefix="", keep_vars=True)
        ep = self._pg_collection.ep
        num_global, offset, ep_axis = ep.size() * self.num_gemms, ep.rank() * self.num_gemms, len(sharded_offsets)
        out = {}
        for i in range(self.num_gemms):
            state = {f"{i}.weight": full[f"weight{i}"], f"{i}._extra_state": full["_extra_state"]}
            sub = make_sharded_tensors_for_checkpoint(
                state, "", {f"{i}.weight": self.tp_axis},
                (*sharded_offsets, (ep_axis, offset + i, num_global)),
                tp_group=self._tp_group, dp_cp_group=metadata["dp_cp_group"])
            replace_prefix_for_sharding(sub, f"{i}.", prefix)
            out[f"{prefix}weight{i}"] = sub[f"{i}.weight"]
            out[f"{prefix}_extra_state{'' if i == 0 else i}"] = sub[f"{i}._extra_state"]
        for sh_ten in out.values():  # replication along DP modulo EP
            sh_ten.replica_id = (*sh_ten.replica_id[:2], self._pg_collection.expt_dp.rank())
        return out


class FakeTERowParallelGroupedLinear(FakeTEGroupedLinear):
    tp_axis = 1
    parallel_mode = "row"


class FakeTEDotProductAttention(_TEExtraState, SDPAAttention):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type="p2p",
                 pg_collection=None):
        _refuse_meta()
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)


class FakeTENorm(RMSNorm):
    """``TENorm`` for ``normalization="RMSNorm"``."""

    def __init__(self, config, hidden_size, eps=1e-5):
        _refuse_meta()
        super().__init__(config, hidden_size, eps)


class FakeTESpecProvider(BackendSpecProvider):
    """Mirrors ``megatron.core.extensions.transformer_engine_spec_provider.TESpecProvider``
    (TE >= 1.9, no kitchen)."""

    def linear(self):
        raise NotImplementedError("TELinear is only used by MLA, which Qwen3 does not have")

    def column_parallel_linear(self):
        return FakeTEColumnParallelLinear

    def row_parallel_linear(self):
        return FakeTERowParallelLinear

    def fuse_layernorm_and_linear(self):
        return True

    def column_parallel_layer_norm_linear(self):
        return FakeTELayerNormColumnParallelLinear

    def layer_norm(self, rms_norm=False, for_qk=False):
        # TE returns TENorm for q/k norms as well (TE >= 1.9); megaemb's HeadRMSNorm is the
        # same RMSNorm over head_dim (it only differs in not marking sequence_parallel)
        return HeadRMSNorm if for_qk else FakeTENorm

    def core_attention(self):
        return FakeTEDotProductAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm):
        if moe_use_grouped_gemm and not moe_use_legacy_grouped_gemm:  # CUDA + TE: platform.fusions
            return TEGroupedMLP, MLPSubmodules(linear_fc1=FakeTEGroupedLinear,
                                               linear_fc2=FakeTERowParallelGroupedLinear)
        return SequentialMLP, MLPSubmodules(linear_fc1=FakeTEColumnParallelLinear,
                                            linear_fc2=FakeTERowParallelLinear)

    def activation_func(self):
        return None  # TEActivationOp; unused unless config.use_te_activation_func


_ORIGINAL = {}


def install() -> None:
    """Make the TE spec buildable with the fakes in this process (idempotent)."""
    from megatron.core.models.gpt import gpt_layer_specs

    platform.setup()
    _ORIGINAL.setdefault("has_transformer_engine", platform.has_transformer_engine)
    gpt_layer_specs.TESpecProvider = FakeTESpecProvider
    gpt_layer_specs.TENorm = FakeTENorm
    platform.has_transformer_engine = lambda: True


def uninstall() -> None:
    """Back to this machine's truth: no TE."""
    from megatron.core.models.gpt import gpt_layer_specs

    for name in ("TESpecProvider", "TENorm"):
        if not gpt_layer_specs.HAVE_TE and hasattr(gpt_layer_specs, name):
            delattr(gpt_layer_specs, name)
    if "has_transformer_engine" in _ORIGINAL:
        platform.has_transformer_engine = _ORIGINAL["has_transformer_engine"]
