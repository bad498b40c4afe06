#!/usr/bin/env python3
"""Prints the markdown tables of docs/RESULTS.md from the runs' summary.txt files.

Usage: python3 scripts/results/tables.py [runs-dir]
Each run directory's summary.txt starts with `desirable_rate base=<a> sft=<x> kto=<y>[ dpo=<z>]`.
"""
import re
import statistics
import sys
from pathlib import Path

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")


def summary(name):
    """The numbers of run `name` as a dict, or None when the run is missing."""
    path = RUNS / name / "summary.txt"
    if not path.is_file():
        return None
    line = path.read_text().splitlines()[0]
    return {k: (None if v == "skipped" else float(v)) for k, v in re.findall(r"(\w+)=(\S+)", line)}


def seeds():
    found = sorted(int(m.group(1)) for p in RUNS.glob("e1-seed*")
                   if (m := re.fullmatch(r"e1-seed(\d+)", p.name)) and (p / "summary.txt").is_file())
    return found


def table(title, columns):
    """columns: (header, run prefix, field); one row per seed plus mean ± sd."""
    print(f"\n### {title}\n")
    print("| seed | " + " | ".join(h for h, _, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    values = {h: [] for h, _, _ in columns}
    for s in seeds():
        cells = []
        for header, prefix, field in columns:
            run = summary(f"{prefix}-seed{s}")
            v = run.get(field) if run else None
            if v is None:
                cells.append("–")
            else:
                values[header].append(v)
                cells.append(f"{v:.3f}")
        print(f"| {s} | " + " | ".join(cells) + " |")
    cells = []
    for header, _, _ in columns:
        vs = values[header]
        if not vs:
            cells.append("–")
        elif len(vs) == 1:
            cells.append(f"**{vs[0]:.3f}**")
        else:
            cells.append(f"**{statistics.mean(vs):.3f}** ± {statistics.stdev(vs):.3f}")
    print("| **mean ± sd** | " + " | ".join(cells) + " |")


table("1. SFT vs SFT+KTO vs SFT+DPO (the default run)", [
    ("base", "e1", "base"), ("SFT", "e1", "sft"), ("SFT+KTO", "e1", "kto"),
    ("SFT+DPO", "e1", "dpo"), ("SFT ×3 steps (control)", "control-sft450", "sft")])
table("2. KTO with 90% of the desirable examples discarded vs DPO on all the data", [
    ("SFT (start)", "e1", "sft"), ("KTO, 10% desirable", "e2-desirable0.1", "kto"),
    ("KTO, all data", "e1", "kto"), ("DPO, all data", "e1", "dpo")])
table("3. KTO straight from the base model (no SFT)", [
    ("base", "e3-nosft", "base"), ("KTO from base", "e3-nosft", "kto"),
    ("DPO from base", "e3-nosft", "dpo"), ("SFT", "e1", "sft"), ("SFT+KTO", "e1", "kto")])
table("4. Plentiful demonstrations (SFT on ≈2 700 correct lines instead of ≈140)", [
    ("SFT", "e4-sft4000", "sft"), ("SFT+KTO", "e4-sft4000", "kto"),
    ("SFT+DPO", "e4-sft4000", "dpo")])
table("5. Knobs (all from the default SFT model)", [
    ("SFT+KTO (default)", "e1", "kto"), ("β=0.1 KTO", "e5-beta0.1", "kto"),
    ("β=0.1 DPO", "e5-beta0.1", "dpo"), ("lr 1e-4 KTO", "e5-lr1e-4", "kto"),
    ("lr 1e-4 DPO", "e5-lr1e-4", "dpo"), ("KTO all samples", "e5-allsamples", "kto"),
    ("KTO λ_U=0", "e5-lambdaU0", "kto")])
