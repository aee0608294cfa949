#!/bin/bash
# Lays this session's re-runs over the committed CIFAR-10 results (same cached models, split, seed).
set -e
cd "$(dirname "$0")/../../.."
# the unpaired-only runs' AUROC follows their own headline (fire-unpaired): keep the paired one
for a in badnets blended sig wanet trojan adaptive moving; do
  .venv/bin/python - "$a" <<'PY'
import json, sys
a = sys.argv[1]
r = json.load(open(f"runs/unp-{a}/results.json"))
for run in r["runs"]:
    for key in ("auroc", "online", "ablations"):
        run.pop(key, None)
json.dump(r, open(f"runs/unp-{a}/update.json", "w"))
PY
done
R=benchmarks/results
.venv/bin/fire-repair report $R/cifar10-jpeg-cnn32/results.json \
  --update runs/tau4-{badnets,blended,sig,wanet,trojan,adaptive}/results.json runs/unp-{badnets,blended,sig,wanet,trojan,adaptive}/update.json \
  --out $R/cifar10-jpeg-cnn32 > /dev/null
.venv/bin/fire-repair report $R/cifar10-jpeg-cnn32-positions/results.json \
  --update runs/tau4-moving/results.json runs/unp-moving/update.json --out $R/cifar10-jpeg-cnn32-positions > /dev/null
for a in badnets blended sig wanet trojan adaptive; do cat runs/tau4-$a.log runs/unp-$a.log; done > $R/cifar10-jpeg-cnn32/run-tau.log
cat runs/tau4-moving.log runs/unp-moving.log > $R/cifar10-jpeg-cnn32-positions/run-tau.log
