"""Generate GSM-style word problems offline: ``python make_data.py --out DIR [--n 200]``.

Two-step arithmetic stories with integer answers (``{"prompt": ..., "answer": ...}`` per
line), seeded; the prompt asks for the final answer in ``\\boxed{}`` so math-verify can
score it. Writes ``train.jsonl`` and ``eval.jsonl`` (refuses to overwrite either).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "stamps"]
SUFFIX = " Put the final answer in \\boxed{}."


def problem(rng: random.Random) -> dict[str, str]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(1, 10)
    kind = rng.randrange(3)
    if kind == 0:
        text = (f"{name} has {a} {item}. {other} gives {name} {b} more, and then {name} gives away "
                f"{min(c, a + b)}. How many {item} does {name} have now?")
        ans = a + b - min(c, a + b)
    elif kind == 1:
        text = (f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} "
                f"have in total?")
        ans = a * b
    else:
        text = (f"{name} has {a * c} {item} and shares them equally among {c} friends. How many "
                f"{item} does each friend get?")
        ans = a
    return {"prompt": text + SUFFIX, "answer": str(ans)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--n", type=int, default=200, help="training problems (default 200; eval: n / 4)")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    if ns.n < 4:
        p.error(f"--n must be >= 4, got {ns.n}")
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(ns.seed)
    for name, n in (("train.jsonl", ns.n), ("eval.jsonl", ns.n // 4)):
        path = out / name
        if path.exists():
            print(f"[smollm2_cpu] {path} exists; keeping it", flush=True)
            continue
        tmp = path.with_suffix(".part")
        tmp.write_text("".join(json.dumps(problem(rng)) + "\n" for _ in range(n)))
        tmp.rename(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
