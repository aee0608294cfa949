"""The per-position estimator's `touched` share on CIFAR-10's trigger token (per position only,
the harness's pairs): `OMP_NUM_THREADS=1 python .../touched.py 0.1` (model cached)."""
import sys

from fire_eval import harness

t = float(sys.argv[1])
base = harness.estimator


def patched(model, layers, cfg, form, **kw):
    if form == "per_position":
        kw.setdefault("touched", t)
    est = base(model, layers, cfg, form, **kw)
    assert form != "per_position" or est.touched == t
    return est
harness.estimator = patched  # the harness passes no `touched`; this wraps its estimator factory
cfg = harness.RunConfig(attack="token", model="vit", data="cifar10", data_path="/tmp/data", epochs=20, n_eval=2000,
                        n_clean_holdout=2000, forms=["per_position"], defenses=["none", "fire"], ablations=False,
                        online=False, pair_draws=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
res = harness.run(cfg, progress=False, log=print)
r = next(r for r in res["rows"] if r["defense"] == "fire")
print("touched", t, "->", r["layers"], r["mode"], r["tau_quantile"], r["alpha"])
