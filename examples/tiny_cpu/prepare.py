"""Build the tiny CPU example's assets offline: tokenizer, task data, model, warm-up.

    python examples/tiny_cpu/prepare.py --out runs/tiny_cpu-assets

Writes (atomically, into a folder this script owns):

* ``model/``: a real Hugging Face Qwen2 checkpoint (``config.json``, ``model.safetensors``)
  with a real ``PreTrainedTokenizerFast`` (character-level, Qwen-style chat template with
  ``<|im_start|>`` / ``<|im_end|>``), so the trainer loads it through the same
  ``AutoTokenizer`` / ``apply_chat_template`` / HF -> Megatron path as a real model;
* ``train.jsonl`` / ``eval.jsonl``: the task, ``{"prompt": "7+5=?", "answer": "12"}``
  (all 100 sums of two digits for training, 20 of them for evaluation).

The answer format is ``\\boxed{N}``. **Warm-up (stated, as the example allows):** a
randomly initialised model knows nothing, not even the format, so a brief supervised
warm-up on the same task teaches it the format and a little of the sums: it stops as soon
as the mean probability of the correct answer over the training prompts reaches
``--warmup-target`` (default 0.15), i.e. the RL run starts from a policy whose sampled
accuracy is about 15 %. Everything is seeded; the script is deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOXED = "\\boxed{"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer split (digits one by one, words, punctuation runs, newlines).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
STAMP = ".tiny-cpu-assets"


def build_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer in Qwen2's format, trained on the task's own text.

    Same pipeline as Qwen2's (NFC, Qwen2's split regex, byte-level), so transformers loads
    it as a ``Qwen2Tokenizer`` exactly like a real Qwen checkpoint's.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


TASKS = ("sums", "sum3-mod10")


def task_rows(task: str = "sums") -> tuple[list[dict], list[dict]]:
    """``sums``: the 55 sums a+b <= 9 of two digits (train) and every third of them (eval).
    ``sum3-mod10``: the last digit of a sum of three digits, ``(a+b+c)%10=?``, all 1000
    (train) and every 20th (eval): more prompts than a 50-step run of 16 prompts sees, and
    an answer no single digit of the prompt gives away (the harder task for the study)."""
    if task == "sum3-mod10":
        train = [{"prompt": f"({a}+{b}+{c})%10=?", "answer": str((a + b + c) % 10)}
                 for a in range(10) for b in range(10) for c in range(10)]
        return train, train[::20]
    if task != "sums":
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    train = [{"prompt": f"{a}+{b}=?", "answer": str(a + b)} for a in range(10) for b in range(10 - a)]
    return train, train[::3]


def _encode(tokenizer, prompt: str, answer: str):
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    resp = tokenizer(BOXED + answer + "}", add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    return ids, resp


def warm_up(model, tokenizer, rows, *, p_correct: float, lr: float, max_steps: int, seed: int):
    """Supervised steps with soft labels on the answer digit (see the module docstring).

    The target of the answer's digit token is ``p_correct`` on the right digit and the rest
    spread evenly over the nine others; format tokens have hard targets. Stops when the
    right digit is the most likely one for every prompt and its mean probability is
    within 0.02 of ``p_correct`` (or after ``max_steps``). Returns (steps, mean p, modal).
    """
    import torch

    torch.manual_seed(seed)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    seqs = [_encode(tokenizer, r["prompt"], r["answer"]) for r in rows]
    width = max(len(p) + len(r) for p, r in seqs)
    n = len(seqs)
    ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width - 1))
    digit_pos = torch.zeros(n, dtype=torch.long)  # label position of the answer digit
    answer = torch.tensor([int(r["answer"]) for r in rows])
    k = len(tokenizer(BOXED, add_special_tokens=False)["input_ids"])
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
        digit_pos[i] = len(p) + k - 1  # label index whose target is the answer digit
        assert int(ids[i, digit_pos[i] + 1]) == digits[int(answer[i])], "answer digit not where expected"
    soft = torch.full((n, 10), (1.0 - p_correct) / 9.0)
    soft[torch.arange(n), answer] = p_correct
    labels = ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    digit_t = torch.tensor(digits)

    def digit_probs(logits):
        return torch.softmax(logits[torch.arange(n), digit_pos][:, digit_t].float(), -1)

    steps, p_mean, modal = 0, 0.0, 0.0
    for steps in range(1, max_steps + 1):
        logits = model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1)
        hard = -logp.gather(-1, labels[..., None]).squeeze(-1)
        hard_mask = mask.clone()
        hard_mask[torch.arange(n), digit_pos] = 0.0
        soft_ce = -(soft * logp[torch.arange(n), digit_pos][:, digit_t]).sum(-1)
        loss = ((hard * hard_mask).sum() + soft_ce.sum()) / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            probs = digit_probs(logits.detach())
            p_mean = float(probs[torch.arange(n), answer].mean())
            modal = float((probs.argmax(-1) == answer).float().mean())
        if modal == 1.0 and abs(p_mean - p_correct) < 0.02:
            break
    return steps, p_mean, modal


def build(
    out: Path, *, seed: int, target: float, layers: int, hidden: int, warmup_max_steps: int = 3000,
    heads: int = 4, kv_heads: int = 2, task: str = "sums",
) -> dict:
    """Write the assets into ``out`` (an existing folder); ``warmup_max_steps`` caps the warm-up.

    ``heads`` / ``kv_heads``: attention heads (head size ``hidden / heads``). The default
    (16 at hidden 64) is the main job's; vLLM's CPU attention needs a head size of at least
    32 (``--heads 2``), which the vLLM tests use."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must be a multiple of heads {heads}, and heads of "
                         f"kv_heads {kv_heads}")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one-shard save of a 0.1 MB model: no bar needed

    train, evals = task_rows(task)
    corpus = [
        f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{BOXED}{r['answer']}}}<|im_end|>\n"
        for r in train
    ] + ["Please reason step by step, and put your final answer within \\boxed{}."]
    tokenizer = build_tokenizer(corpus)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    steps, p, modal = warm_up(
        model, tokenizer, train, p_correct=target, lr=3e-3, max_steps=warmup_max_steps, seed=seed
    )
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(out / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    info = dict(task=task, seed=seed, warmup_steps=steps, warmup_mean_p_correct=p, warmup_modal_fraction=modal,
                layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads)
    (out / STAMP).write_text(json.dumps(info) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to create (refused if it exists and is not ours)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and warm-up (default 0)")
    p.add_argument("--warmup-target", type=float, default=0.2,
                   help="soft-label probability of the right digit in the warm-up (default 0.2)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--heads", type=int, default=4,
                   help="attention heads (default 4: head size 16; vLLM's CPU attention needs "
                        ">= 32, i.e. --heads 2 at hidden 64)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    p.add_argument("--task", default="sums", choices=TASKS,
                   help="sums (the main job's) or sum3-mod10 (the study's harder task; default sums)")
    p.add_argument("--warmup-max-steps", type=int, default=3000,
                   help="cap on the warm-up's steps (default 3000)")
    ns = p.parse_args(argv)
    if ns.warmup_max_steps < 1:
        p.error(f"--warmup-max-steps must be >= 1, got {ns.warmup_max_steps}")
    if not 0 < ns.warmup_target < 1:
        p.error(f"--warmup-target must be in (0, 1), got {ns.warmup_target}")
    if ns.heads < 1 or ns.kv_heads < 1 or ns.hidden % ns.heads or ns.heads % ns.kv_heads:
        p.error(f"--hidden {ns.hidden} must be a multiple of --heads {ns.heads}, and --heads of "
                f"--kv-heads {ns.kv_heads}")
    out = Path(ns.out).resolve()
    if out.exists():
        if (out / STAMP).is_file():
            print(f"[tiny_cpu] assets already in {out} (delete the folder to rebuild)", flush=True)
            return 0
        print(f"error: --out {out} exists and was not written by this script; choose another path",
              file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[tiny_cpu] building tokenizer, task and model; warming up to p(correct) >= "
          f"{ns.warmup_target} ...", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        info = build(tmp, seed=ns.seed, target=ns.warmup_target, layers=ns.layers, hidden=ns.hidden,
                     heads=ns.heads, kv_heads=ns.kv_heads, warmup_max_steps=ns.warmup_max_steps, task=ns.task)
        os.rename(tmp, out)  # atomic; fails if --out appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[tiny_cpu] assets in {out}: warm-up {info['warmup_steps']} steps, right digit most likely for "
          f"{info['warmup_modal_fraction']:.0%} of prompts, mean p(correct) "
          f"{info['warmup_mean_p_correct']:.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
