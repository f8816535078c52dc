"""Keep a finished run's summary in the repository: ``metrics.json`` trimmed to what a table or a
frontier needs, plus where it came from.

    python benchmarks/archive_run.py RUN/<method>/metrics.json benchmarks/results/<setting>/<name>.run.json \
        --command "fedcodec run ..." --commit abc1234

The written file keeps the run's ``config`` and ``summary`` as the run wrote them, and per round only
``round``, ``accuracy``, ``train_loss``, ``uplink_bytes``, ``downlink_bytes``, ``clients``, ``accepted``,
``rejected`` and ``clipped`` (a 30-round bench run: about 6 kB instead of 100 kB), under ``archived``
the command and commit. ``fedcodec frontier --from benchmarks/results/<setting>`` reads such files
(``*.run.json``) like run folders, so a figure can be rebuilt after the machine that ran it is gone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedcodec.files import read_bounded  # noqa: E402
from fedcodec.frontier import MAX_METRICS_BYTES, read_run  # noqa: E402
from fedcodec.report import atomic_write_text  # noqa: E402

KEEP = ("round", "accuracy", "train_loss", "uplink_bytes", "downlink_bytes", "clients", "accepted", "rejected",
        "clipped")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="a finished run's <method>/metrics.json")
    p.add_argument("dest", help="the archive file to write, ending in .run.json")
    p.add_argument("--command", required=True, help="the command that made the run")
    p.add_argument("--commit", required=True, help="the commit it ran at")
    args = p.parse_args(argv)
    if not args.dest.endswith(".run.json"):
        p.error("the archive file's name must end in .run.json (that is what frontier --from looks for)")
    read_run(Path(args.metrics).parent)  # refuses a file that is not a finished fedcodec run
    doc = json.loads(read_bounded(Path(args.metrics), MAX_METRICS_BYTES, "run metrics"))
    out = {"config": doc["config"], "summary": doc["summary"],
           "rounds": [{k: r[k] for k in KEEP if k in r} for r in doc.get("rounds", [])],
           "archived": {"command": args.command, "commit": args.commit}}
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"[archive] {dest} ({dest.stat().st_size:,} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
