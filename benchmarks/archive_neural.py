"""Keep a learned-compression study's results in the repository, without its trained codecs.

    python benchmarks/archive_neural.py runs/neural/clusters-n100 benchmarks/results/neural/clusters-n100 \
        --command "fedcodec neural train ..." --commit abc1234

Copies every unit's ``n<N>/seed<S>/results.json`` and ``results.md`` (a few kB each; the
``codec.safetensors`` files stay behind) and the study's ``study.md``, and writes ``ARCHIVED.md`` with
the command and commit. ``fedcodec neural study benchmarks/results/neural/<study> --out DIR`` reads the
copies like the original folder, so the study's tables and plots can be rebuilt after the machine that
trained it is gone. A unit's ``results.json`` is checked as ``neural study`` checks it before copying.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedcodec.neural.study import load_unit  # noqa: E402
from fedcodec.report import atomic_write_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="a study folder, holding n<N>/seed<S>/results.json")
    p.add_argument("dest", help="the archive folder to write (e.g. benchmarks/results/neural/<name>)")
    p.add_argument("--command", required=True, help="the command that trained the study")
    p.add_argument("--commit", required=True, help="the commit it trained at")
    args = p.parse_args(argv)
    src, dest = Path(args.study), Path(args.dest)
    units = sorted(src.glob("n*/seed*/results.json"))
    if not units:
        p.error(f"{src} holds no n<N>/seed<S>/results.json: not a finished study")
    for unit in units:
        load_unit(unit, None)  # refuses a file that is not a sweep's results
        rel = unit.parent.relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md"):
            if (unit.parent / name).is_file():
                shutil.copyfile(unit.parent / name, dest / rel / name)
    if (src / "study.md").is_file():
        shutil.copyfile(src / "study.md", dest / "study.md")
    atomic_write_text(dest / "ARCHIVED.md", f"Trained by\n\n    {args.command}\n\nat commit {args.commit}; "
                                            f"{len(units)} units.\n")
    print(f"[archive] {dest}: {len(units)} units")
    return 0


if __name__ == "__main__":
    sys.exit(main())
