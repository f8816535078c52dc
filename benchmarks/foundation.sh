#!/usr/bin/env bash
# The foundation benchmark: FedAvg vs FedMRN (binary, signed) on Fashion-MNIST, CNN4,
# 100 clients, 10 per round, 2 local epochs, batch 64, 30 rounds; IID and Dirichlet(0.3).
# Each (partition, method) is its own single-thread process, JOBS at a time (default: the core count);
# a method's run depends only on its config and seed, so this equals running them in sequence.
# About 90 CPU-minutes. Results: runs/bench/fmnist-{iid,dirichlet}/{results.md,plot.png}.
set -euo pipefail
out=${OUT:-runs/bench}
jobs=${JOBS:-$(nproc)}
for part in iid dirichlet; do
  for method in fedavg fedmrn-binary fedmrn-signed; do
    echo "fedcodec run --preset bench --partition $part --beta 0.3 --method $method --threads 1 \
--out $out --name fmnist-$part --no-progress"
  done
done | xargs -P "$jobs" -I{} sh -c '{} > /dev/null'
for part in iid dirichlet; do
  fedcodec report "$out/fmnist-$part"
done
