"""``with_alp(layer_spec, cfg)``: any TransformerLayer spec -> an ALP layer with a ``perturbation`` slot.

Megatron is extended only through its ``ModuleSpec`` machinery (the precedent is
megatron-core's ``HyperConnectionTransformerLayer``: a ``TransformerLayer`` subclass that
adds spec slots and refuses specs it cannot handle). :func:`with_alp` returns a spec
whose module is ``ALP<Base>`` — a subclass of the spec's own layer class
(``TransformerLayer``, ``MoETransformerLayer``, a TE-spec layer ...) — and whose
submodules gain one slot, ``perturbation`` (a :class:`LayerPerturbation`).

Where the noise goes:

* ``placement="hidden"``: the layer's *input* hidden states, before anything of the
  layer runs (before ``input_layernorm``, or before the norm fused into TE's
  ``linear_qkv``), so the residual branch carries the perturbed tensor;
* ``placement="logits"``: only the last layer, on its *output*: the final hidden states
  that the final norm and the LM head turn into logits (the paper's logits-only
  ablation). A layer-spec hook reaches them on the pipeline stage that owns the last
  layer, with no change to GPTModel.

Each perturbed layer owns one fp32 scalar, ``perturbation.alp_log_sigma`` (a Parameter
when learnable, else a persistent buffer); layers outside the range own nothing and
run unchanged. The hook reads the noise coordinates from
:func:`~megatron_alp.perturbation.context.current_coords` and is the identity outside
:func:`~megatron_alp.perturbation.context.perturbed`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_alp.perturbation.config import ALPConfig
from megatron_alp.perturbation.context import current_coords
from megatron_alp.perturbation.function import NoiseSite, add_noise
from megatron_alp.perturbation.kernels import get_kernel

__all__ = [
    "ALP_PARAM_NAME",
    "ALPLayerMixin",
    "ALPTransformerLayer",
    "ALPTransformerLayerSubmodules",
    "LayerPerturbation",
    "is_alp_param",
    "with_alp",
]

ALP_PARAM_NAME = "alp_log_sigma"


def is_alp_param(name: str) -> bool:
    """The one rule that recognises ALP state by name (drop it from every export).

    True for ``...perturbation.alp_log_sigma`` in any naming (Megatron, DDP-wrapped,
    canonical, state-dict keys).
    """
    return name.rsplit(".", 1)[-1] == ALP_PARAM_NAME


@dataclasses.dataclass
class ALPTransformerLayerSubmodules(TransformerLayerSubmodules):
    """``TransformerLayerSubmodules`` plus the ``perturbation`` slot."""

    perturbation: ModuleSpec | type = IdentityOp


def _group_rank_size(group: Any) -> tuple[int, int]:
    if group is None or not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


class LayerPerturbation(torch.nn.Module):
    """The ``perturbation`` submodule: sigma of one layer and the hook that applies it."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        alp_config: ALPConfig,
        pg_collection: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        alp_config.validate_for_model(config.num_layers)
        self.alp_config = alp_config
        self.placement = alp_config.placement
        self.layer_number = int(layer_number)  # global, 1-based (Megatron's)
        self.active = alp_config.perturbs_layer(self.layer_number - 1, config.num_layers)
        self.sequence_parallel = bool(config.sequence_parallel)
        self._tp_group = getattr(pg_collection, "tp", None)  # replica ids in sharded_state_dict
        self.tp_rank, self.tp_size = _group_rank_size(getattr(pg_collection, "tp", None))
        self.cp_rank, self.cp_size = _group_rank_size(getattr(pg_collection, "cp", None))
        # Token positions of this rank's slice come from these groups: refuse to guess.
        for name, size, want in (
            ("tp", self.tp_size, config.tensor_model_parallel_size if self.sequence_parallel else self.tp_size),
            ("cp", self.cp_size, config.context_parallel_size),
        ):
            if size != want:
                raise ValueError(
                    f"ALP layer {self.layer_number}: the layer's {name} process group has {size} "
                    f"rank(s) but TransformerConfig expects {want}; build the layer with the "
                    "model's pg_collection"
                )
        if not self.active:
            return
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        init = torch.tensor(math.log(alp_config.init_std), dtype=torch.float32, device=device)
        if alp_config.learnable:
            param = torch.nn.Parameter(init)
            # Under SP each TP rank sees a slice of the sequence, so this grad is a partial
            # sum: finalize_model_grads all-reduces params tagged like this over TP.
            setattr(param, "sequence_parallel", self.sequence_parallel)
            self.register_parameter(ALP_PARAM_NAME, param)
        else:
            self.register_buffer(ALP_PARAM_NAME, init, persistent=True)

    @property
    def log_sigma(self) -> torch.Tensor | None:
        """The fp32 ``log_sigma`` scalar (None on a layer outside the range)."""
        return getattr(self, ALP_PARAM_NAME, None)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # sigma stays fp32, value and all, when the model is cast to half precision
        # (Float16Module does model.bfloat16()): casting back after the cast would keep
        # the bf16-rounded value (sigma_0 = 0.02 -> 0.020116), so the fp32 value from
        # before the cast is moved to the new device instead. `.data` is an alias that
        # keeps the old storage whether the cast assigns `.data` or swaps tensors.
        t = self.log_sigma
        before = None if t is None else t.data
        out = super()._apply(fn, recurse)
        t = self.log_sigma
        if t is not None and before is not None and t.dtype in (torch.float16, torch.bfloat16):
            t.data = before.to(device=t.device, dtype=torch.float32)
        return out

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """sigma as its own one-element tensor per layer, never stacked over layers.

        ``TransformerBlock.sharded_state_dict`` stacks each per-layer tensor into one
        ``(num_layers, ...)`` tensor through the ``(0, layer, num_layers)`` offset in
        ``sharded_offsets``; a checkpoint must cover such a tensor completely. sigma lives
        on the perturbed layers only (a partial range, ``placement="logits"``), so a
        stacked sigma would have holes: megatron-core refuses it ("Invalid sharding
        pattern"), and so would every optimizer state derived from it. Each layer's sigma
        is therefore a ``(1,)`` tensor of its own, keyed by its global 0-based layer
        (``...perturbation.layer_{l}.alp_log_sigma``, still matched by
        :func:`is_alp_param`): owned by the one pipeline stage holding the layer,
        replicated over TP and DP (replica ids as megatron-core's), loadable under any
        layout. Layers outside the range contribute nothing.
        """
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        t = self.log_sigma
        if t is None:
            return {}
        metadata = metadata or {}
        dp_cp_group = metadata.get("dp_cp_group")
        tp_group = self._tp_group
        if dp_cp_group is None or tp_group is None:
            from megatron.core import parallel_state as ps

            dp_cp_group = dp_cp_group or ps.get_data_parallel_group(with_context_parallel=True)
            tp_group = tp_group or ps.get_tensor_model_parallel_group()
        key = f"{prefix}layer_{self.layer_number - 1}.{ALP_PARAM_NAME}"
        return {
            f"{prefix}{ALP_PARAM_NAME}": make_sharded_tensor_for_checkpoint(
                t, key, prepend_offsets=((0, 0, 1),), tp_group=tp_group, dp_cp_group=dp_cp_group
            )
        }

    def forward(self, hidden_states: torch.Tensor, packed_seq_params: Any = None) -> torch.Tensor:
        if not self.active:
            return hidden_states
        coords = current_coords()
        if coords is None:
            return hidden_states
        if packed_seq_params is not None:
            raise ValueError(
                "ALP does not support packed sequences (packed_seq_params / THD format): token "
                "positions of packed rows are not known to the layer; use padded [b, s] batches"
            )
        s_local, batch, _ = hidden_states.shape
        site = NoiseSite(
            key=coords.key,
            step=coords.step,
            layer=self.layer_number,
            sample_offset=coords.sample_offset,
            batch=batch,
            s_local=s_local,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            sequence_parallel=self.sequence_parallel,
            cp_rank=self.cp_rank,
            cp_size=self.cp_size,
        )
        kernel = get_kernel(self.alp_config.kernel, hidden_states.device)
        return add_noise(hidden_states, self.log_sigma, site, kernel)

    def extra_repr(self) -> str:
        return f"layer={self.layer_number}, active={self.active}, placement={self.placement}"


class ALPLayerMixin:
    """Adds the ``perturbation`` slot to a ``TransformerLayer`` subclass (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        layer: TransformerLayer = self  # type: ignore[assignment]
        if layer.is_mtp_layer:
            raise ValueError(
                "with_alp: multi-token-prediction layers are not supported (their layer numbers "
                "restart per depth); wrap only the decoder's layer spec"
            )
        if layer.config.cuda_graph_impl != "none":
            raise ValueError(
                f"with_alp: TransformerConfig.cuda_graph_impl={layer.config.cuda_graph_impl!r} is "
                "not supported (a captured graph would replay stale noise); allowed: 'none'"
            )
        spec = getattr(layer.submodules_config, "perturbation", IdentityOp)
        self.perturbation = build_module(
            spec,
            config=layer.config,
            layer_number=layer.layer_number,
            pg_collection=layer.pg_collection,
        )

    def forward(self, *args: Any, **kwargs: Any):
        p = self.perturbation
        if not getattr(p, "active", False) or current_coords() is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        packed = kwargs.get("packed_seq_params")
        if p.placement == "hidden":
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = p(kwargs["hidden_states"], packed)
            else:
                args = (p(args[0], packed), *args[1:])
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        output = super().forward(*args, **kwargs)  # type: ignore[misc]
        if isinstance(output, tuple):
            return (p(output[0], packed), *output[1:])
        return p(output, packed)


@functools.cache
def _alp_layer_class(base: type) -> type:
    if base is TransformerLayer:
        return ALPTransformerLayer
    cls = type(f"ALP{base.__name__}", (ALPLayerMixin, base), {"__module__": __name__})
    cls.__doc__ = f"{base.__name__} with ALP's ``perturbation`` slot (built by with_alp)."
    return cls


class ALPTransformerLayer(ALPLayerMixin, TransformerLayer):
    """``TransformerLayer`` with ALP's ``perturbation`` slot (built by :func:`with_alp`)."""


@functools.cache
def _alp_submodules_class(base: type) -> type:
    if base is TransformerLayerSubmodules:
        return ALPTransformerLayerSubmodules
    return dataclasses.make_dataclass(
        f"ALP{base.__name__}",
        [("perturbation", ModuleSpec | type, dataclasses.field(default=IdentityOp))],
        bases=(base,),
    )


def _resolve_module(module: Any) -> Any:
    if isinstance(module, tuple):  # (import path, name), Megatron's lazy form
        return getattr(importlib.import_module(module[0]), module[1])
    return module


def with_alp(layer_spec: ModuleSpec, cfg: ALPConfig) -> ModuleSpec:
    """Wrap a TransformerLayer spec so that its layers carry ALP (see the module docstring).

    ``cfg.enabled=False`` returns ``layer_spec`` itself. Refuses (ValueError) anything
    that is not a ``ModuleSpec`` of a ``TransformerLayer`` subclass with
    ``TransformerLayerSubmodules``, and a spec that already carries ALP.
    """
    if not isinstance(cfg, ALPConfig):
        raise ValueError(f"with_alp: cfg must be an ALPConfig, got {type(cfg).__name__}")
    if not cfg.enabled:
        return layer_spec
    if not isinstance(layer_spec, ModuleSpec):
        raise ValueError(
            f"with_alp: expected a ModuleSpec of a TransformerLayer, got {type(layer_spec).__name__}"
        )
    module = _resolve_module(layer_spec.module)
    if not (isinstance(module, type) and issubclass(module, TransformerLayer)):
        raise ValueError(
            f"with_alp: layer spec module {module!r} is not supported; allowed: "
            "TransformerLayer and its subclasses (local, Transformer Engine and MoE specs)"
        )
    if issubclass(module, ALPLayerMixin):
        raise ValueError(f"with_alp: the layer spec already carries ALP ({module.__name__})")
    sub = layer_spec.submodules
    if not isinstance(sub, TransformerLayerSubmodules) or not dataclasses.is_dataclass(sub):
        raise ValueError(
            f"with_alp: layer spec submodules of type {type(sub).__name__} are not supported; "
            "allowed: TransformerLayerSubmodules (or a dataclass subclass of it)"
        )
    values = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub) if f.init}
    new_sub = _alp_submodules_class(type(sub))(
        **values,
        perturbation=ModuleSpec(module=LayerPerturbation, params={"alp_config": cfg}),
    )
    return ModuleSpec(
        module=_alp_layer_class(module),
        params=dict(layer_spec.params),
        submodules=new_sub,
        metainfo=dict(layer_spec.metainfo),
    )
