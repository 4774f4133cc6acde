"""Side-by-side table of two SmolLM2 runs (examples/smollm2_cpu/compare.sh): reward, the
importance-ratio tail and the KL, first/last step and over the run.

    python examples/smollm2_cpu/compare_table.py GRPO/metrics.jsonl SEQALP/metrics.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = (("critic/score/mean", "reward"), ("is_ratio/q999", "ratio q99.9"), ("is_ratio/max", "ratio max"),
        ("actor/ppo_kl", "ppo_kl"), ("rollout_corr/k3_kl", "rollout k3 KL"),
        ("rollout_corr/abs_logp_diff_max", "max |dlogp|"), ("timing_s/step", "s / step"))


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summary(rs: list[dict], key: str) -> str:
    v = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
    if not v:
        return "n/a"
    last5 = v[-5:]
    return f"{v[0]:.3g} / {sum(last5) / len(last5):.3g} / {max(v):.3g}"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: compare_table.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl ...", file=sys.stderr)
        return 2
    runs = {}
    for p in argv:
        if not Path(p).is_file():
            print(f"error: {p}: no such metrics file", file=sys.stderr)
            return 2
        runs[Path(p).parent.name] = rows(p)
    print("| metric (first / mean of last 5 / max over the run) | " + " | ".join(runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for key, label in KEYS:
        print(f"| {label} (`{key}`) | " + " | ".join(summary(rs, key) for rs in runs.values()) + " |")
    print("| steps | " + " | ".join(str(len(rs)) for rs in runs.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
