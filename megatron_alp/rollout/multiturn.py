"""Multi-turn tool-integrated rollouts: generate, run the code, show the result, continue.

Per prompt and sample, a *trajectory* alternates model turns and observations:

1. The engine generates a turn from the whole trajectory so far, given as **token ids**
   (prompt + every earlier model and observation token), so tokenisation never drifts
   between turns and a fleet engine continues exactly where it stopped.
2. The turn's text is searched for a code block (``code_pattern``, default the
   reference's fenced ```` ```python ```` block). With one, the turn is cut, **in token
   space**, right after the first block (the shortest prefix of the generated tokens whose
   text contains the whole block; their log-probs are kept, the rest is dropped), the code
   runs in the sandbox, and the observation is appended: in the model's chat format (the
   tokens its chat template puts between an assistant message and the next assistant
   turn, with a ``tool`` message holding the result; default) or inline as plain text
   (the reference implementation's way).
3. The trajectory ends when the turn (or the code's output) holds a final answer
   (``answer_pattern``, default ``\\boxed{``), at ``max_turns``, or when the response
   budget is spent. A *void turn* (neither code nor answer) is handled as the reference
   does: with ``mask_void_turns`` (default) the trajectory ends there and is dropped from
   the loss (its loss mask is all zero; it still counts in its group for advantages);
   without, a newline observation is appended and generation goes on.

Output per trajectory: the prompt ids, the response ids (model and observation tokens
interleaved), a loss mask that is 1 exactly on model-generated tokens, the rollout
log-probs aligned with the response (0.0 on observation tokens, which the mask removes),
and the turn metadata. Observation text is taken from the reference: the last stderr
line on error, else stdout, head-and-tail truncated to ``max_observation_chars``.

This module does not import the sandbox package (the import graph points down): anything
with ``run_batch(codes) -> results`` whose results have ``stdout``, ``stderr``,
``exit_code`` and ``timed_out`` works, e.g. ``megatron_alp.sandbox.SandboxPool`` or
``SandboxClient``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Protocol, Sequence

from megatron_alp.rollout.base import RolloutEngine, SamplingParams

__all__ = [
    "CodeSandbox",
    "MultiTurnConfig",
    "Trajectory",
    "multiturn_metrics",
    "observation_token_ids",
    "run_multiturn",
]


class ExecResult(Protocol):
    """What the rollout reads from one sandbox run (``SandboxResult`` has these)."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool


class CodeSandbox(Protocol):
    """Runs programs isolated; ``SandboxPool`` and ``SandboxClient`` satisfy it."""

    def run_batch(self, codes: Sequence[str]) -> Sequence[ExecResult]:
        """One result per program, in order."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MultiTurnConfig:
    """How multi-turn rollouts run (defaults follow the paper's multi-turn setting)."""

    max_turns: int = 5
    """Model turns per trajectory at most (``--rl-max-turns``)."""
    code_pattern: str = r"```(?:py|python)?\n(.*?)\n```"
    """Regex (DOTALL) of a code block; group 1 is the code. The first match is executed."""
    answer_pattern: str = r"\\boxed\{"
    """Regex of a final answer, searched in the turn's text and in the code's stdout."""
    observation_format: Literal["chat", "inline"] = "chat"
    """chat: close the assistant turn and add a message of ``observation_role`` plus the
    next assistant header, via the tokenizer's chat template; inline: append the text
    ``\\n<observation>\\n`` to the assistant turn (the reference implementation)."""
    observation_role: str = "tool"
    """Chat role of the observation message (``tool``, or ``user`` for templates without one)."""
    observation_prefix: str = "Code execution result: "
    """Text before the program's output in the observation."""
    max_observation_chars: int = 512
    """Output longer than this keeps its head and tail with a marker in between."""
    error_lines: int = 1
    """On a failing program, how many trailing stderr lines the model sees."""
    max_observation_tokens: int = 1024
    """Observation tokens kept at most (cut from the end)."""
    max_response_tokens: int | None = None
    """Budget of response tokens (model + observation) per trajectory; None: unbounded
    (each turn is still capped by ``SamplingParams.max_new_tokens``)."""
    mask_void_turns: bool = True
    """A void turn ends its trajectory and zeroes its whole loss mask (the reference's
    ``mask_void_turns``); False: append a newline observation and continue."""
    final_answer_function: bool = False
    """Prepend ``def final_answer(x): print(f"\\\\boxed{{{x}}}")`` to every program (the
    reference's option)."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"MultiTurnConfig.max_turns must be >= 1, got {self.max_turns}")
        for name in ("code_pattern", "answer_pattern"):
            try:
                rx = re.compile(getattr(self, name), re.DOTALL)
            except re.error as e:
                raise ValueError(f"MultiTurnConfig.{name} is not a valid regex: {e}") from None
            if name == "code_pattern" and rx.groups < 1:
                raise ValueError(
                    f"MultiTurnConfig.code_pattern needs a capture group for the code, got "
                    f"{self.code_pattern!r}"
                )
        if self.observation_format not in ("chat", "inline"):
            raise ValueError(
                f"MultiTurnConfig.observation_format must be 'chat' or 'inline', got "
                f"{self.observation_format!r}"
            )
        for name in ("max_observation_chars", "error_lines", "max_observation_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"MultiTurnConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_response_tokens is not None and self.max_response_tokens < 1:
            raise ValueError(
                f"MultiTurnConfig.max_response_tokens must be >= 1 or None, got "
                f"{self.max_response_tokens}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Trajectory:
    """One multi-turn rollout, ready for the trainer."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    """Model and observation tokens, in order."""
    loss_mask: list[int]
    """1 on model-generated tokens, 0 on observation tokens (all 0 for a masked void
    trajectory); same length as ``response_ids``."""
    rollout_logprobs: list[float]
    """The engine's processed log-prob of each model token; 0.0 on observation tokens."""
    response_text: str
    """The decoded response (special tokens skipped), for the reward."""
    turns: int
    """Model turns generated."""
    tool_calls: int
    """Programs executed."""
    tool_errors: int
    """Programs that failed (non-zero exit, stderr output, or timeout)."""
    tool_timeouts: int
    """Programs stopped at the sandbox's wall-clock limit."""
    void_turns: int
    """Turns with neither code nor answer."""
    finish_reason: Literal["answer", "max_turns", "length", "void"]
    versions: list[int] | None = None
    """Per response token: the policy version of the turn that produced it (an
    observation carries its turn's), where the engine's completions say
    (``Completion.version``: asynchronous rollouts, whose turns may span versions)."""


@dataclasses.dataclass
class _State:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response: list[int] = dataclasses.field(default_factory=list)
    mask: list[int] = dataclasses.field(default_factory=list)
    logp: list[float] = dataclasses.field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    void_turns: int = 0
    finish: str | None = None
    versions: list[int | None] = dataclasses.field(default_factory=list)
    version: int | None = None  # the last model turn's

    def add(self, ids: Sequence[int], logp: Sequence[float] | None, version: int | None = None) -> None:
        if logp is not None:
            self.version = version
        self.response.extend(ids)
        self.mask.extend([1 if logp is not None else 0] * len(ids))
        self.logp.extend(logp if logp is not None else [0.0] * len(ids))
        self.versions.extend([self.version] * len(ids))


def _truncate_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n...[truncated {len(text) - 2 * half} characters]...\n{text[-half:]}"


def _observation_text(res: ExecResult, cfg: MultiTurnConfig) -> tuple[str, bool]:
    """The observation body and whether the program failed (reference rules)."""
    stderr, stdout = res.stderr or "", res.stdout or ""
    # The sandbox itself failed (exit_code None, maybe no output): a tool error, not silence.
    broken = getattr(res, "killed_by", None) == "sandbox"
    failed = bool(stderr) or res.timed_out or broken or (res.exit_code not in (0, None))
    if stderr.strip():
        body = "\n".join(stderr.strip().splitlines()[-cfg.error_lines:])
    elif stdout:
        body = stdout
    elif res.timed_out:
        body = "interpreter timeout"
    elif broken:
        body = "sandbox error"
    elif failed:
        body = f"exit status {res.exit_code}"
    else:
        body = ""
    return cfg.observation_prefix + _truncate_middle(body, cfg.max_observation_chars), failed


def observation_token_ids(tokenizer: Any, text: str, cfg: MultiTurnConfig) -> list[int]:
    """Token ids that follow a model turn to show ``text``, per ``cfg.observation_format``.

    chat: the template's rendering of ``[..., assistant(S), <role>(text)]`` with the
    generation prompt, from just after the assistant content ``S``: the end of the
    assistant turn, the observation message, and the next assistant header.
    """
    if cfg.observation_format == "inline":
        return list(tokenizer.encode(f"\n{text}\n", add_special_tokens=False))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "MultiTurnConfig.observation_format='chat' needs a tokenizer with a chat_template; "
            "set observation_format='inline' for a base model"
        )
    sentinel = "\u2063ALP-SENTINEL\u2063"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel},
            {"role": cfg.observation_role, "content": text}]
    full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    at = full.find(sentinel)
    if at < 0 or text not in full:
        raise ValueError(
            f"the chat template does not render assistant content and a "
            f"{cfg.observation_role!r} message verbatim; use observation_role='user' or "
            "observation_format='inline'"
        )
    return list(tokenizer.encode(full[at + len(sentinel):], add_special_tokens=False))


def _cut_after_code(tokenizer: Any, ids: list[int], rx: re.Pattern) -> tuple[int, str] | None:
    """Shortest prefix of ``ids`` whose text holds a whole code block: (length, code)."""
    m = rx.search(tokenizer.decode(ids, skip_special_tokens=True))
    if m is None:
        return None
    lo, hi = 1, len(ids)  # invariant: a prefix of length hi matches
    while lo < hi:
        mid = (lo + hi) // 2
        if rx.search(tokenizer.decode(ids[:mid], skip_special_tokens=True)):
            hi = mid
        else:
            lo = mid + 1
    m = rx.search(tokenizer.decode(ids[:hi], skip_special_tokens=True))
    assert m is not None
    return hi, m.group(1)


_FINAL_ANSWER_FN = 'def final_answer(result):\n    print(f"\\\\boxed{{{result}}}")\n\n'


def run_multiturn(
    engine: RolloutEngine,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    tokenizer: Any,
    sandbox: CodeSandbox,
    cfg: MultiTurnConfig = MultiTurnConfig(),
) -> list[Trajectory]:
    """``sampling.n`` multi-turn trajectories per prompt (see the module docstring).

    ``prompts`` are token ids (already in chat format, ending with the assistant header);
    ``sampling.max_new_tokens`` caps each turn. Trajectories come back ordered by
    (prompt_index, sample_index). With ``sampling.seed`` set, turn k samples with seed
    ``seed + k * 1_000_003`` (the engine then mixes in the row index).
    """
    code_rx = re.compile(cfg.code_pattern, re.DOTALL)
    answer_rx = re.compile(cfg.answer_pattern, re.DOTALL)
    states = [_State(i, j, list(p)) for i, p in enumerate(prompts) for j in range(sampling.n)]
    for turn in range(cfg.max_turns):
        active = [s for s in states if s.finish is None]
        if not active:
            break
        seed = None if sampling.seed is None else sampling.seed + turn * 1_000_003
        comps = _generate(engine, active, prompts, sampling, cfg, turn, seed)
        to_run: list[tuple[_State, str]] = []
        for s, c in zip(active, comps):
            ids, logp = list(c.token_ids), list(c.logprobs)
            if len(ids) != len(logp):
                raise ValueError(
                    f"engine returned {len(ids)} tokens but {len(logp)} log-probs "
                    f"(prompt {s.prompt_index}, sample {s.sample_index}, turn {turn})"
                )
            s.turns += 1
            cut = _cut_after_code(tokenizer, ids, code_rx)
            if cut is not None:
                n, code = cut
                ids, logp = ids[:n], logp[:n]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            s.add(ids, logp, getattr(c, "version", None))
            if cut is not None:
                if answer_rx.search(text):
                    s.finish = "answer"  # still run it: the reference shows the output
                to_run.append((s, cut[1]))
            elif answer_rx.search(text):
                s.finish = "answer"
            else:
                s.void_turns += 1
                if cfg.mask_void_turns:
                    s.finish = "void"
                else:  # the reference's "no tool" observation: a newline, then go on
                    s.add(tokenizer.encode("\n", add_special_tokens=False), None)
        if to_run:
            prefix = _FINAL_ANSWER_FN if cfg.final_answer_function else ""
            results = sandbox.run_batch([prefix + code for _, code in to_run])
            if len(results) != len(to_run):
                raise ValueError(f"sandbox returned {len(results)} results for {len(to_run)} programs")
            for (s, _), res in zip(to_run, results):
                obs, failed = _observation_text(res, cfg)
                s.tool_calls += 1
                s.tool_errors += int(failed)
                s.tool_timeouts += int(bool(res.timed_out))
                s.add(observation_token_ids(tokenizer, obs, cfg)[: cfg.max_observation_tokens], None)
                if s.finish is None and answer_rx.search(res.stdout or ""):
                    s.finish = "answer"
        for s in active:
            budget = cfg.max_response_tokens
            if budget is not None and len(s.response) >= budget:
                del s.response[budget:], s.mask[budget:], s.logp[budget:], s.versions[budget:]
                s.finish = s.finish or "length"
    out = []
    for s in states:
        void_masked = cfg.mask_void_turns and s.void_turns > 0
        out.append(Trajectory(
            prompt_index=s.prompt_index, sample_index=s.sample_index, prompt_ids=s.prompt_ids,
            response_ids=s.response,
            loss_mask=[0] * len(s.mask) if void_masked else s.mask,
            rollout_logprobs=s.logp,
            response_text=tokenizer.decode(s.response, skip_special_tokens=True),
            turns=s.turns, tool_calls=s.tool_calls, tool_errors=s.tool_errors,
            tool_timeouts=s.tool_timeouts, void_turns=s.void_turns,
            finish_reason=s.finish or "max_turns",
            versions=list(s.versions) if s.versions and None not in s.versions else None,
        ))
    return out


def _generate(engine, active, prompts, sampling, cfg, turn, seed):
    """One engine call per distinct per-turn token cap; completions in ``active`` order."""
    if turn == 0:
        # All trajectories start at their prompt: one call with n samples per prompt, so
        # an engine can share each prompt's prefix across its samples.
        cap = sampling.max_new_tokens
        if cfg.max_response_tokens is not None:
            cap = min(cap, cfg.max_response_tokens)
        comps = engine.generate(
            [list(p) for p in prompts],
            dataclasses.replace(sampling, max_new_tokens=cap, seed=seed),
        )
        by_key = {(c.prompt_index, c.sample_index): c for c in comps}
        return [by_key[(s.prompt_index, s.sample_index)] for s in active]
    caps: dict[int, list[int]] = {}
    for k, s in enumerate(active):
        cap = sampling.max_new_tokens
        if cfg.max_response_tokens is not None:
            cap = min(cap, cfg.max_response_tokens - len(s.response))
        caps.setdefault(cap, []).append(k)
    out: list = [None] * len(active)
    for cap, rows in caps.items():
        comps = engine.generate(
            [active[k].prompt_ids + active[k].response for k in rows],
            dataclasses.replace(sampling, n=1, max_new_tokens=cap, seed=seed),
        )
        for c in comps:
            out[rows[c.prompt_index]] = c
    return out


def multiturn_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Per-batch means of the turn metadata (``multiturn/*``), for the trainer's log."""
    n = max(len(trajs), 1)
    calls = sum(t.tool_calls for t in trajs)
    m = {
        "multiturn/turns_mean": sum(t.turns for t in trajs) / n,
        "multiturn/tool_calls_mean": calls / n,
        "multiturn/tool_error_rate": sum(t.tool_errors for t in trajs) / max(calls, 1),
        "multiturn/tool_timeout_rate": sum(t.tool_timeouts for t in trajs) / max(calls, 1),
        "multiturn/void_turn_ratio": sum(t.void_turns > 0 for t in trajs) / n,
        "multiturn/response_tokens_mean": sum(len(t.response_ids) for t in trajs) / n,
        "multiturn/loss_tokens_mean": sum(sum(t.loss_mask) for t in trajs) / n,
    }
    for reason in ("answer", "max_turns", "length", "void"):
        m[f"multiturn/finish_{reason}"] = sum(t.finish_reason == reason for t in trajs) / n
    return m
