"""Compare two decision digests: exact equality, and the largest float difference."""

import json
import sys
from pathlib import Path

a, b = json.loads(Path(sys.argv[1]).read_text()), json.loads(Path(sys.argv[2]).read_text())
maxd = [0.0]


def close(x, y):
    if isinstance(x, float) and isinstance(y, float):
        if x != y:
            maxd[0] = max(maxd[0], abs(x - y))
        return x == y or abs(x - y) <= 1e-12
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all([close(p, q) for p, q in zip(x, y, strict=False)])
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all([close(x[k], y[k]) for k in x])
    return x == y


for k in a:
    da, db = a[k]["decisions"], b[k]["decisions"]
    meta = {kk: (a[k][kk], b[k].get(kk)) for kk in a[k] if kk != "decisions"}
    exact = sum(1 for x, y in zip(da, db, strict=False) if x == y)
    bad = [i for i, (x, y) in enumerate(zip(da, db, strict=False)) if not close(x, y)]
    print(k, meta, "n", len(da), len(db), "exact", exact, "mismatch(>1e-12)", len(bad), bad[:5])
    for i in bad[:2]:
        for j, (x, y) in enumerate(zip(da[i], db[i], strict=False)):
            if not close(x, y):
                print("  field", j, str(x)[:400], "\n   vs", str(y)[:400])
print("max abs float diff", maxd[0])
