#!/usr/bin/env bash
# The foundation benchmark: FedAvg vs FedMRN (binary, signed) on Fashion-MNIST, CNN4,
# 100 clients, 10 per round, 2 local epochs, batch 64, 30 rounds; IID and Dirichlet(0.3).
# About an hour on a 2-core CPU. Results land in runs/bench/fmnist-{iid,dirichlet}/.
set -euo pipefail
out=${OUT:-runs/bench}
for part in iid dirichlet; do
  fedcodec run --preset bench --partition "$part" --beta 0.3 \
    --method fedavg,fedmrn-binary,fedmrn-signed --out "$out" --name "fmnist-$part" --no-progress
done
