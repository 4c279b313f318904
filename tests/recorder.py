"""A test-only callback that records, per rank, the training episode ids each step used."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl


class RecordEpisodes(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = Path(self.folder) / f"rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            ids = batch.episode_ids.tolist()
            handle.write(json.dumps({"step": trainer.global_step, "ids": ids}) + "\n")


def read_records(folder: Path) -> dict[int, list[dict]]:
    """rank -> [{"step": s, "ids": [...]}, ...] in the order they were written."""
    return {
        int(path.stem[4:]): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(Path(folder).glob("rank*.jsonl"))
    }
