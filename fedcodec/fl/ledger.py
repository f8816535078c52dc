"""The byte ledger: one row per payload that crossed the wire, holding ``len()`` of its bytes."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    round: int
    client: int
    direction: str  # "up" (client → server) or "down" (server → client)
    codec: str
    nbytes: int


@dataclass
class Ledger:
    entries: list[Entry] = field(default_factory=list)

    def record(self, round_num: int, client: int, direction: str, codec: str, payload: bytes) -> int:
        n = len(payload)
        self.entries.append(Entry(round_num, client, direction, codec, n))
        return n

    def total(self, direction: str, round_num: int | None = None) -> int:
        return sum(e.nbytes for e in self.entries
                   if e.direction == direction and (round_num is None or e.round == round_num))

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["round", "client", "direction", "codec", "bytes"])
        for e in self.entries:
            w.writerow([e.round, e.client, e.direction, e.codec, e.nbytes])
        return buf.getvalue()
