#!/usr/bin/env bash
# Issue 7: the bench setting (Fashion-MNIST IID, CNN4, 100 clients, 10/round, 2 local epochs, 30 rounds)
# with 30% of the sampled clients dropping out every round. Compare with runs/bench/fmnist-iid.
set -euo pipefail
out=${OUT:-runs/bench}
fedcodec run --preset bench --partition iid --method fedmrn-binary --set dropout=0.3 \
  --out "$out" --name fmnist-iid-dropout30 --no-progress "$@"
