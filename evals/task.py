"""What a task is: items (a prompt's segments and a reference), a scorer, and a reward that is that scorer's main
metric, so that evaluation and RL score the same way; plus the blind baselines a score is read against."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data.pipeline import read_shard
from data.shards import resolve_shards


@dataclass
class Item:
    image: bytes  # the item's picture, encoded (the harness decodes it at the model's patch size)
    prompt: str  # text after the image (the harness tokenizes it)
    reference: str
    kind: str = ""  # a question type, for per-type scores and the majority baseline


class Task:
    """Subclasses give `name`, `source` (a dataset split under the data root), `item(sample)` and `score`."""

    name = ""
    source = ""
    metric = ""  # the key of `score`'s result that is the task's reward

    def items(self, data_root: str | Path, n: int) -> list[Item]:
        out: list[Item] = []
        for shard in resolve_shards(str(Path(data_root) / self.source)):
            for sample in read_shard(shard, Counter()):
                out.append(self.item(sample))
                if len(out) >= n:
                    return out
        return out

    def item(self, sample: dict) -> Item:
        raise NotImplementedError

    def score(self, output: str, item: Item) -> dict[str, float]:
        raise NotImplementedError

    def reward(self, output: str, item: Item) -> float:
        """The scorer's main metric: what RL post-training optimises."""
        return self.score(output, item)[self.metric]

    def baselines(self, items: list[Item]) -> dict[str, list[str]]:
        """Blind predictions per item, by name (the harness adds the model without its image)."""
        return {}
