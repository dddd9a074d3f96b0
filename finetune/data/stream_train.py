"""`data.streaming: true`, training side: the examples of `finetune.data.stream` cut into blocks of
`data.shuffle_buffer` rows, each block shuffled (its own seeded permutation), tokenized and masked like the
preprocessed path (`finetune.data.parallel.row_result`), packed in groups of at most `PACK_GROUP` samples
(`finetune.data.packing.packed_bins`), and yielded as training samples, pass after pass until the trainer stops.

Where a process is: `Position(epoch, rows, skip)`: the pass, the rows of that pass read before the current block, and
the samples of the current block already handed to the trainer. Since a block's samples depend only on its rows and
the seed, resuming reads (without tokenizing) `rows` rows, rebuilds that one block and drops `skip` samples: training
continues at the row where it stopped. The trainer consumed `global_step x accumulation x micro_batch` samples per
process; `StreamCheckpoint` writes each process's position for that count into every checkpoint
(`stream-rank<r>.json`) and `build_stream` starts from it.

Several processes: the stream is a `datasets.IterableDataset` with one shard per process, so Accelerate (with
`dispatch_batches: false`) gives each process its own shard, and each reads and tokenizes only its share of rows.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.data.packing import packed_bins
from finetune.data.parallel import BAD_ENCODE, MASKED, OK, UNTRAINABLE, count, row_results
from finetune.data.stream import HEAD_ROWS, Source, examples, sources
from finetune.data.templates import applied_template
from finetune.errors import FinetuneError
from finetune.recipe.schema import DataConfig

PACK_GROUP = 2000  # most samples one packing group holds
POSITION_FILE = "stream-rank{rank}.json"


@dataclass(frozen=True)
class Position:
    """Where one process is in its stream: pass, rows of the pass before the current block, samples of it used."""

    epoch: int = 0
    rows: int = 0
    skip: int = 0


class TokenStream:
    """The training samples (input_ids, labels[, seq_lengths]) of one process, read, tokenized and packed lazily."""

    def __init__(self, data: DataConfig, tokenizer: Any, seed: int, rank: int = 0, world: int = 1,
                 start: Position | None = None, consumed: int = 0):
        self.data, self.tokenizer, self.seed, self.rank, self.world = data, tokenizer, seed, rank, world
        self.template = applied_template(tokenizer, data)
        self.opened: list[Source] = sources(data, rank, world)
        self.start, self.consumed = start or Position(), consumed
        # samples handed out before a block -> where the block starts (every iteration from `start` yields the same
        # sequence, so trl peeking at the first sample adds nothing new)
        self.blocks: dict[int, Position] = {}
        self.dropped = {"too_long": 0, "fully_masked": 0}
        # the last block built: trl and the data loader start iterating more than once (peeking at the first
        # sample), and each start would otherwise tokenize the first block again
        self._last: tuple[tuple[int, int], list[dict[str, list[int]]]] | None = None

    # --- the samples
    def _block_samples(self, block: list[dict[str, Any]], epoch: int, index: int,
                       report: Any = None) -> list[dict[str, list[int]]]:
        data = self.data
        if data.shuffle:
            random.Random(f"{self.seed}:{epoch}:{self.rank}:{index}").shuffle(block)
        samples = []
        for r in row_results(self.tokenizer, block, data, self.template):
            if r["status"] in (BAD_ENCODE, UNTRAINABLE):
                raise FinetuneError(f"a streamed row of data.train cannot be trained on: {r['problem']}. Check the "
                                    "files with `ft validate --full` (reads them whole) or `ft data preview`.")
            if report is not None:
                count(report, r)
            if r["status"] == OK:
                samples.append({"input_ids": r["input_ids"], "labels": r["labels"]})
            else:
                self.dropped["fully_masked" if r["status"] == MASKED else "too_long"] += 1
        if not data.packing:
            return samples
        out = []
        for g in range(0, len(samples), PACK_GROUP):
            group = samples[g:g + PACK_GROUP]
            for b in packed_bins([len(s["input_ids"]) for s in group], data.max_length,
                                  self.seed + 1_000_003 * epoch + index):
                out.append({"input_ids": [t for i in b for t in group[i]["input_ids"]],
                            "labels": [t for i in b for t in group[i]["labels"]],
                            "seq_lengths": [len(group[i]["input_ids"]) for i in b]})
        return out

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        """Samples from `start` on, pass after pass (a source that ends starts over), never ending."""
        size = self.data.shuffle_buffer
        epoch, rows, skip, handed = self.start.epoch, self.start.rows, self.start.skip, self.consumed
        while True:
            stream = examples(self.opened, self.data, self.seed, epoch, self.rank)
            if rows and sum(1 for _ in itertools.islice(stream, rows)) < rows:
                raise FinetuneError(f"resume: the checkpoint's stream position (pass {epoch + 1}, row {rows}) lies "
                                    "past the end of data.train; the training files changed since it was written")
            index, got = rows // size, 0
            while block := list(itertools.islice(stream, size)):
                got += len(block)
                self.blocks[handed - skip] = Position(epoch, rows, 0)
                if self._last is not None and self._last[0] == (epoch, index):
                    samples = self._last[1]
                else:
                    samples = self._block_samples(block, epoch, index)
                    self._last = ((epoch, index), samples)
                for sample in samples[skip:]:
                    handed += 1
                    yield sample
                rows, skip, index = rows + len(block), 0, index + 1
            if not got and not rows:
                raise FinetuneError(f"data.train: process {self.rank} of {self.world} got no rows to train on; give "
                                    "more rows (or files) than processes")
            if self.rank == 0:
                print(f"data: pass {epoch + 1} over the streamed data.train ended ({rows} rows on process 0); "
                      "starting the next", flush=True)
            epoch, rows, skip = epoch + 1, 0, 0

    def position(self, consumed: int) -> Position:
        """Where the stream is once `consumed` samples (counted from the stage's start) were trained on."""
        first = max((k for k in self.blocks if k <= consumed), default=None)
        if first is not None:
            start = self.blocks[first]
            return Position(start.epoch, start.rows, consumed - first)
        return Position(self.start.epoch, self.start.rows, self.start.skip + consumed - self.consumed)


def stream_head(data: DataConfig, tokenizer: Any, seed: int, report: Any):
    """The first `HEAD_ROWS` rows of process 0 (at most one shuffle block) of a streamed training split, preprocessed
    and counted into `report` (a `finetune.data.build.DataReport`) as `prepare` counts a whole split: what
    `ft train --dry-run`, the checks before training and `ft data preview` look at instead of the whole stream.

    Returns:
        The samples as a `datasets.Dataset`; the report's sources say `streamed` for their row counts.
    """
    from datasets import Dataset

    stream = TokenStream(data, tokenizer, seed)
    block = list(itertools.islice(examples(stream.opened, data, seed, 0, 0), min(data.shuffle_buffer, HEAD_ROWS)))
    samples = stream._block_samples(block, 0, 0, report)
    report.samples = sum(len(s.get("seq_lengths", [0])) for s in samples)
    report.rows = len(samples)
    report.sources = [{"key": s.key, "path": s.src.path, "format": s.format, "rows": "streamed",
                       "used": f"first {len(block)} rows"} for s in stream.opened]
    return Dataset.from_list(samples)


# ---------------------------------------------------------------------------------------------------------------
# The trainer's side: a datasets.IterableDataset with one shard per process, and the position in every checkpoint

_STREAMS: dict[str, TokenStream] = {}  # by id: the generator gets a short key (datasets hashes its arguments)


def _generate(stream_id: str, part: list[int]) -> Iterator[dict[str, list[int]]]:
    yield from _STREAMS[stream_id]


def read_position(checkpoint: Path, rank: int, world: int = 1) -> tuple[Position, int]:
    """The stream position of process `rank` recorded in a checkpoint, and the samples consumed by then.

    Raises:
        FinetuneError: The checkpoint holds no position for this process (written by a non-streaming run or with
            fewer processes).
    """
    path = Path(checkpoint) / POSITION_FILE.format(rank=rank)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        position, consumed, processes = Position(**saved["position"]), int(saved["consumed"]), saved["processes"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FinetuneError(f"resume: {path} is missing or unreadable, so the stream position of process {rank} is "
                            "unknown; resume with the recipe and process count the run was started with") from None
    if processes != world:
        raise FinetuneError(f"resume: the streamed run in {checkpoint} was read by {processes} process(es), this one "
                            f"has {world}; each process resumes its own shard, so resume with --nproc {processes}")
    return position, consumed


def build_stream(data: DataConfig, tokenizer: Any, seed: int, resume_from: Path | None = None):
    """The training stream of a streaming SFT stage: an IterableDataset with one shard per process.

    Args:
        data: the stage's data section (`streaming: true`).
        tokenizer: the tokenizer `apply_template` prepared.
        seed: the training seed (shuffling, packing, mixing).
        resume_from: a checkpoint to continue from (its `stream-rank<r>.json`).

    Returns:
        (dataset, stream): the dataset for the trainer and this process's TokenStream (for `StreamCheckpoint`).

    Raises:
        FinetuneError: A source that cannot be opened, a bad resume position, or (while training) a bad row.
    """
    from datasets import IterableDataset

    from finetune.distributed.process import rank, world_size

    start, consumed = read_position(resume_from, rank(), world_size()) if resume_from else (Position(), 0)
    stream = TokenStream(data, tokenizer, seed, rank(), world_size(), start, consumed)
    key = uuid.uuid4().hex
    _STREAMS[key] = stream
    dataset = IterableDataset.from_generator(_generate, gen_kwargs={"stream_id": key,
                                                                    "part": list(range(world_size()))})
    return dataset, stream


def stream_checkpoint(stream: TokenStream, samples_per_step: int):
    """A TrainerCallback that writes each process's stream position into every checkpoint it saves."""
    from transformers import TrainerCallback

    class StreamCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            consumed = state.global_step * samples_per_step
            saved = {"position": asdict(stream.position(consumed)), "consumed": consumed,
                     "processes": stream.world}
            folder.mkdir(parents=True, exist_ok=True)  # several processes: each may get here first
            tmp = folder / f".{POSITION_FILE.format(rank=stream.rank)}.tmp"
            tmp.write_text(json.dumps(saved), encoding="utf-8")
            os.replace(tmp, folder / POSITION_FILE.format(rank=stream.rank))

    return StreamCheckpoint()
