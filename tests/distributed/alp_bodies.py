"""Rank bodies for ``test_alp_layouts.py`` (module-level, so RankGroup can pickle them)."""

from __future__ import annotations

import contextlib
import functools
import math
import re

import torch

from megatron_alp import parallel
from megatron_alp.models import build_model, gpt_args_from_hf, transformer_config
from megatron_alp.models.sharding import gather_tp_full, iter_named_local_params, load_full_state
from megatron_alp.perturbation import (
    ALPConfig,
    alp_config_overrides,
    alp_metrics,
    is_alp_param,
    perturbed,
    step_key,
    with_alp,
)
from megatron_alp.perturbation.function import NoiseSite, add_noise, site_noise
from megatron_alp.perturbation.kernels import get_kernel
from megatron_alp.schedule import forward_backward, sync_params, wrap_ddp
from tests.layouts import (
    LAYOUTS,
    canonical_state,
    cross_entropy_loss,
    run_layout,
)
from megatron_alp.models.sharding import gather_vocab
from megatron_alp.models.tiny import tiny_batches, tiny_hf_config

SIGMA0 = 0.05
SEED = 7
ALP = ALPConfig(init_std=SIGMA0, seed=SEED)
# run name -> (layout, micro-batch size, recompute granularity, ALP on)
SWEEP = {
    "tp1": ("tp1", 2, None, True),
    "tp1_plain": ("tp1", 2, None, False),
    "tp2": ("tp2", 2, None, True),
    "tp2_sp": ("tp2_sp", 2, None, True),
    "pp2": ("pp2", 2, None, True),
    "tp2_pp2": ("tp2_pp2", 2, None, True),
    "pp2_vpp2": ("pp2_vpp2", 2, None, True),
    "tp1_mbs1": ("tp1", 1, None, True),
    "tp1_full": ("tp1", 2, "full", True),
    "tp1_selective": ("tp1", 2, "selective", True),
    "pp2_full": ("pp2", 2, "full", True),
    "tp2_sp_full": ("tp2_sp", 2, "full", True),
}
SEQ = 16
N_SAMPLES = 8


def sigma_name(layer: int) -> str:
    return f"decoder.layers.{layer}.perturbation.alp_log_sigma"


def full_state(hf) -> dict[str, torch.Tensor]:
    """Canonical weights plus a distinct log-sigma per layer (sigma_l = 0.05 * (l + 1))."""
    full = canonical_state(hf, seed=1)
    for layer in range(4):
        full[sigma_name(layer)] = torch.tensor(math.log(SIGMA0 * (layer + 1)))
    return full


def make_batches(mbs: int) -> list[dict[str, torch.Tensor]]:
    """The same 8 samples as micro-batches of ``mbs``, each with its global sample offset."""
    rows = tiny_batches(1, batch=N_SAMPLES, seq=SEQ, seed=2)[0]
    out = []
    for start in range(0, N_SAMPLES, mbs):
        b = {k: v[start : start + mbs].contiguous() for k, v in rows.items()}
        b["sample_offset"] = torch.tensor(start)
        out.append(b)
    return out


class NoiseContext:
    """``forward_context`` for run_layout: one step key per step, per-batch sample offset."""

    def __init__(self, seed: int = SEED):
        self.seed = seed
        self.keys: dict[int, int] = {}

    def __call__(self, step: int, batch: dict) -> contextlib.AbstractContextManager:
        if step not in self.keys:
            self.keys[step] = step_key(self.seed)
        return perturbed(key=self.keys[step], step=step, sample_offset=batch["sample_offset"])


def sweep(spec: dict) -> dict:
    hf = tiny_hf_config()
    full = full_state(hf)
    out = {}
    for name, (layout, mbs, recompute, alp_on) in spec.items():
        out[name] = run_layout(
            hf,
            LAYOUTS[layout],
            full,
            make_batches(mbs),
            steps=1,
            recompute_granularity=recompute,
            layer_spec_transform=functools.partial(with_alp, cfg=ALP) if alp_on else None,
            forward_context=NoiseContext() if alp_on else None,
        )
    return out


def _build(args, tc, full, cfg: ALPConfig | None):
    transform = None if cfg is None else functools.partial(with_alp, cfg=cfg)
    chunks = build_model(args, tc, layer_spec_transform=transform)
    load_full_state(chunks, full)
    return chunks


def _alp_names(chunks) -> list[str]:
    return [n for n, _ in iter_named_local_params(chunks) if is_alp_param(n)]


def bit_identity() -> dict:
    hf = tiny_hf_config()
    args = gpt_args_from_hf(hf)
    full = full_state(hf)
    batch = make_batches(2)[0]
    res = {}
    for lname in ("tp1", "tp2_sp"):
        layout = LAYOUTS[lname]
        with parallel.model_parallel(layout):
            tc = transformer_config(args, layout)
            key = step_key(SEED)

            def logits(cfg, *, ctx: bool, eval_mode: bool = False):
                chunks = _build(args, tc, full, cfg)
                model = chunks[0].eval() if eval_mode else chunks[0]
                cm = perturbed(key=key, step=1, sample_offset=0) if ctx else contextlib.nullcontext()
                with torch.no_grad(), cm:
                    out = model(batch["tokens"], batch["position_ids"], None)
                return gather_vocab(out), len(_alp_names(chunks))

            cases = {"plain": logits(None, ctx=False)[0]}
            n_params = {}
            for case, cfg in (
                ("disabled", ALPConfig(enabled=False)),
                ("empty_range", ALPConfig(init_std=SIGMA0, layer_start=2, layer_end=2)),
                ("zero_fixed_sigma", ALPConfig(init_std=0.0, learnable=False)),
            ):
                cases[case], n_params[case] = logits(cfg, ctx=True)
            cases["outside_context"] = logits(ALP, ctx=False)[0]
            cases["eval_perturbed"] = logits(ALP, ctx=True, eval_mode=True)[0]
            cases["n_alp_params"] = n_params
            res[lname] = cases
    return res


def _capture_inputs(modules: dict[str, torch.nn.Module]):
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, a, kw, name=name: seen.__setitem__(
                name, (a[0] if a else next(iter(kw.values()))).detach().clone()
            ),
            with_kwargs=True,
        )
        for name, m in modules.items()
    ]
    return seen, handles


def placement() -> dict:
    hf = tiny_hf_config()
    args = gpt_args_from_hf(hf)
    full = full_state(hf)
    batch = make_batches(2)[1]  # sample offset 2
    layout = LAYOUTS["tp1"]
    res = {}
    with parallel.model_parallel(layout):
        tc = transformer_config(args, layout)
        key = step_key(SEED)

        def run(cfg, modules_of):
            chunks = _build(args, tc, full, cfg)
            model = chunks[0]
            seen_plain, hs = _capture_inputs(modules_of(model))
            with torch.no_grad():
                model(batch["tokens"], batch["position_ids"], None)
            for h in hs:
                h.remove()
            seen_pert, hs = _capture_inputs(modules_of(model))
            with torch.no_grad(), perturbed(key=key, step=3, sample_offset=2):
                model(batch["tokens"], batch["position_ids"], None)
            for h in hs:
                h.remove()
            return {k: seen_pert[k] - seen_plain[k] for k in seen_plain}, chunks

        def expected(layer_number: int, sigma: float) -> torch.Tensor:
            site = NoiseSite(key=key, step=3, layer=layer_number, sample_offset=2, batch=2, s_local=SEQ)
            return torch.tensor(sigma, dtype=torch.float32) * site_noise(site, args.hidden_size)

        def norms(model):
            return {f"ln{i}": model.decoder.layers[i].input_layernorm for i in range(2)}

        d, _ = run(ALP, norms)
        res["hidden_delta"] = d["ln0"]
        res["hidden_expected"] = expected(1, SIGMA0)
        d, _ = run(ALPConfig(init_std=SIGMA0, layer_start=1, layer_end=3, seed=SEED), norms)
        res["range_delta0"], res["range_delta1"] = d["ln0"], d["ln1"]
        res["range_expected1"] = expected(2, SIGMA0 * 2)
        d, chunks = run(
            ALPConfig(init_std=SIGMA0, placement="logits", seed=SEED),
            lambda m: {"final": m.decoder.final_layernorm, "ln0": m.decoder.layers[0].input_layernorm},
        )
        res["logits_delta"] = d["final"]
        res["logits_expected"] = expected(4, SIGMA0 * 4)
        res["logits_first_input_delta"] = d["ln0"]
        res["logits_params"] = _alp_names(chunks)
    return res


def _layers(chunks) -> list[int]:
    return sorted(int(re.match(r"decoder\.layers\.(\d+)\.", n).group(1)) for n in _alp_names(chunks))


def ownership() -> dict:
    hf = tiny_hf_config()
    args = gpt_args_from_hf(hf)
    full = full_state(hf)
    res = {}
    cases = {
        "pp2": ("pp2", ALP),
        "pp2_range_1_3": ("pp2", ALPConfig(init_std=SIGMA0, layer_start=1, layer_end=3)),
        "pp2_logits": ("pp2", ALPConfig(init_std=SIGMA0, placement="logits")),
        "pp2_vpp2": ("pp2_vpp2", ALP),
    }
    for case, (lname, cfg) in cases.items():
        with parallel.model_parallel(LAYOUTS[lname]) as info:
            tc = transformer_config(args, LAYOUTS[lname])
            chunks = _build(args, tc, full, cfg)
            res[case] = _layers(chunks)
            res["pp_rank"] = info.pp_rank
            if case == "pp2":
                res["metrics"] = alp_metrics(chunks)
                sharded = chunks[0].sharded_state_dict()
                res["sharded"] = [
                    (v.key, tuple(v.global_shape), int(v.global_offset[0]))
                    for k, v in sharded.items()
                    if is_alp_param(k)
                ]
    return res


def finite_difference() -> dict:
    """d loss / d log_sigma: autograd vs central differences (float64 model, TP=1)."""
    hf = tiny_hf_config()
    args = gpt_args_from_hf(hf)
    full = full_state(hf)
    batch = make_batches(2)[0]
    layout = LAYOUTS["tp1"]
    out = {}
    with parallel.model_parallel(layout):
        tc = transformer_config(args, layout)
        model = _build(args, tc, full, ALP)[0].double()
        key = step_key(SEED)

        def loss() -> torch.Tensor:
            with perturbed(key=key, step=0, sample_offset=0):
                logits = model(batch["tokens"], batch["position_ids"], None)
            assert logits.dtype == torch.float64
            per_token = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
            ).view_as(batch["loss_mask"])
            return (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

        loss().backward()
        for layer in (0, 3):
            p = model.decoder.layers[layer].perturbation.alp_log_sigma
            assert p.dtype == torch.float64
            autograd = float(p.grad)
            x0, h = float(p), 1e-2
            vals = []
            for x in (x0 + h, x0 - h):
                with torch.no_grad():
                    p.fill_(x)
                    vals.append(float(loss()))
            with torch.no_grad():
                p.fill_(x0)
            out[layer] = (autograd, (vals[0] - vals[1]) / (2 * h))
    return out


def saved_tensors() -> dict:
    """Sizes of the tensors autograd saves in a forward, with and without ALP (TP=1)."""
    hf = tiny_hf_config()
    args = gpt_args_from_hf(hf)
    full = full_state(hf)
    batch = make_batches(2)[0]
    layout = LAYOUTS["tp1"]
    act = SEQ * 2 * args.hidden_size
    res = {"n_layers": args.num_layers}
    with parallel.model_parallel(layout):
        tc = transformer_config(args, layout)
        key = step_key(SEED)
        for name, cfg in (("plain", None), ("alp", ALP)):
            model = _build(args, tc, full, cfg)[0]
            sizes: list[int] = []

            def pack(t):
                sizes.append(t.numel())
                return t

            cm = perturbed(key=key, step=0, sample_offset=0) if cfg else contextlib.nullcontext()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cm:
                model(batch["tokens"], batch["position_ids"], None).sum().backward()
            res[f"{name}_large"] = sorted(s for s in sizes if s >= args.hidden_size)
            res[f"{name}_small"] = sorted(s for s in sizes if s < args.hidden_size)
        extra = list(res["alp_small"])
        for s in res["plain_small"]:
            extra.remove(s)
        res["alp_small_extra"] = len(extra)
        assert all(s == 1 for s in extra), extra
        # The function alone: only the scalar log_sigma is saved.
        h = torch.randn(SEQ, 2, args.hidden_size, requires_grad=True)
        log_sigma = torch.tensor(-3.0, requires_grad=True)
        site = NoiseSite(key=key, step=0, layer=1, sample_offset=0, batch=2, s_local=SEQ)
        sizes = []

        def pack2(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack2, lambda t: t):
            y = add_noise(h, log_sigma, site, get_kernel("torch", h.device))
        y.sum().backward()
        res["function_saved"] = sizes
        res["activation_numel"] = act
    return res


def optimizer() -> dict:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    hf = tiny_hf_config()
    args = gpt_args_from_hf(hf)
    full = full_state(hf)
    batches = make_batches(2)
    layout = LAYOUTS["tp2_sp"]
    alp = ALPConfig(init_std=SIGMA0, lr=0.5, weight_decay=0.1, seed=SEED)
    res = {}
    for dist_opt in (False, True):
        with parallel.model_parallel(layout):
            tc = transformer_config(args, layout)
            chunks = _build(args, tc, full, alp)
            model = wrap_ddp(chunks, tc, use_distributed_optimizer=dist_opt)
            ocfg = OptimizerConfig(
                optimizer="adam", lr=1e-3, min_lr=1e-3, weight_decay=0.0, clip_grad=1.0,
                use_distributed_optimizer=dist_opt,
            )
            opt = get_megatron_optimizer(
                ocfg, model, config_overrides=alp_config_overrides(alp, ocfg),
                use_gloo_process_groups=parallel.has_gloo_groups(),
            )
            OptimizerParamScheduler(
                opt, init_lr=0.0, max_lr=1e-3, min_lr=1e-3, lr_warmup_steps=0, lr_decay_steps=10,
                lr_decay_style="constant", start_wd=0.0, end_wd=0.0, wd_incr_steps=10,
                wd_incr_style="constant",
            )
            for m in model:
                m.zero_grad_buffer()
            opt.zero_grad()
            ctx = NoiseContext()
            forward_backward(
                model, batches, cross_entropy_loss([]), seq_length=SEQ,
                forward_context=functools.partial(ctx, 0),
            )
            r: dict = {"metrics": alp_metrics(model)}
            sigmas = {n: p for n, p in iter_named_local_params(model) if is_alp_param(n)}
            before = {n: float(p) for n, p in sigmas.items()}
            if not dist_opt:
                grads = gather_tp_full(model, grads=True)
                sq = {n: float(g.double().pow(2).sum()) for n, g in grads.items()}
                r["expected_norm"] = math.sqrt(sum(sq.values()))
                r["norm_without_sigma"] = math.sqrt(sum(v for n, v in sq.items() if not is_alp_param(n)))
                sigma_ids = {id(p) for p in sigmas.values()}
                groups = opt.param_groups
                sg = [g for g in groups if any(id(p) in sigma_ids for p in g["params"])]
                assert len(sg) == 1, len(sg)
                r["sigma_group"] = {"lr": sg[0]["lr"], "weight_decay": sg[0]["weight_decay"]}
                r["other_lrs"] = {g["lr"] for g in groups if g["params"] and g is not sg[0]}
                sgrad = {n: float(grads[n]) for n in sigmas}
            else:
                r["alp_group_lrs"] = [g["lr"] for g in opt.param_groups if g.get("max_lr") == 0.5]
            _, grad_norm, _ = opt.step()
            sync_params(model)  # overlap_param_gather (on with CUDA): finish the all-gather
            r["grad_norm"] = float(grad_norm)
            after = {n: float(p) for n, p in sigmas.items()}
            r["sigma_after"] = after
            if not dist_opt:
                coeff = min(1.0, 1.0 / (r["grad_norm"] + 1e-6))
                update = {}
                for n in sigmas:
                    g = sgrad[n] * coeff
                    update[n] = (before[n], g / (abs(g) + 1e-8), after[n])
                r["sigma_update"] = update
            res["dist" if dist_opt else "plain"] = r
    return res


def recompute_control() -> dict:
    """Negative control for the recompute tests: coordinates kept only on the Python side.

    With full recompute, the layer forward re-runs inside the backward, after the
    ``perturbed`` block has exited. If the coordinates were not restored with
    Megatron's RNG-tracker snapshot, the recomputed layers would run unperturbed and
    sigma would get no gradient at all; with them, the gradients match no recompute.
    """
    from megatron_alp.perturbation import layer as alp_layer
    from megatron_alp.perturbation.context import NoiseCoords

    hf = tiny_hf_config()
    args = gpt_args_from_hf(hf)
    full = full_state(hf)
    batch = make_batches(2)[0]
    layout = LAYOUTS["tp1"]
    python_side: dict = {"coords": None}

    @contextlib.contextmanager
    def python_perturbed(**kw):
        python_side["coords"] = NoiseCoords(**kw)
        try:
            yield
        finally:
            python_side["coords"] = None

    def sigma_grads(recompute, ctx_fn) -> dict:
        with parallel.model_parallel(layout):
            tc = transformer_config(args, layout, recompute_granularity=recompute)
            model = _build(args, tc, full, ALP)[0]
            with ctx_fn(key=11, step=0, sample_offset=0):
                out = model(batch["tokens"], batch["position_ids"], None)
            out.float().pow(2).mean().backward()
            return {n: None if p.grad is None else float(p.grad) for n, p in model.named_parameters() if is_alp_param(n)}

    res = {"none": sigma_grads(None, perturbed), "full": sigma_grads("full", perturbed)}
    real = alp_layer.current_coords
    alp_layer.current_coords = lambda: python_side["coords"]
    try:
        res["python_side_none"] = sigma_grads(None, python_perturbed)
        res["python_side_full"] = sigma_grads("full", python_perturbed)
    finally:
        alp_layer.current_coords = real
    return res
