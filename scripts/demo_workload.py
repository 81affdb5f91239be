"""Assemble the demo workload for `thrifty simulate` from ../shared/data and public packages.

    .venv/bin/python scripts/demo_workload.py --requests 100000 --out workload/
    .venv/bin/thrifty simulate --traffic workload/traffic.jsonl --settings workload/candidate.yaml \
        --outputs ../shared/data/routing/zeroeval --svg workload/stack.svg

Writes traffic.jsonl (the mix is in thrifty/simulate/workload.py and the README), candidate.yaml
(every savings layer on) and current.yaml (every request on its model, nothing else).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from thrifty.simulate.workload import build_workload, demo_settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("workload"))
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = build_workload(args.out / "traffic.jsonl", args.requests, shared=args.shared, seed=args.seed)
    outputs = [str(Path(o).resolve()) for o in work.outputs]
    for name, candidate in (("candidate.yaml", True), ("current.yaml", False)):
        (args.out / name).write_text(
            yaml.safe_dump(demo_settings(outputs, candidate=candidate), sort_keys=False)
        )
    print(f"{args.out / 'traffic.jsonl'}: {work.description}")


if __name__ == "__main__":
    main()
