#!/bin/bash
# usage: rerun.sh NAME EVAL-ARGS...   re-runs the seven CIFAR-10 cases of the committed results
# with `fire-repair eval ... EVAL-ARGS` (same cached models, split and seed; runs/NAME-ATTACK/),
# lays them over the results with `report --update` and keeps their logs as run-NAME.log.
set -e
cd "$(dirname "$0")/../../.."
name=$1
shift
for spec in badnets blended sig:0.05 wanet::s=2.0 trojan adaptive moving; do
  IFS=: read attack rate param <<< "$spec"
  extra=()
  [ -n "$rate" ] && extra+=(--rate "$rate")
  [ -n "$param" ] && extra+=(--attack-param "$param")
  OMP_NUM_THREADS=1 fire-repair eval --data cifar10 --data-path /tmp/data --model cnn --width 32 --epochs 6 \
    --n-eval 2000 --n-clean-holdout 2000 --quiet --attack "$attack" "${extra[@]}" "$@" \
    --out runs/$name-$attack > runs/$name-$attack.log 2>&1
done
R=benchmarks/results
fire-repair report $R/cifar10-jpeg-cnn32/results.json \
  --update runs/$name-{badnets,blended,sig,wanet,trojan,adaptive}/results.json --out $R/cifar10-jpeg-cnn32 > /dev/null
fire-repair report $R/cifar10-jpeg-cnn32-positions/results.json \
  --update runs/$name-moving/results.json --out $R/cifar10-jpeg-cnn32-positions > /dev/null
cat runs/$name-{badnets,blended,sig,wanet,trojan,adaptive}.log > $R/cifar10-jpeg-cnn32/run-$name.log
cp runs/$name-moving.log $R/cifar10-jpeg-cnn32-positions/run-$name.log
