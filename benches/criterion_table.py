#!/usr/bin/env python3
"""Prints criterion's latest estimates (target/criterion) as a table: one row per benchmark,
one column per input size. Usage: benches/criterion_table.py [group]"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"
group = sys.argv[1] if len(sys.argv) > 1 else "catalog"


def fmt(ns):
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.1f} ns"


rows = {}
for est in sorted((root / group).glob("*/*/new/estimates.json")):
    bench, size = est.parts[-4], est.parts[-3]
    rows.setdefault(bench, {})[size] = json.loads(est.read_text())["median"]["point_estimate"]
sizes = sorted({s for r in rows.values() for s in r}, key=lambda s: int(s) if s.isdigit() else 0)
print("| benchmark | " + " | ".join(sizes) + " |")
print("|---|" + "---|" * len(sizes))
for bench, r in rows.items():
    print(f"| {bench} | " + " | ".join(fmt(r[s]) if s in r else "" for s in sizes) + " |")
