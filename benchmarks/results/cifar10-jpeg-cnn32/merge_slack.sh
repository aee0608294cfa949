#!/bin/bash
# Re-runs the paired FIRE rows with agreement_slack=1 (the default since 2026-11-23) and lays
# them over the committed CIFAR-10 results; same cached models, split and seed.
set -e
cd "$(dirname "$0")/../../.."
for spec in badnets blended sig:0.05 wanet::s=2.0 trojan adaptive moving; do
  IFS=: read attack rate param <<< "$spec"
  extra=()
  [ -n "$rate" ] && extra+=(--rate "$rate")
  [ -n "$param" ] && extra+=(--attack-param "$param")
  OMP_NUM_THREADS=1 fire-repair eval --data cifar10 --data-path /tmp/data --model cnn --width 32 --epochs 6 \
    --n-eval 2000 --n-clean-holdout 2000 --quiet --attack "$attack" "${extra[@]}" --agreement-slack 1 \
    --defenses none fire fire-clamp fire-gated --out runs/slack-$attack > runs/slack-$attack.log 2>&1
done
R=benchmarks/results
fire-repair report $R/cifar10-jpeg-cnn32/results.json \
  --update runs/slack-{badnets,blended,sig,wanet,trojan,adaptive}/results.json --out $R/cifar10-jpeg-cnn32 > /dev/null
fire-repair report $R/cifar10-jpeg-cnn32-positions/results.json \
  --update runs/slack-moving/results.json --out $R/cifar10-jpeg-cnn32-positions > /dev/null
cat runs/slack-{badnets,blended,sig,wanet,trojan,adaptive}.log > $R/cifar10-jpeg-cnn32/run-slack.log
cp runs/slack-moving.log $R/cifar10-jpeg-cnn32-positions/run-slack.log
