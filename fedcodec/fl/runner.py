"""Run one method to completion with checkpoints, resuming where a previous process stopped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from ..config import Config
from ..data import FederatedSource
from ..report import summarize, write_method
from . import checkpoint
from .loop import InProcessTransport, RoundReport, run_round
from .simulation import RunState, setup

log = logging.getLogger("fedcodec.runner")
CHECKPOINT = "checkpoint.safetensors"


def run_method(cfg: Config, source: FederatedSource, out: Path, resume: bool = False,
               progress: bool = True) -> tuple[list[dict], dict]:
    """Run ``cfg`` and write its results under ``out``; return (records, summary).

    With ``resume``, a finished method (``metrics.json`` holding all rounds) is not rerun and an
    interrupted one continues from its checkpoint; the result is bit-identical to an uninterrupted
    run. A checkpoint is written every ``cfg.checkpoint_every`` rounds and at the end.
    """
    out.mkdir(parents=True, exist_ok=True)
    config = cfg.to_dict()
    ckpt = out / CHECKPOINT
    if resume and (out / "metrics.json").exists():
        done = json.loads((out / "metrics.json").read_text())
        if done["summary"]["rounds"] == cfg.rounds:
            checkpoint.check_config(done["config"], config, out / "metrics.json")  # made with another config?
            log.info("%s: already finished (%d rounds), not rerun", cfg.method, cfg.rounds)
            return done["rounds"], done["summary"]
    sim, state = setup(cfg, source)
    if resume and ckpt.exists():
        state = checkpoint.load(ckpt, config, expected=state.global_params)
        log.info("%s: resuming after round %d", cfg.method, state.round)
    bar = tqdm(total=cfg.rounds, initial=min(state.round, cfg.rounds), desc=cfg.method, disable=not progress,
               unit="round")

    def show(state: RunState, report: RoundReport) -> None:
        r = report.record
        bar.set_postfix(acc=f"{100 * r.get('accuracy', float('nan')):.2f}",
                        up_kB=f"{r['uplink_bytes'] / r['clients'] / 1e3:.1f}")
        bar.update()

    transport, callbacks = InProcessTransport(sim), (show, checkpointer(ckpt, cfg))
    while state.round < cfg.rounds:
        state = run_round(sim, state, transport, callbacks)
    bar.close()
    summary = summarize(cfg.method, state.records, sim.spec)
    write_method(out, config, state.records, summary, state.ledger)
    return state.records, summary


def checkpointer(path: Path, cfg: Config):
    """A round-loop callback that saves the run state to ``path`` every ``cfg.checkpoint_every``
    rounds and after the last one (the in-process runner and the Flower ServerApp share it)."""
    config = cfg.to_dict()

    def save(state: RunState, report: RoundReport) -> None:
        if state.round % cfg.checkpoint_every == 0 or state.round == cfg.rounds:
            checkpoint.save(path, config, state)

    return save


def final_params(out: Path):
    """The global model stored in a method's checkpoint (tensors by name)."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(out / CHECKPOINT)).items() if "/" not in k}


__all__ = ["run_method", "final_params", "RunState"]
