"""Seconds per round: fedcodec's in-process engine vs the same app on Flower's simulation engine (Ray).

For each method (default: fedavg, fedmrn-binary) the script runs the same config twice, one engine
after the other, interleaved (in-process M1, Flower M1, in-process M2, Flower M2, ...):

- **in-process**: ``fedcodec run`` in a fresh Python process (``--config`` holding the full config),
  so its wall time includes the interpreter start, imports and the dataset load;
- **Flower simulation**: ``flower_app`` through :class:`fedcodec.flower.launch.LocalFederation`
  with ``simulation=True`` (what ``fedcodec flower simulate`` does): a ``flower-superlink
  --simulation`` on 127.0.0.1, ``flwr run`` with ``num-supernodes = num_clients`` virtual
  SuperNodes, one per partition. Its wall time includes the SuperLink start, Ray's start, the
  ServerApp/ClientApp imports and data loads, the partition discovery and the teardown.

Both use ``threads=1`` (torch CPU threads in every process that trains or evaluates). The in-process
engine trains the sampled clients one after another; Flower's Ray backend is given one CPU and one
CPU per ClientApp (``flwr federation simulation-config --init-args-num-cpus 1
--client-resources-num-cpus 1``), so its actor pool has one actor and the clients also train one at a
time. ``--ray-cpus``/``--client-cpus`` change that.

Reported per method and engine: seconds per round from the per-round records that both engines
write (``metrics.json``: ``seconds`` = sampling, broadcast, client training and coding, transport,
decoding and aggregation; ``eval_seconds`` = the test-set evaluation after it), also without round 1
(Flower's ClientApp loads its data lazily, inside round 1), total wall time, CPU seconds of every
process involved (sampled from ``/proc``, grouped by role, with the threads of the simulation
process), CPU seconds per round of all the engine's processes (between the ends of consecutive
rounds; on a machine shared with other work this is the number to trust, wall seconds then mostly
measure the scheduler), Flower's startup timeline, and whether the two engines ended with the same
global model (max abs difference of the final parameters: Flower's ``model.pt`` vs the in-process
``checkpoint.safetensors``) and the same per-round records. The Markdown table and all raw numbers
go to ``<out>/results.md`` and ``<out>/results.json``. Each engine runs in a session of its own (as
LocalFederation starts Flower's processes), so autogroup CPU scheduling treats them alike.

    python benchmarks/flower_vs_inprocess.py                      # bench setting, 3 rounds (~10-12 min here)
    python benchmarks/flower_vs_inprocess.py --rounds 1 --dataset synthetic --set num_clients=10 \\
        --out runs/flower-bench-smoke                             # plumbing check (~2 min)

Run it from a checkout with Flower installed (``pip install -e ".[flower]"``); the Flower processes
import ``fedcodec`` from this checkout (its root is put on ``PYTHONPATH``). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# measure the checkout this script belongs to, in this process and in every Flower/Ray process
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

import torch  # noqa: E402

import fedcodec  # noqa: E402
from fedcodec.config import PRESETS, build_config, parse_assignments  # noqa: E402
from fedcodec.flower.common import run_config_items  # noqa: E402
from fedcodec.flower.launch import CONNECTION, LocalFederation, process_tree, processes_with_home  # noqa: E402
from fedcodec.fl.runner import final_params  # noqa: E402

#: Config keys the Flower app's run config declares (flower_app/pyproject.toml); the others keep
#: Config's defaults on both sides, which the script checks by comparing the configs both engines saved
FLOWER_CONFIG_KEYS = ("method", "rounds", "num_clients", "clients_per_round", "min_clients", "dataset", "data_dir",
                      "allow_subset", "partition", "beta", "classes_per_client", "seed", "model", "local_epochs",
                      "batch_size", "lr", "momentum", "weight_decay", "eval_every", "threads")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- measurement helpers -------------------------------------------------------------------------
def loadavg() -> dict:
    one, five, fifteen = (float(x) for x in Path("/proc/loadavg").read_text().split()[:3])
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"1m": one, "5m": five, "15m": fifteen, "uptime": up, "time": time.strftime("%H:%M:%S")}


def _session(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[3])


def _cpu_and_cmd(pid: int) -> tuple[float, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, cmd or f"[{comm}]"


def role(cmd: str) -> str:
    """A short name for a process of either engine, from its command line."""
    rules = [("flower-superlink", "superlink"), ("flwr-simulation", "flwr-simulation (ServerApp + engine)"),
             ("flwr-serverapp", "flwr-serverapp"), ("flower-superexec", "superexec"), ("flwr-clientapp", "clientapp"),
             ("ClientAppActor", "ray ClientAppActor (ClientApp)"), ("ray::IDLE", "ray idle workers"),
             ("/ray/", "ray helpers (raylet, gcs, dashboard, agents, monitors)"),
             ("ray::", "ray helpers (raylet, gcs, dashboard, agents, monitors)"),
             ("bin/flwr ", "flwr CLI (run --stream, ls, simulation-config)"),
             ("fedcodec.cli", "fedcodec run (in-process)")]
    for needle, name in rules:
        if needle in cmd:
            return name
    return "other: " + cmd[:60]


#: processes whose threads are sampled too: the simulation process runs the ServerApp in one thread and
#: Flower's engine (message queues, LinkState polling, Ray driver) in others
THREADED_ROLES = ("flwr-simulation (ServerApp + engine)", "superlink")


class CpuSampler:
    """Samples the CPU time (user + system) of a changing set of processes every ``interval`` s and
    keeps each process's last value. A process that lives shorter than one interval is missed, and
    the last < ``interval`` s of each process's life are lost: call :meth:`sample` once more just
    before stopping the processes.

    ``marker``: a file the engine rewrites once per round (after the round's evaluation); each time
    its mtime changes, the total CPU time of all processes so far is recorded in ``marks``, so
    CPU seconds per round, which contention from other work inflates far less than wall seconds, can
    be compared (to within one sampling interval)."""

    def __init__(self, pids_fn, interval: float = 1.0, marker: Path | None = None):
        self.pids_fn, self.interval, self.marker = pids_fn, interval, marker
        self.marks: list[dict] = []
        self._mtime = None
        self._lock = threading.Lock()
        self.seen: dict[int, tuple[float, str]] = {}
        self.sessions: dict[int, int | None] = {}  # pid → session id (the scheduler shares CPU by session)
        self.threads: dict[int, dict[int, float]] = {}  # pid → {tid: CPU s}, for THREADED_ROLES
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def total(self) -> float:
        return sum(cpu for cpu, _ in self.seen.values())

    def sample(self) -> None:
        with self._lock:
            self._sample()
            if self.marker is not None:
                try:
                    mtime = self.marker.stat().st_mtime_ns
                except OSError:
                    mtime = None
                if mtime is not None and mtime != self._mtime:
                    self._mtime = mtime
                    self.marks.append({"t": time.perf_counter(), "cpu_s": round(self.total(), 2)})

    def marks_per_round(self) -> dict:
        """Mean CPU and wall seconds between consecutive round marks (rounds 2.. of the run)."""
        m = self.marks
        if len(m) < 2:
            return {"cpu_s_per_round_after_first": None, "wall_s_per_round_after_first": None, "marks": m}
        n = len(m) - 1
        return {"cpu_s_per_round_after_first": (m[-1]["cpu_s"] - m[0]["cpu_s"]) / n,
                "wall_s_per_round_after_first": (m[-1]["t"] - m[0]["t"]) / n,
                "marks": [{"t": round(x["t"] - m[0]["t"], 2), "cpu_s": x["cpu_s"]} for x in m]}

    def _sample(self) -> None:
        for pid in self.pids_fn():
            got = _cpu_and_cmd(pid)
            if got is not None:
                old = self.seen.get(pid)
                # "[comm]" only: no command line (exiting, or a zombie): keep the one seen before
                cmd = old[1] if old and got[1].startswith("[") else got[1]
                self.seen[pid] = (max(got[0], old[0] if old else 0.0), cmd)
                if pid not in self.sessions:
                    self.sessions[pid] = _session(pid)
                if role(cmd) in THREADED_ROLES:
                    self._sample_threads(pid)

    def _sample_threads(self, pid: int) -> None:
        mine = self.threads.setdefault(pid, {})
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return
        for tid in tids:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            mine[int(tid)] = max(mine.get(int(tid), 0.0), (int(fields[11]) + int(fields[12])) / CLK_TCK)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a sampler must never take the benchmark down
                pass

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def by_role(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for cpu, cmd in self.seen.values():
            r = out.setdefault(role(cmd), {"cpu_s": 0.0, "processes": 0})
            r["cpu_s"] += cpu
            r["processes"] += 1
        return {k: {"cpu_s": round(v["cpu_s"], 2), "processes": v["processes"]}
                for k, v in sorted(out.items(), key=lambda kv: -kv[1]["cpu_s"])}

    def processes(self) -> list[dict]:
        out = []
        for pid, (cpu, cmd) in sorted(self.seen.items(), key=lambda kv: -kv[1][0]):
            row = {"pid": pid, "session": self.sessions.get(pid), "cpu_s": round(cpu, 2), "role": role(cmd),
                   "cmd": cmd[:300]}
            if pid in self.threads:  # CPU s of its busiest threads (the main thread's tid is the pid)
                top = sorted(self.threads[pid].items(), key=lambda kv: -kv[1])
                row["threads_cpu_s"] = {("main" if t == pid else str(t)): round(c, 2) for t, c in top if c >= 0.1}
            out.append(row)
        return out


def round_stats(metrics: dict) -> dict:
    rounds = metrics["rounds"]
    sec = [r["seconds"] for r in rounds]
    ev = [r.get("eval_seconds", 0.0) for r in rounds]
    return {"seconds": sec, "eval_seconds": ev, "mean_s_per_round": statistics.fmean(sec),
            "median_s_per_round": statistics.median(sec), "mean_eval_s": statistics.fmean(ev),
            "mean_s_per_round_with_eval": statistics.fmean(s + e for s, e in zip(sec, ev)),
            # round 1 also pays one-time costs (Flower: the ClientApp actor's imports and data load)
            "mean_s_per_round_after_first": statistics.fmean(sec[1:]) if len(sec) > 1 else None,
            "final_accuracy": rounds[-1].get("accuracy"), "rounds": len(rounds)}


# -- the two engines -----------------------------------------------------------------------------
def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def run_inprocess(cfg, out: Path, log) -> dict:
    """``fedcodec run`` in a fresh process with ``cfg`` (all keys in a TOML file)."""
    out.mkdir(parents=True, exist_ok=True)
    conf = out / "config.toml"
    lines = [f"{k} = {toml_value(v)}" for k, v in cfg.to_dict().items()
             if v is not None and k not in ("codec_options", "out_dir")]
    for k, v in cfg.codec_options.items():
        lines.append(f"codec_options.{k} = {toml_value(v)}")
    conf.write_text("\n".join(lines) + "\n")
    args = [sys.executable, "-c", "import sys; from fedcodec.cli import main; sys.exit(main(sys.argv[1:]))",
            "run", "--config", str(conf), "--method", cfg.method, "--out", str(out), "--name", "run",
            "--no-progress"]
    t0 = time.perf_counter()
    with open(out / "run.log", "w") as f:
        # its own session, as LocalFederation starts Flower's processes: with the kernel's autogroup
        # scheduling (sched_autogroup_enabled) CPU is shared between sessions, so under contention an
        # engine in this script's session would get a different share than one in sessions of its own
        proc = subprocess.Popen(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        marker = out / "run" / cfg.method / "checkpoint.safetensors"  # rewritten after every round
        with CpuSampler(lambda: process_tree([proc.pid]), marker=marker) as sampler:
            while proc.poll() is None:
                sampler.sample()
                time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fedcodec run failed ({proc.returncode}); see {out / 'run.log'}:\n"
                           + (out / "run.log").read_text()[-3000:])
    run_dir = out / "run" / cfg.method
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log(f"  in-process {cfg.method}: {wall:.1f} s wall")
    return {"wall_s": wall, "metrics": metrics, "run_dir": str(run_dir), "cpu_by_role": sampler.by_role(),
            "processes": sampler.processes(), "cpu_total_s": sampler.total(), "per_round_cpu": sampler.marks_per_round(),
            "command": args}


class TimedStream:
    """``stream_to`` for :meth:`LocalFederation.run`: writes each streamed line to ``f`` prefixed with the
    seconds since ``t0`` at which it arrived (Flower streams the run's log in batches, so these are
    upper bounds, late by up to about a second) and keeps the lines of :data:`MILESTONES`."""

    def __init__(self, f, t0: float):
        self.f, self.t0, self.events = f, t0, []

    def write(self, text: str) -> None:
        t = time.perf_counter() - self.t0
        for line in text.splitlines():
            self.f.write(f"{t:8.2f} {line}\n")
            for name, needle in MILESTONES:
                if needle.search(line):
                    self.events.append({"t": round(t, 2), "event": name, "line": line.strip()[:200]})

    def flush(self) -> None:
        self.f.flush()


#: streamed log lines that mark the phases of a Flower simulation run
MILESTONES = [(name, re.compile(rx)) for name, rx in [
    ("run started (flwr CLI connected)", r"Successfully started run"),
    ("simulation process up", r"Starting Flower Simulation"),
    ("ServerApp main() entered", r"INFO fedcodec: fedcodec .* on Flower"),
    ("partitions discovered (Ray up, data loaded, query messages answered)", r"partition → node"),
    ("first ClientApp reply logged", r"round 1, client \d+: .* examples"),
    ("round done", r"INFO fedcodec: round \d+: \d+/\d+ accepted"),
]]

CLIENT_LINE = re.compile(r"round (\d+), client (\d+): (\d+) examples, setup ([\d.]+) s, training ([\d.]+) s")


def run_flower(cfg, out: Path, args, log) -> dict:
    """The Flower app on a simulation SuperLink (LocalFederation(simulation=True))."""
    out.mkdir(parents=True, exist_ok=True)
    result_dir = out / "result"
    items = run_config_items({k: getattr(cfg, k) for k in FLOWER_CONFIG_KEYS if getattr(cfg, k) is not None}
                             | {"out_dir": str(result_dir)})
    if cfg.codec_options:
        items.append("codec-options=" + json.dumps(" ".join(f"{k}={v}" for k, v in cfg.codec_options.items())))
    fed = LocalFederation(cfg.num_clients, workdir=out / "flwr", simulation=True, insecure=args.insecure)
    phases = {}
    t0 = time.perf_counter()
    with CpuSampler(lambda: processes_with_home(fed.home) | process_tree(
            [p.pid for p in [fed.superlink] if p is not None]),
            marker=result_dir / "metrics.json") as sampler:  # the ServerApp rewrites it after every round
        try:
            fed.start()
            phases["superlink_start_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            sim = fed.flwr("federation", "simulation-config", "@none/default", CONNECTION,
                           "--init-args-num-cpus", str(args.ray_cpus),
                           "--client-resources-num-cpus", str(args.client_cpus), timeout=60)
            if sim.returncode != 0:
                raise RuntimeError(f"flwr federation simulation-config failed: {sim.stdout}{sim.stderr}")
            phases["simulation_config_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            with open(out / "flwr-run.timed.log", "w") as f:
                stream = TimedStream(f, t0)
                result = fed.run(items, timeout=args.timeout, stream_to=stream)
            phases["flwr_run_s"] = time.perf_counter() - t2
            sampler.sample()
        finally:
            t3 = time.perf_counter()
            sampler.sample()
            fed.stop()
            phases["stop_s"] = time.perf_counter() - t3
    wall = time.perf_counter() - t0
    left = processes_with_home(fed.home)
    if not result.ok:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(fed.logs.iterdir()))
        raise RuntimeError(f"Flower run failed: {result}{logs}")
    metrics = json.loads((result_dir / "metrics.json").read_text())
    text = "\n".join(p.read_text(errors="replace") for p in sorted(fed.logs.iterdir()))
    clients = [dict(round=int(m[1]), client=int(m[2]), examples=int(m[3]), setup_s=float(m[4]),
                    training_s=float(m[5])) for m in CLIENT_LINE.finditer(text)]
    # the ClientApp's own time per round (its log lines: setup + training, 0.1 s resolution) and what
    # the round took beyond it: messaging through the SuperLink and Ray, and the server's decode/aggregate
    per_round = []
    for rec in metrics["rounds"]:
        mine = [c for c in clients if c["round"] == rec["round"]]
        busy = sum(c["setup_s"] + c["training_s"] for c in mine)
        per_round.append({"round": rec["round"], "client_lines": len(mine), "client_setup_s": round(
            sum(c["setup_s"] for c in mine), 2), "client_busy_s": round(busy, 2),
                          "round_minus_client_s": round(rec["seconds"] - busy, 2)})
    log(f"  Flower simulation {cfg.method}: {wall:.1f} s wall (flwr run {phases['flwr_run_s']:.1f} s)")
    return {"wall_s": wall, "phases": phases, "metrics": metrics, "run_dir": str(result_dir),
            "cpu_by_role": sampler.by_role(), "processes": sampler.processes(), "cpu_total_s": sampler.total(),
            "per_round_cpu": sampler.marks_per_round(), "run_config": items,
            "run_id": result.run_id, "status": result.status, "timeline": stream.events,
            "client_log_lines": clients, "client_time_per_round": per_round, "processes_left": sorted(left),
            "federation_config": {"num-supernodes": cfg.num_clients, "init-args-num-cpus": args.ray_cpus,
                                  "client-resources-num-cpus": args.client_cpus}}


# -- comparison and report -----------------------------------------------------------------------
def compare(inproc: dict, flower: dict) -> dict:
    a = final_params(Path(inproc["run_dir"]))
    b = torch.load(Path(flower["run_dir"]) / "model.pt", weights_only=True)
    same_keys = set(a) == set(b)
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
             for k in set(a) & set(b)}
    bit_identical = same_keys and all(torch.equal(a[k], b[k]) for k in a)

    def comparable(records):
        return [{k: v for k, v in r.items() if "seconds" not in k and k not in ("dropped", "timed_out")}
                for r in records]

    ca = {k: v for k, v in inproc["metrics"]["config"].items() if k != "out_dir"}
    cb = {k: v for k, v in flower["metrics"]["config"].items() if k != "out_dir"}
    return {"bit_identical": bit_identical, "same_keys": same_keys, "max_abs_diff": max(diffs.values(), default=0.0),
            "records_identical": comparable(inproc["metrics"]["rounds"]) == comparable(flower["metrics"]["rounds"]),
            "config_identical": ca == cb, "config_differences": {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb)
                                                                  if ca.get(k) != cb.get(k)}}


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: list[dict], meta: dict) -> str:
    head = ("| method | engine | s/round | s/round, rounds ≥ 2 | eval s/round | wall total s "
            "| wall − rounds − evals s | CPU s/round, rounds ≥ 2, all processes | CPU total s | final acc |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for r in results:
        for name, key in (("in-process", "inprocess"), ("Flower simulation (Ray)", "flower")):
            e = r[key]
            s = e["stats"]
            rest = e["wall_s"] - sum(s["seconds"]) - sum(s["eval_seconds"])
            acc = f"{100 * s['final_accuracy']:.2f}" if s["final_accuracy"] is not None else "-"
            rows.append(f"| {r['method']} | {name} | {s['mean_s_per_round']:.2f} "
                        f"| {_fmt(s['mean_s_per_round_after_first'])} | {s['mean_eval_s']:.2f} "
                        f"| {e['wall_s']:.1f} | {rest:.1f} | {_fmt(e['per_round_cpu']['cpu_s_per_round_after_first'], '.1f')} "
                        f"| {e['cpu_total_s']:.1f} | {acc} |")
    table = "\n".join([head, *rows])
    head2 = ("| method | Flower / in-process, s/round | same, rounds ≥ 2 | same, CPU s/round, rounds ≥ 2 "
             "| Flower / in-process, wall | Flower / in-process, CPU total "
             "| Flower − in-process, s/round | Flower − in-process, wall s | final models | max abs diff "
             "| per-round records |\n|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    rows2 = []
    for r in results:
        c, i, f = r["comparison"], r["inprocess"], r["flower"]
        rows2.append(f"| {r['method']} | {r['ratio_s_per_round']:.3f} | {_fmt(r['ratio_s_per_round_after_first'], '.3f')} "
                     f"| {_fmt(r['ratio_cpu_per_round_after_first'], '.3f')} "
                     f"| {r['ratio_wall']:.2f} | {f['cpu_total_s'] / i['cpu_total_s']:.2f} "
                     f"| {f['stats']['mean_s_per_round'] - i['stats']['mean_s_per_round']:+.2f} "
                     f"| {f['wall_s'] - i['wall_s']:+.1f} "
                     f"| {'bit-identical' if c['bit_identical'] else 'DIFFER'} | {c['max_abs_diff']:.3g} "
                     f"| {'identical' if c['records_identical'] else 'DIFFER'} |")
    table2 = "\n".join([head2, *rows2])
    per_round = []
    for r in results:
        for key, name in (("inprocess", "in-process"), ("flower", "Flower")):
            s = r[key]["stats"]
            per_round.append(f"- {r['method']}, {name}: rounds " + ", ".join(f"{x:.2f}" for x in s["seconds"])
                             + " s; eval " + ", ".join(f"{x:.2f}" for x in s["eval_seconds"]) + " s")
        per_round.append(f"- {r['method']}, Flower, per round: ClientApp setup + training (from its log lines) "
                         + ", ".join(f"{x['client_busy_s']:.1f} (setup {x['client_setup_s']:.1f})"
                                     for x in r["flower"]["client_time_per_round"])
                         + " s; round − ClientApp time " + ", ".join(f"{x['round_minus_client_s']:.1f}"
                                                                  for x in r["flower"]["client_time_per_round"]) + " s")
    loads = [f"- {x['when']}: {x['load']['1m']:.2f} {x['load']['5m']:.2f} {x['load']['15m']:.2f} "
             f"({x['load']['time']})" for x in meta["loads"]]
    cpu = []
    for r in results:
        for key, name in (("inprocess", "in-process"), ("flower", "Flower")):
            parts = ", ".join(f"{k} {v['cpu_s']:.1f}" for k, v in r[key]["cpu_by_role"].items() if v["cpu_s"] >= 0.5)
            total = sum(v["cpu_s"] for v in r[key]["cpu_by_role"].values())
            cpu.append(f"- {r['method']}, {name}: total {total:.1f}; {parts} (and this script's /proc sampler "
                       f"{r[key].get('driver_cpu_s', 0):.1f})")
    for r in results:
        for p in r["flower"]["processes"]:
            if "threads_cpu_s" in p:
                th = list(p["threads_cpu_s"].items())
                cpu.append(f"- {r['method']}, Flower, {p['role']} threads (CPU s, busiest first): "
                           + ", ".join(f"{t} {c:.1f}" for t, c in th[:6])
                           + (f", {len(th) - 6} more ≥ 0.1 s: {sum(c for _, c in th[6:]):.1f}" if len(th) > 6 else ""))
    phases = []
    for r in results:
        f = r["flower"]
        phases.append(f"- {r['method']}: " + ", ".join(f"{k} {v:.1f}" for k, v in f["phases"].items()))
        seen = set()
        for ev in f["timeline"]:
            if ev["event"] == "round done" or ev["event"] not in seen:
                seen.add(ev["event"])
                phases.append(f"  - {ev['t']:.1f} s: {ev['event']}")
    return "\n".join([
        f"# fedcodec in-process engine vs Flower simulation engine ({meta['setting']})", "",
        table, "", table2, "",
        "s/round: mean of the per-round `seconds` in metrics.json (sampling, broadcast, client training and "
        "coding, transport, decoding, aggregation; no evaluation). Wall: from starting the engine's first "
        "process to the last one stopped, everything a user waits for. CPU s/round: CPU time (user + system) of "
        "all the engine's processes between the ends of consecutive rounds (training, coding, evaluation, "
        "messaging, Flower's and Ray's background work; sampled every second, so ± about 1 s); contention from "
        "other work on the machine inflates it far less than wall seconds.", "",
        "Per-round seconds:", *per_round, "",
        "Flower phases (s; the timeline is when each streamed log line reached `flwr run --stream`, seconds since "
        "the SuperLink was started; late by up to about a second):", *phases, "",
        "CPU seconds by process role (sampled from /proc every second; roles with ≥ 0.5 s listed):", *cpu, "",
        "Load averages (1/5/15 min):", *loads, "",
        f"Command: `{meta['command']}`",
        f"Engines: threads={meta['threads']}; the in-process engine trains clients one after another; Flower "
        f"simulation with Ray init num-cpus={meta['ray_cpus']}, client-resources num-cpus={meta['client_cpus']} "
        f"(one ClientApp actor when equal: clients also train one after another), "
        f"{'insecure' if meta['insecure'] else 'TLS'} SuperLink, num-supernodes = num-clients.",
        f"Versions: fedcodec from {meta['fedcodec_path']} ({meta['git']}), flwr {meta['flwr']}, ray {meta['ray']}, "
        f"torch {meta['torch']}, {meta['cpus']} CPUs.", ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    ap.add_argument("--methods", default="fedavg,fedmrn-binary", help="comma-separated methods (default %(default)s)")
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS), help="config preset (default bench)")
    ap.add_argument("--dataset", choices=["fashion-mnist", "cifar10", "synthetic"],
                    help="dataset (default: the config's, fashion-mnist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every training process (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other config key, e.g. --set num_clients=10 (must be one the Flower app declares, "
                         "else it differs between the engines and the config check reports it)")
    ap.add_argument("--ray-cpus", type=int, default=1, help="CPUs Ray may schedule on (init-args num-cpus; default 1)")
    ap.add_argument("--client-cpus", type=int, default=1,
                    help="CPUs per ClientApp actor (client-resources num-cpus; default 1): ray-cpus/client-cpus "
                         "ClientApps train at once")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP SuperLink (default: TLS, as fedcodec flower "
                                                            "simulate does)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a Flower run is killed (default 1800)")
    ap.add_argument("--out", default="runs/flower-bench", help="output directory (default %(default)s)")
    args = ap.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides, codec = parse_assignments(args.set)
    overrides |= {"rounds": args.rounds, "seed": args.seed, "threads": args.threads}
    if args.dataset:
        overrides["dataset"] = args.dataset
    configs = [build_config(args.preset, None, {**overrides, "method": m, "codec_options": codec}) for m in methods]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    import flwr
    import ray

    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip()
    c0 = configs[0]
    meta = {"started": started, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "setting": f"{c0.dataset}, {c0.model}, {c0.num_clients} clients, {c0.clients_per_round} per round, "
                       f"{c0.local_epochs} local epochs, batch {c0.batch_size}, {c0.rounds} rounds, seed {c0.seed}",
            "threads": args.threads, "ray_cpus": args.ray_cpus, "client_cpus": args.client_cpus,
            "insecure": args.insecure, "fedcodec_path": str(Path(fedcodec.__file__).parent), "git": git,
            "flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__, "cpus": os.cpu_count(),
            "loads": []}
    if not Path(fedcodec.__file__).resolve().is_relative_to(ROOT):
        raise SystemExit(f"fedcodec imported from {fedcodec.__file__}, not from {ROOT}")
    log(f"fedcodec from {meta['fedcodec_path']}; {meta['setting']}; methods {', '.join(methods)}; output {out}")

    results = []
    for cfg in configs:
        entry = {"method": cfg.method}
        for key, fn in (("inprocess", lambda: run_inprocess(cfg, out / cfg.method / "inprocess", log)),
                        ("flower", lambda: run_flower(cfg, out / cfg.method / "flower", args, log))):
            before = loadavg()
            meta["loads"].append({"when": f"before {cfg.method} {key}", "load": before})
            log(f"{cfg.method} {key}: starting (load {before['1m']:.2f} {before['5m']:.2f} {before['15m']:.2f})")
            cpu0 = time.process_time()
            entry[key] = fn()
            # this script's own CPU meanwhile (mostly the /proc sampler), which competes with the engine
            entry[key]["driver_cpu_s"] = round(time.process_time() - cpu0, 2)
            entry[key]["stats"] = round_stats(entry[key]["metrics"])
            after = loadavg()
            meta["loads"].append({"when": f"after {cfg.method} {key}", "load": after})
            entry[key]["load_before"], entry[key]["load_after"] = before, after
            log(f"{cfg.method} {key}: {entry[key]['stats']['mean_s_per_round']:.2f} s/round, "
                f"{entry[key]['wall_s']:.1f} s wall (load after {after['1m']:.2f})")
        entry["comparison"] = compare(entry["inprocess"], entry["flower"])
        i, f = entry["inprocess"], entry["flower"]
        entry["ratio_s_per_round"] = f["stats"]["mean_s_per_round"] / i["stats"]["mean_s_per_round"]
        entry["ratio_wall"] = f["wall_s"] / i["wall_s"]
        a, b = i["stats"]["mean_s_per_round_after_first"], f["stats"]["mean_s_per_round_after_first"]
        entry["ratio_s_per_round_after_first"] = b / a if a and b else None
        a, b = (i["per_round_cpu"]["cpu_s_per_round_after_first"], f["per_round_cpu"]["cpu_s_per_round_after_first"])
        entry["ratio_cpu_per_round_after_first"] = b / a if a and b else None
        log(f"{cfg.method}: Flower/in-process {entry['ratio_s_per_round']:.3f} per round, {entry['ratio_wall']:.3f} "
            f"wall; models {'bit-identical' if entry['comparison']['bit_identical'] else 'differ'} "
            f"(max abs diff {entry['comparison']['max_abs_diff']:.3g})")
        results.append(entry)
        # raw numbers so far, in case a later run fails
        (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))

    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    text = markdown(results, meta)
    for r in results:  # the full metrics stay in each run's metrics.json
        for key in ("inprocess", "flower"):
            r[key]["metrics"] = {"config": r[key]["metrics"]["config"], "summary": r[key]["metrics"]["summary"],
                                 "rounds": r[key]["metrics"]["rounds"]}
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results, "markdown": text}, indent=1,
                                                 default=str))
    print("\n" + text)
    print(f"results: {out / 'results.md'}, {out / 'results.json'}")
    ok = all(r["comparison"]["config_identical"] for r in results)
    if not ok:
        print("WARNING: the engines ran with different configs: "
              + "; ".join(f"{r['method']}: {r['comparison']['config_differences']}" for r in results), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
