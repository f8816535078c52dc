#!/usr/bin/env bash
# Run a list of bench runs one after another, each resumable, and archive each finished run's
# summary into the repository (benchmarks/results/), so a figure survives the machine it ran on.
#
#   bash benchmarks/queue.sh LIST OUT_DIR ARCHIVE_DIR
#
# LIST holds one run per line: a name, then the arguments of `fedcodec run` (without --out, --name,
# --resume); '#' starts a comment. Each run goes to OUT_DIR/<name>/<method>/ with --resume, so the
# same command carries on where a stopped queue left off (a resumed run is bit-identical to an
# uninterrupted one). A finished run's metrics.json is trimmed by benchmarks/archive_run.py into
# ARCHIVE_DIR/<name>.run.json (e.g. benchmarks/results/fmnist-iid,
# which `fedcodec frontier --from` reads). Run two queues side by side on a 2-core machine, one torch thread
# each (--threads 1 in the list), and stop a queue by killing this script before its python child.
#
# Example list line:
#   fedpm3-iid-s1  --preset bench --partition iid --method fedpm-ec --local-epochs 3 --seed 1 --threads 1
set -uo pipefail
list=${1:?usage: queue.sh LIST OUT_DIR ARCHIVE_DIR}
out=${2:?usage: queue.sh LIST OUT_DIR ARCHIVE_DIR}
archive=${3:?usage: queue.sh LIST OUT_DIR ARCHIVE_DIR}
here="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
while read -r name args; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  if [ -e "$archive/$name.run.json" ]; then
    echo "[queue] $name: archived already, skipped"; continue
  fi
  echo "[queue] $(date -u +%FT%TZ) $name: fedcodec run $args"
  # shellcheck disable=SC2086
  if PYTHONPATH="$here" python3 -c "import sys; from fedcodec.cli import main; sys.exit(main())" \
      run $args --out "$out" --name "$name" --resume; then
    for m in "$out/$name"/*/metrics.json; do
      python3 "$here/benchmarks/archive_run.py" "$m" "$archive/$name.run.json" \
        --command "fedcodec run $args" --commit "$(git -C "$here" rev-parse --short HEAD)"
    done
  else
    echo "[queue] $name failed (exit $?)"
  fi
done < "$list"
echo "[queue] $(date -u +%FT%TZ) done"
