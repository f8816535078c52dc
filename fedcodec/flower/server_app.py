"""The Flower ServerApp: a thin shell around fedcodec's round loop (:func:`fedcodec.fl.loop.run_round`)
with the Flower transport (:class:`fedcodec.flower.transport.FlowerTransport`) in place of in-process
calls. Sampling, simulated failures, the downlink, the ledger, decoding, rejection, aggregation and
evaluation are the in-process engine's own code, so a Flower run gives the same model, records and
ledger as ``fedcodec run`` on the same config.

Outputs under ``out-dir``: ``metrics.json``/``metrics.csv``/``ledger.csv`` (as ``fedcodec run``
writes them), ``model.pt`` (the global model after the last round), ``flower.json`` (node map, the
nodes ignored at discovery and why, per-round rejections, drops and timeouts with their reasons) and
``checkpoint.safetensors`` (the run state, every ``checkpoint-every`` rounds). With ``resume = true``
a restarted ServerApp continues from that checkpoint; see :func:`resume_state` for what that requires.

With the run config ``neural`` set, the same loop trains a learned data compressor
(:mod:`fedcodec.neural.deploy`): the clients' entropy models stay on their SuperNodes, so after the last
round the nodes evaluate their own codecs (:func:`evaluate_neural`) and the last round's record holds
the clients' mean rate (from real bytes), rate estimate and MSE; ``model.pt`` holds the shared tensors
only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..fl.checkpoint import atomic_write_bytes
from ..fl.runner import CHECKPOINT, checkpointer
from .common import FlowerSettings, build_simulation, ensure_logging, parse_run_config
from .transport import FlowerTransport, discover

log = logging.getLogger("fedcodec.flower.server")
app = ServerApp()


def resume_state(sim, cfg, out: Path, expected=None, neural: bool = False):
    """The run state to continue from ``out/checkpoint.safetensors`` (None: start afresh).

    A restarted run gets new Flower contexts on the SuperNodes, so what clients keep between rounds
    (error-feedback memory, a delta downlink's model copy, an AE client's codec, kept optimizer state,
    client-local tensors) is gone: such a run cannot continue bit-identically and is refused."""
    from ..errors import ConfigError
    from ..fl import checkpoint

    if neural:
        raise ConfigError("cannot resume a learned-compression run (run config 'neural') on Flower: its clients' "
                          "entropy models and optimizer state live in the SuperNodes' per-run state, lost when the "
                          "run restarts; start it again without resume=true")
    path = out / CHECKPOINT
    if not path.exists():
        log.info("resume: no checkpoint at %s; starting from round 1", path)
        return None
    kept = client_side_state(sim)
    if kept:
        raise ConfigError(f"cannot resume this Flower run: its clients keep {', '.join(kept)} between rounds, "
                          "which lives in the SuperNodes' per-run state and is lost when the run restarts; "
                          "start it again without resume=true")
    state = checkpoint.load(path, cfg.to_dict(), expected=expected)
    log.info("resuming after round %d from %s", state.round, path)
    return state


def client_side_state(sim) -> list[str]:
    """What the clients of ``sim`` keep in their own stores between rounds (empty: nothing)."""
    runtime, cfg = sim.runtime, sim.cfg
    kept = {"error-feedback memory": runtime.uplink.error_feedback, "a fitted codec": runtime.uplink.setup is not None,
            "a copy of the model (delta downlink)": cfg.downlink_delta,
            "optimizer state": cfg.keep_optimizer_state, "client-local tensors": bool(runtime.local)}
    return [what for what, keeps in kept.items() if keeps]


def run_rounds(grid: Grid, cfg, settings: FlowerSettings, out: Path) -> None:
    import torch

    from ..fl.loop import run_round
    from ..report import summarize, write_method

    sim, state = build_simulation(cfg, settings)
    sim.client_stores_here = False  # they are in the SuperNodes' contexts
    run = sim.cfg  # the classification config itself, or the one a learned-compression run derives
    config = cfg.to_dict()
    if settings.neural:
        from ..neural.deploy import NeuralRun

        config = run.to_dict() | {"neural": NeuralRun.parse(settings.neural).describe()}
    out.mkdir(parents=True, exist_ok=True)
    events = {"nodes": {}, "rounds": []}
    if settings.resume:
        resumed = resume_state(sim, cfg, out, expected=state.global_params, neural=bool(settings.neural))
        if resumed is not None:
            state = resumed
            if (out / "flower.json").exists():
                events["rounds"] = [r for r in json.loads((out / "flower.json").read_text())["rounds"]
                                    if r["round"] <= state.round]
    ignored: dict[int, str] = {}
    holders = discover(grid, run.num_clients, settings.node_wait, ignored)
    events["nodes"] = {str(p): n for p, n in sorted(holders.items())}
    events["ignored_nodes"] = {str(n): why for n, why in sorted(ignored.items())}
    transport = FlowerTransport(grid, holders, settings, run.min_clients)

    def save(state) -> None:
        write_method(out, config, state.records, summarize(run.method, state.records, sim.spec), state.ledger)
        atomic_write_bytes(out / "flower.json", json.dumps(events, indent=1).encode())
        tmp = out / ".model.pt.tmp"
        torch.save(state.global_params, tmp)
        os.replace(tmp, out / "model.pt")

    def write_outputs(state, report) -> None:
        # server-side facts only (the plan, the outcome, the inbox): never a key a client could name
        plan, outcome, inbox, record = report.plan, report.outcome, report.inbox, report.record
        events["rounds"].append({"round": plan.round, "sampled": plan.clients,
                                 "accepted": outcome.accepted,
                                 "rejected": {str(c): r for c, r in outcome.rejected.items()},
                                 "dropped": {str(c): why for c, why in sorted(inbox.dropped.items())},
                                 "timed_out": {str(c): why for c, why in sorted(inbox.timed_out.items())}})
        accuracy = record.get("accuracy")
        log.info("round %d: %d/%d accepted, %d rejected, %d dropped, %d timed out, uplink %d B, %s",
                 plan.round, len(outcome.accepted), len(plan.clients), len(outcome.rejected), len(inbox.dropped),
                 len(inbox.timed_out), state.ledger.total("up", plan.round),
                 f"accuracy {accuracy:.4f}" if isinstance(accuracy, float)
                 else f"train loss {record['train_loss']:.4g}")
        save(state)

    # a learned-compression run cannot resume (its clients' entropy models live on the SuperNodes)
    callbacks = (write_outputs,) if settings.neural else (write_outputs, checkpointer(out / CHECKPOINT, cfg))
    while state.round < run.rounds:
        state = run_round(sim, state, transport, callbacks)
    if settings.neural:
        evaluate_neural(grid, sim, state, holders, settings, events)
        save(state)


def evaluate_neural(grid: Grid, sim, state, holders: dict[int, int], settings: FlowerSettings, events: dict) -> None:
    """The final evaluation of a learned-compression run, made by the SuperNodes (the server holds no
    client's entropy model): the clients' mean goes into the last round's record, each client's
    point and the evaluation broadcasts' bytes into ``flower.json`` (``"evaluation"``)."""
    from ..neural.deploy import summarize_points
    from .transport import evaluate_on_nodes

    points, failed, sent = evaluate_on_nodes(grid, sim, state, holders, settings)
    summary = summarize_points(points, sim.runtime.task.lmbda)
    if state.records:
        state.records[-1].update(summary | {"eval_downlink_bytes": sent})
    events["evaluation"] = {"downlink_bytes": sent, "clients": {str(c): p for c, p in sorted(points.items())},
                            "failed": {str(c): why for c, why in failed.items()}}
    log.info("evaluation on %d of %d clients (by their nodes, with their own entropy models): rate %s, MSE %s; "
             "%d bytes of evaluation broadcasts", len(points), sim.cfg.num_clients,
             f"{summary['rate']:.4g}" if points else "-", f"{summary['mse']:.4g}" if points else "-", sent)


@app.main()
def main(grid: Grid, context: Context) -> None:
    ensure_logging()
    cfg, settings = parse_run_config(context.run_config)
    out = Path(cfg.out_dir).expanduser()
    if settings.neural:
        log.info("fedcodec learned compression on Flower (%s), output %s", settings.neural, out.resolve())
    else:
        log.info("fedcodec %s on Flower: %d rounds, %d of %d clients per round, output %s", cfg.method, cfg.rounds,
                 cfg.clients_per_round, cfg.num_clients, out.resolve())
    run_rounds(grid, cfg, settings, out)
