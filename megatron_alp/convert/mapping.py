"""HF <-> canonical Megatron tensors: declarative rules, layout transforms, a registry.

The *canonical* Megatron form (see :mod:`megatron_alp.models.sharding`) is the state of a
TP=1, PP=1 GPTModel with the local layer spec: global layer indices, full tensors, padded
vocabulary, ``linear_qkv`` laid out per query group, ``linear_fc1`` = ``[gate; up]``.

An :class:`ArchMapping` is one table of :class:`TensorRule` per HF ``model_type``; binding
it to a model's :class:`~megatron_alp.models.hf.GPTArgs` gives a :class:`ModelMapping`,
which knows every name and shape on both sides and converts one tensor at a time::

    m = model_mapping(hf_config)                       # or ModelMapping(arch, args)
    m.hf_sources("decoder.layers.0.self_attention.linear_qkv.weight")
    # -> ("model.layers.0.self_attn.q_proj.weight", "...k_proj.weight", "...v_proj.weight")
    full = m.to_megatron(name, [q, k, v])              # HF -> canonical
    for hf_name, t in m.to_hf(name, full): ...         # canonical -> HF (un-fused)

``to_hf`` is what the conversion tool and the live weight export (a TP-gathered,
PP-merged canonical stream) share. It accepts the Transformer Engine names of the fused
norms too (``...linear_qkv.layer_norm_weight``), and returns nothing for ALP parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import torch

from megatron_alp.models.hf import GPTArgs, gpt_args_from_hf, padded_vocab_size

# The one rule that recognises ALP state by name (``...alp_log_sigma``): never exported.
from megatron_alp.perturbation.layer import is_alp_param

__all__ = [
    "ArchMapping",
    "Layout",
    "ModelMapping",
    "TensorRule",
    "get_mapping",
    "is_alp_param",
    "model_mapping",
    "register_mapping",
    "registered_model_types",
]

Layout = Literal["copy", "vocab", "qkv", "gate_up"]
"""How the HF tensors become the canonical one:

* ``copy``: one HF tensor, unchanged.
* ``vocab``: one HF tensor [V, H]; the canonical one has the padded vocabulary [Vp, H]
  (zero rows appended; removed on the way back).
* ``qkv``: HF q, k, v -> one tensor laid out per query group ``[q_g, k_g, v_g]`` for each
  group g (weights and biases alike: the split is along dim 0).
* ``gate_up``: HF gate, up -> ``[gate; up]`` along dim 0 (SwiGLU ``linear_fc1``).
"""

Condition = Literal["always", "tied", "untied", "qkv_bias", "qk_norm"]

_CONDITIONS: dict[str, Callable[[GPTArgs], bool]] = {
    "always": lambda a: True,
    "tied": lambda a: a.tie_word_embeddings,
    "untied": lambda a: not a.tie_word_embeddings,
    "qkv_bias": lambda a: a.add_qkv_bias,
    "qk_norm": lambda a: a.qk_layernorm,
}

_LAYER = "{i}"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TensorRule:
    """One canonical Megatron tensor and the HF tensor(s) it is made of.

    Names are templates: ``{i}`` stands for the global layer index on both sides.
    ``megatron=None`` marks HF tensors that are dropped (e.g. stale rotary buffers).
    """

    megatron: str | None
    """Canonical Megatron name, or None for HF tensors that map to nothing."""
    hf: tuple[str, ...]
    """HF names, in the order the layout expects (q, k, v / gate, up)."""
    layout: Layout = "copy"
    """How the HF tensors combine (see :data:`Layout`)."""
    when: Condition = "always"
    """The rule applies only to models with this property (tied embeddings, QKV bias...)."""

    def __post_init__(self) -> None:
        if self.when not in _CONDITIONS:
            raise ValueError(f"TensorRule.when={self.when!r} is not one of {sorted(_CONDITIONS)}")
        want = {"copy": 1, "vocab": 1, "qkv": 3, "gate_up": 2}.get(self.layout)
        if want is None:
            raise ValueError(f"TensorRule.layout={self.layout!r} is not one of {Layout.__args__}")
        if self.megatron is not None and len(self.hf) != want:
            raise ValueError(
                f"TensorRule {self.megatron!r}: layout {self.layout!r} takes {want} HF "
                f"tensor(s), got {len(self.hf)}: {self.hf}"
            )
        if self.megatron is None and not self.hf:
            raise ValueError("TensorRule needs a Megatron name, HF names, or both")
        layered = [_LAYER in n for n in ((self.megatron,) if self.megatron else ()) + self.hf]
        if len(set(layered)) > 1:
            raise ValueError(
                f"TensorRule {self.megatron!r} <-> {self.hf}: either every name has a "
                "'{i}' layer index or none has"
            )

    @property
    def per_layer(self) -> bool:
        return _LAYER in (self.megatron or self.hf[0])


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ArchMapping:
    """The rules of one HF ``model_type``."""

    model_type: str
    rules: tuple[TensorRule, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for r in self.rules:
            for name in ((r.megatron,) if r.megatron else ()) + r.hf:
                key = f"{name}|{r.when}"
                if key in seen:
                    raise ValueError(f"ArchMapping {self.model_type!r}: {name!r} appears twice")
                seen.add(key)


_REGISTRY: dict[str, ArchMapping] = {}


def register_mapping(mapping: ArchMapping) -> ArchMapping:
    """Add an architecture; a ``model_type`` registered twice is a ValueError."""
    if mapping.model_type in _REGISTRY:
        raise ValueError(f"a mapping for model_type {mapping.model_type!r} is already registered")
    _REGISTRY[mapping.model_type] = mapping
    return mapping


def registered_model_types() -> list[str]:
    """HF ``model_type`` values with a conversion mapping."""
    from megatron_alp.convert import architectures  # noqa: F401  (registers the tables)

    return sorted(_REGISTRY)


def get_mapping(model_type: str) -> ArchMapping:
    """The mapping of ``model_type``; ValueError listing the supported types otherwise."""
    from megatron_alp.convert import architectures  # noqa: F401

    if model_type not in _REGISTRY:
        raise ValueError(
            f"HF model_type {model_type!r} has no conversion mapping; supported: "
            f"{', '.join(registered_model_types())}"
        )
    return _REGISTRY[model_type]


# -- layout transforms ----------------------------------------------------------------
def _qkv_groups(a: GPTArgs) -> tuple[int, int, int]:
    ng, d = a.num_query_groups, a.kv_channels
    return ng, a.num_attention_heads // ng, d


def _qkv_to_megatron(ts: Sequence[torch.Tensor], a: GPTArgs) -> torch.Tensor:
    q, k, v = ts
    ng, per, d = _qkv_groups(a)
    rest = q.shape[1:]
    q = q.reshape(ng, per * d, *rest)
    k = k.reshape(ng, d, *rest)
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(ng * (per + 2) * d, *rest)


def _qkv_to_hf(t: torch.Tensor, a: GPTArgs) -> list[torch.Tensor]:
    ng, per, d = _qkv_groups(a)
    rest = t.shape[1:]
    q, k, v = t.reshape(ng, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
    return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


def _hf_shapes(layout: Layout, shape: tuple[int, ...], a: GPTArgs) -> list[tuple[int, ...]]:
    rest = shape[1:]
    if layout == "copy":
        return [shape]
    if layout == "vocab":
        return [(a.vocab_size, *rest)]
    if layout == "qkv":
        ng, per, d = _qkv_groups(a)
        return [(ng * per * d, *rest), (ng * d, *rest), (ng * d, *rest)]
    half = shape[0] // 2
    return [(half, *rest), (half, *rest)]


def _canonical_shapes(a: GPTArgs, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Canonical shape of every rule template (one place for the arithmetic)."""
    h, f, d = a.hidden_size, a.ffn_hidden_size, a.kv_channels
    qkv = (a.num_attention_heads + 2 * a.num_query_groups) * d
    return {
        "embedding.word_embeddings.weight": (padded_vocab, h),
        "decoder.layers.{i}.input_layernorm.weight": (h,),
        "decoder.layers.{i}.self_attention.linear_qkv.weight": (qkv, h),
        "decoder.layers.{i}.self_attention.linear_qkv.bias": (qkv,),
        "decoder.layers.{i}.self_attention.q_layernorm.weight": (d,),
        "decoder.layers.{i}.self_attention.k_layernorm.weight": (d,),
        "decoder.layers.{i}.self_attention.linear_proj.weight": (h, a.num_attention_heads * d),
        "decoder.layers.{i}.pre_mlp_layernorm.weight": (h,),
        "decoder.layers.{i}.mlp.linear_fc1.weight": (2 * f, h),
        "decoder.layers.{i}.mlp.linear_fc2.weight": (h, f),
        "decoder.final_layernorm.weight": (h,),
        "output_layer.weight": (padded_vocab, h),
    }


# Transformer Engine fuses the pre-attention / pre-MLP norms into the next linear layer;
# its parameter names are also the dist-checkpoint key names of the local spec
# (megatron-core's ``sharded_state_dict_keys_map``). Canonical names use the local ones.
TE_FUSED_NORMS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def _from_te_name(name: str) -> str:
    for local, te in TE_FUSED_NORMS.items():
        if f".{te}" in name:
            return name.replace(f".{te}", f".{local}")
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    rule: TensorRule
    megatron: str | None
    hf: tuple[str, ...]
    layer: int | None


class ModelMapping:
    """An :class:`ArchMapping` bound to one model's sizes: every name, shape and transform.

    The padded vocabulary (``padded_vocab``) defaults to ``vocab_size`` rounded up to a
    multiple of ``make_vocab_size_divisible_by`` (128), the size ``build_model`` uses for
    any TP that divides 128; a running model passes its own.
    """

    def __init__(
        self,
        arch: ArchMapping,
        args: GPTArgs,
        *,
        make_vocab_size_divisible_by: int = 128,
        padded_vocab: int | None = None,
    ) -> None:
        if arch.model_type != args.model_type:
            raise ValueError(
                f"mapping for {arch.model_type!r} cannot be bound to a {args.model_type!r} model"
            )
        self.arch = arch
        self.args = args
        if padded_vocab is None:
            padded_vocab = padded_vocab_size(args.vocab_size, make_vocab_size_divisible_by, 1)
        if padded_vocab < args.vocab_size:
            raise ValueError(
                f"padded vocabulary {padded_vocab} is smaller than vocab_size={args.vocab_size}"
            )
        self.padded_vocab = padded_vocab
        shapes = _canonical_shapes(args, self.padded_vocab)
        self._by_megatron: dict[str, _Entry] = {}
        self._by_hf: dict[str, _Entry] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._hf_shape: dict[str, tuple[int, ...]] = {}
        rules = [r for r in arch.rules if _CONDITIONS[r.when](args)]
        global_rules = [r for r in rules if not r.per_layer]
        layer_rules = [r for r in rules if r.per_layer]
        # Order: embedding first, layers in order, then the rest (final norm, head): the
        # order both converters stream in.
        ordered: list[tuple[TensorRule, int | None]] = [
            (r, None) for r in global_rules if r.megatron and r.megatron.startswith("embedding.")
        ]
        ordered += [(r, i) for i in range(args.num_layers) for r in layer_rules]
        ordered += [
            (r, None)
            for r in global_rules
            if not (r.megatron and r.megatron.startswith("embedding."))
        ]
        for rule, i in ordered:
            layer = str(i) if i is not None else ""
            entry = _Entry(
                rule,
                rule.megatron.replace(_LAYER, layer) if rule.megatron else None,
                tuple(h.replace(_LAYER, layer) for h in rule.hf),
                i,
            )
            if entry.megatron is not None:
                if rule.megatron not in shapes:
                    raise ValueError(
                        f"ArchMapping {arch.model_type!r}: no shape known for {rule.megatron!r}"
                    )
                self._by_megatron[entry.megatron] = entry
                shape = shapes[rule.megatron]
                self._shape[entry.megatron] = shape
                for h, s in zip(entry.hf, _hf_shapes(rule.layout, shape, args)):
                    self._hf_shape[h] = s
            for h in entry.hf:
                self._by_hf[h] = entry

    # -- names and shapes ---------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.arch.model_type

    def megatron_names(self) -> list[str]:
        """Canonical names in streaming order (embedding, layer 0..L-1, final norm, head)."""
        return list(self._by_megatron)

    def hf_names(self) -> list[str]:
        """HF names of the model's weights (what ``save_pretrained`` writes), in order."""
        return [h for e in self._by_megatron.values() for h in e.hf]

    def megatron_shape(self, name: str) -> tuple[int, ...]:
        """Canonical (full, padded-vocabulary) shape of ``name``."""
        return self._shape[self.canonical(name)]

    def hf_shape(self, hf_name: str) -> tuple[int, ...]:
        """Shape of the HF tensor ``hf_name``; KeyError if the model has no such weight."""
        return self._hf_shape[hf_name]

    def layer_of(self, name: str) -> int | None:
        """Global layer index of a canonical name, None for embedding / final norm / head."""
        return self._by_megatron[self.canonical(name)].layer

    def layout(self, name: str) -> Layout:
        return self._by_megatron[self.canonical(name)].rule.layout

    def canonical(self, name: str) -> str:
        """``name`` in canonical (local-spec) form; accepts Transformer Engine names.

        KeyError naming the model type if the name is not one of this model's weights.
        """
        if name in self._by_megatron:
            return name
        alt = _from_te_name(name)
        if alt in self._by_megatron:
            return alt
        raise KeyError(
            f"{name!r} is not a weight of this {self.model_type} model "
            f"({self.args.num_layers} layers); expected one of e.g. "
            f"{self.megatron_names()[:3]}"
        )

    def hf_sources(self, name: str) -> tuple[str, ...]:
        """HF names that make up canonical tensor ``name`` (layout order)."""
        return self._by_megatron[self.canonical(name)].hf

    def hf_target(self, hf_name: str) -> str | None:
        """The canonical name ``hf_name`` feeds, None if the HF tensor is dropped.

        KeyError if ``hf_name`` is not known to the mapping at all.
        """
        if hf_name not in self._by_hf:
            raise KeyError(hf_name)
        return self._by_hf[hf_name].megatron

    def is_dropped_hf(self, hf_name: str) -> bool:
        """True for HF tensors that the mapping knows and deliberately drops."""
        e = self._by_hf.get(hf_name)
        return e is not None and e.megatron is None

    # -- transforms ---------------------------------------------------------------------
    def to_megatron(self, name: str, hf_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The canonical tensor ``name`` from its HF tensors (in :meth:`hf_sources` order)."""
        e = self._by_megatron[self.canonical(name)]
        if len(hf_tensors) != len(e.hf):
            raise ValueError(f"{name}: expected {len(e.hf)} HF tensors {e.hf}, got {len(hf_tensors)}")
        for h, t in zip(e.hf, hf_tensors):
            if tuple(t.shape) != self._hf_shape[h]:
                raise ValueError(
                    f"HF tensor {h}: shape {tuple(t.shape)}, expected {self._hf_shape[h]} "
                    f"for a {self.model_type} model of this config"
                )
        layout = e.rule.layout
        if layout == "copy":
            return hf_tensors[0]
        if layout == "vocab":
            t = hf_tensors[0]
            pad = self.padded_vocab - t.shape[0]
            if pad == 0:
                return t
            return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))], dim=0)
        if layout == "qkv":
            return _qkv_to_megatron(hf_tensors, self.args)
        return torch.cat(list(hf_tensors), dim=0)

    def to_hf(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """HF-named tensors of canonical tensor ``name`` (full, TP-gathered).

        Un-fuses QKV and gate/up, strips the vocabulary padding; ``[]`` for ALP
        parameters. Accepts canonical or Transformer Engine names; KeyError otherwise.
        Outputs are contiguous and may share memory with ``tensor``.
        """
        if is_alp_param(name):
            return []
        e = self._by_megatron[self.canonical(name)]
        want = self._shape[e.megatron]
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"tensor {name}: shape {tuple(tensor.shape)}, expected {want} (full, "
                "TP-gathered, padded vocabulary)"
            )
        layout = e.rule.layout
        if layout == "copy":
            outs = [tensor]
        elif layout == "vocab":
            outs = [tensor[: self.args.vocab_size]]
        elif layout == "qkv":
            outs = _qkv_to_hf(tensor, self.args)
        else:
            outs = [x.contiguous() for x in tensor.chunk(2, dim=0)]
        return list(zip(e.hf, outs))

    def row_aligned(self, name: str) -> bool:
        """True if canonical row r is HF row r (copy / vocab layouts): streamable by rows."""
        return self.layout(name) in ("copy", "vocab")

    def row_pieces(self, name: str) -> list[tuple[str, int]] | None:
        """``[(hf_name, first canonical row)]`` when the canonical tensor is a plain stack
        of whole HF tensors along dim 0 (copy, vocab, gate_up), so each can be written
        as its own chunk without concatenating; None for QKV (interleaved). Rows after
        the last piece (vocabulary padding) are zeros.
        """
        e = self._by_megatron[self.canonical(name)]
        if e.rule.layout == "qkv":
            return None
        out, row = [], 0
        for h in e.hf:
            out.append((h, row))
            row += self._hf_shape[h][0]
        return out

    def row_map(self, name: str) -> list[tuple[str, int, int, int]]:
        """Where the rows of the HF tensors go in canonical tensor ``name``:
        ``[(hf_name, hf_row0, hf_row1, canonical_row0)]``, contiguous runs of rows in
        canonical order, tiling rows ``[0, n)``; rows after that (vocabulary padding) are
        zeros. Every layout is a row permutation along dim 0, so a converter can read
        each run from the file straight into its place (QKV: three runs per query group)
        instead of concatenating; :meth:`to_megatron` is the same map applied to tensors.
        """
        e = self._by_megatron[self.canonical(name)]
        if e.rule.layout != "qkv":
            return [(h, 0, self._hf_shape[h][0], row) for h, row in self.row_pieces(name)]
        ng, per, d = _qkv_groups(self.args)
        q, k, v = e.hf
        out = []
        for g in range(ng):
            base = g * (per + 2) * d
            out += [
                (q, g * per * d, (g + 1) * per * d, base),
                (k, g * d, (g + 1) * d, base + per * d),
                (v, g * d, (g + 1) * d, base + (per + 1) * d),
            ]
        return out


def model_mapping(hf_config: Any, *, make_vocab_size_divisible_by: int = 128) -> ModelMapping:
    """The :class:`ModelMapping` of an HF config object (``AutoConfig`` or alike)."""
    args = gpt_args_from_hf(hf_config)
    return ModelMapping(
        get_mapping(args.model_type), args, make_vocab_size_divisible_by=make_vocab_size_divisible_by
    )
