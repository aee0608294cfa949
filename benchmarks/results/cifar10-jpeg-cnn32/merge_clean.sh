#!/bin/bash
# Adds the clean-model reference rows (the same recipe trained without poison: ASR floor, PA
# ceiling) to the committed CIFAR-10 results; same cached models, split and seed.
set -e
cd "$(dirname "$0")/../../.."
for spec in badnets blended sig:0.05 wanet::s=2.0 trojan adaptive moving; do
  IFS=: read attack rate param <<< "$spec"
  extra=()
  [ -n "$rate" ] && extra+=(--rate "$rate")
  [ -n "$param" ] && extra+=(--attack-param "$param")
  fire-repair eval --data cifar10 --data-path /tmp/data --model cnn --width 32 --epochs 6 --n-eval 2000 \
    --n-clean-holdout 2000 --quiet --attack "$attack" "${extra[@]}" --defenses none clean-model \
    --no-online --no-ablations --out runs/cm-$attack > runs/cm-$attack.log 2>&1
done
R=benchmarks/results
fire-repair report $R/cifar10-jpeg-cnn32/results.json \
  --update runs/cm-{badnets,blended,sig,wanet,trojan,adaptive}/results.json --out $R/cifar10-jpeg-cnn32 > /dev/null
fire-repair report $R/cifar10-jpeg-cnn32-positions/results.json \
  --update runs/cm-moving/results.json --out $R/cifar10-jpeg-cnn32-positions > /dev/null
cat runs/cm-{badnets,blended,sig,wanet,trojan,adaptive}.log > $R/cifar10-jpeg-cnn32/run-clean-model.log
cat runs/cm-moving.log > $R/cifar10-jpeg-cnn32-positions/run-clean-model.log
