"""Compares two kosoku (Autobahn) reports case by case: the machine alone, and the machine
through tern. Prints each case whose outcome differs and a summary; exits 1 on any difference."""

import json
import sys


def outcomes(path):
    with open(path) as f:
        report = json.load(f)
    (agent,) = report.values()
    return {case: (r["behavior"], r["behaviorClose"]) for case, r in agent.items()}


def key(case):
    return [int(p) for p in case.split(".")]


direct, proxied = outcomes(sys.argv[1]), outcomes(sys.argv[2])
different = [c for c in sorted(direct, key=key) if direct[c] != proxied.get(c)]
for c in different:
    print(f"  {c}: machine alone {direct[c]}, through tern {proxied.get(c)}")
ok = sum(1 for c in direct if direct[c][0] in ("OK", "INFORMATIONAL", "NON-STRICT"))
print(
    f"kosoku: {len(direct)} cases; machine alone {ok} passed, "
    f"through tern {sum(1 for c in proxied.values() if c[0] in ('OK', 'INFORMATIONAL', 'NON-STRICT'))} passed; "
    f"{len(different)} differ"
)
sys.exit(1 if different else 0)
