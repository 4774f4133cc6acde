"""Prompt datasets and the sampler that walks them, epoch by epoch, resumably.

A dataset file is JSONL (one ``{"prompt": ..., "answer": ...}`` object per line) or
Parquet with the same two columns; nothing is downloaded. ``prompt`` is the user
message (the trainer applies the tokenizer's chat template); ``answer`` is what the
reward compares against. Errors name the file, the line / row and the field.

:class:`PromptSampler` visits every prompt once per epoch in a seeded order (a fresh
permutation per epoch) and crosses epoch boundaries inside a batch, so a run never
trains 0 steps at an epoch boundary; its ``state_dict`` (epoch, position) is saved in
checkpoints and restores the exact continuation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PromptDataset", "PromptSampler"]


@dataclasses.dataclass(frozen=True, slots=True)
class PromptDataset:
    """Rows of ``{"prompt": str, "answer": str}`` read from one file."""

    path: Path
    prompts: tuple[str, ...]
    answers: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_file(cls, path: str | Path) -> "PromptDataset":
        """Read JSONL (``.jsonl``, ``.json``) or Parquet (``.parquet``); ValueError on bad rows."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"prompt data {path}: no such file")
        rows: list[tuple[Any, Any, str]] = []
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:  # pragma: no cover - pyarrow is a dependency
                raise ValueError(f"prompt data {path}: reading Parquet needs pyarrow") from None
            try:
                table = pq.read_table(path)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"prompt data {path}: not a readable Parquet file ({e})") from None
            for col in ("prompt", "answer"):
                if col not in table.column_names:
                    raise ValueError(
                        f"prompt data {path}: no column {col!r} (columns: {table.column_names})"
                    )
            for i, (p, a) in enumerate(zip(table["prompt"].to_pylist(), table["answer"].to_pylist())):
                rows.append((p, a, f"row {i}"))
        elif path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"prompt data {path}:{n}: invalid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise ValueError(f"prompt data {path}:{n}: expected an object with prompt, answer")
                    rows.append((obj.get("prompt"), obj.get("answer"), f"line {n}"))
        else:
            raise ValueError(
                f"prompt data {path}: unknown format {path.suffix!r}; expected .jsonl or .parquet"
            )
        prompts, answers = [], []
        for p, a, where in rows:
            if not isinstance(p, str) or not p:
                raise ValueError(f"prompt data {path} {where}: `prompt` must be a non-empty string, got {p!r}")
            if a is None or isinstance(a, (dict, list)):
                raise ValueError(f"prompt data {path} {where}: `answer` must be a string or number, got {a!r}")
            prompts.append(p)
            answers.append(str(a))
        if not prompts:
            raise ValueError(f"prompt data {path}: no rows")
        return cls(path, tuple(prompts), tuple(answers))


class PromptSampler:
    """Seeded epoch-wise order over ``n`` prompts; see the module docstring."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"PromptSampler needs at least one prompt, got n={n}")
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self, k: int) -> list[int]:
        """The next ``k`` prompt indices (crossing into the next epoch when needed)."""
        out: list[int] = []
        while len(out) < k:
            order = self._order(self.epoch)
            take = min(k - len(out), self.n - self.position)
            out += order[self.position : self.position + take].tolist()
            self.position += take
            if self.position == self.n:
                self.epoch += 1
                self.position = 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n") != self.n:
            raise ValueError(
                f"the checkpoint's prompt sampler walked {state.get('n')} prompts but the data has "
                f"{self.n}; resume with the same --rl-prompt-data"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
