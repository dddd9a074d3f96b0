"""`data.streaming: true`: lazily read sources, block shuffle, tokenize and pack on the fly, resume at the recorded
row, disjoint and covering shards per process, the Hub boundary, and the recipe/row errors. Expected ids are
hand-computed from the character tokenizer (one id per character, eos = 3)."""

from __future__ import annotations

import itertools
import json

import pytest
from conftest import char_id

from finetune.data import apply_template
from finetune.data.stream_train import Position, TokenStream, build_stream, read_position, stream_checkpoint
from finetune.errors import FinetuneError
from finetune.recipe.schema import Recipe

EOS = 3


def text_ids(text: str) -> list[int]:
    return [char_id(c) for c in text] + [EOS]


def _stream(tok, data, **kw) -> TokenStream:
    apply_template(tok, data)
    return TokenStream(data, tok, seed=kw.pop("seed", 5), **kw)


def _texts(stream: TokenStream, n: int) -> list[str]:
    """The first n samples of an unpacked text stream, decoded back to their row text."""
    return ["".join(chr(t - 5 + 32) for t in s["input_ids"][:-1]) for s in itertools.islice(stream, n)]


def test_text_rows_packed_on_the_fly(tok, cfg, write):
    f = write("t.jsonl", [{"text": t} for t in ["aaaaaa", "bbbb", "ccc", "dd"]])
    data = cfg({"path": str(f), "format": "text"}, streaming=True, packing=True, max_length=10)
    rows = list(itertools.islice(_stream(tok, data), 2))
    # best fit decreasing into rows of 10: a(7) opens a row (3 left), b(5) another (5 left), c(4) joins b, d(3) joins a
    got = sorted((tuple(r["seq_lengths"]), tuple(r["input_ids"])) for r in rows)
    assert got == [((5, 4), tuple(text_ids("bbbb") + text_ids("ccc"))),
                   ((7, 3), tuple(text_ids("aaaaaa") + text_ids("dd")))]
    assert all(r["labels"] == r["input_ids"] for r in rows)  # plain text: every token trained


def test_chat_rows_masked_like_the_preprocessed_path(tok, cfg, write, expect):
    from finetune.data import build_dataset

    f = write("c.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant",
                                                                           "content": f"a{i}"}]} for i in range(3)])
    data = cfg(f, streaming=True)
    streamed = list(itertools.islice(_stream(tok, data), 3))
    whole = build_dataset(cfg(f), tok, "sft", seed=5, split="train")
    assert streamed == [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in whole]
    assert (streamed[0]["input_ids"], streamed[0]["labels"]) == expect(
        "<|im_start|>user\nq0<|im_end|><|im_start|>assistant\n«a0<|im_end|>»")


def test_block_shuffle_and_resume_lands_on_the_recorded_row(tok, cfg, write):
    names = [f"r{i}" for i in range(10)]
    f = write("t.jsonl", [{"text": t} for t in names])
    data = cfg({"path": str(f), "format": "text"}, streaming=True, shuffle=True, shuffle_buffer=4)
    first = _stream(tok, data)
    run = _texts(first, 16)
    # blocks of 4 rows: rows 0-3 give samples 0-3, rows 4-7 samples 4-7, rows 8-9 samples 8-9; then pass 2
    assert sorted(run[0:4]) == names[0:4] and sorted(run[4:8]) == names[4:8] and sorted(run[8:10]) == names[8:10]
    assert sorted(run[10:14]) == names[0:4] and run[10:14] != run[0:4]  # each pass its own permutation
    assert first.position(5) == Position(epoch=0, rows=4, skip=1)
    assert first.position(9) == Position(epoch=0, rows=8, skip=1)
    assert first.position(11) == Position(epoch=1, rows=0, skip=1)
    for consumed in (5, 8, 11):
        resumed = _stream(tok, data, start=first.position(consumed), consumed=consumed)
        assert _texts(resumed, 16 - consumed) == run[consumed:]
        assert resumed.position(consumed + 2) == first.position(consumed + 2)  # positions count on from there


def test_checkpoint_records_the_position_and_build_stream_resumes_from_it(tok, cfg, write, tmp_path):
    f = write("t.jsonl", [{"text": f"r{i}"} for i in range(10)])
    data = cfg({"path": str(f), "format": "text"}, streaming=True, shuffle=True, shuffle_buffer=4)
    apply_template(tok, data)
    dataset, stream = build_stream(data, tok, seed=5)
    assert dataset.n_shards == 1
    run = ["".join(chr(t - 5 + 32) for t in s["input_ids"][:-1]) for s in itertools.islice(dataset, 12)]
    callback = stream_checkpoint(stream, samples_per_step=3)  # micro-batch 3, one accumulation step

    class Args:
        output_dir = str(tmp_path / "checkpoints")

    class State:
        global_step = 2

    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    callback.on_save(Args(), State(), None)
    saved = tmp_path / "checkpoints" / "checkpoint-2"
    assert json.loads((saved / "stream-rank0.json").read_text()) == {
        "position": {"epoch": 0, "rows": 4, "skip": 2}, "consumed": 6, "processes": 1}
    assert read_position(saved, 0) == (Position(0, 4, 2), 6)
    resumed, _ = build_stream(data, tok, seed=5, resume_from=saved)
    again = ["".join(chr(t - 5 + 32) for t in s["input_ids"][:-1]) for s in itertools.islice(resumed, 6)]
    assert again == run[6:12]
    with pytest.raises(FinetuneError, match="stream-rank1.json is missing"):
        read_position(saved, 1, 2)
    with pytest.raises(FinetuneError, match=r"read by 1 process\(es\), this one has 2; .* resume with --nproc 1"):
        read_position(saved, 0, 2)


@pytest.mark.parametrize("files", [1, 2])
def test_two_processes_read_disjoint_shards_that_cover_the_data(tok, cfg, write, tmp_path, files):
    names = [f"r{i}" for i in range(10)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k in range(files):  # one file: every other row per process; two files (rows 0-4, 5-9): one file each
        part = names[k * 10 // files:(k + 1) * 10 // files]
        (folder / f"part{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    data = cfg({"path": str(folder), "format": "text"}, streaming=True, shuffle=True, shuffle_buffer=3)
    shares = [_texts(_stream(tok, data, rank=r, world=2), 5) for r in (0, 1)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(names)
    expected_rank0 = names[0::2] if files == 1 else names[0:5]  # rows 0,2,4,.. or the whole first file
    assert sorted(shares[0]) == sorted(expected_rank0)


def test_accelerate_gives_each_process_its_shard_without_rereading(tok, cfg, write, monkeypatch):
    from accelerate.data_loader import IterableDatasetShard, prepare_data_loader
    from torch.utils.data import DataLoader

    import finetune.distributed.process as process

    f = write("t.jsonl", [{"text": f"r{i}"} for i in range(6)])
    data = cfg({"path": str(f), "format": "text"}, streaming=True)
    apply_template(tok, data)
    monkeypatch.setattr(process, "world_size", lambda: 2)
    monkeypatch.setattr(process, "rank", lambda: 1)
    dataset, stream = build_stream(data, tok, seed=5)
    assert dataset.n_shards == 2 and stream.rank == 1
    loader = prepare_data_loader(DataLoader(dataset, batch_size=1, collate_fn=lambda b: b), num_processes=2,
                                 process_index=1, dispatch_batches=False, put_on_device=False)
    assert not isinstance(loader.dataset, IterableDatasetShard)  # not: every process reads all, keeps a slice
    got = [next(iter(loader))[0]["input_ids"] for _ in range(1)]
    assert got == [text_ids("r1")]


def test_hub_source_is_streamed_through_load_dataset(tok, cfg, write, monkeypatch):
    import datasets

    f = write("t.jsonl", [{"text": "hub row"}])
    calls = []
    real = datasets.load_dataset

    def fake(path, **kw):
        if path == "json":
            return real(path, **kw)
        calls.append((path, kw))
        return real("json", data_files=[str(f)], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = cfg({"path": "someorg/corpus", "subset": "en", "split": "train", "format": "text"}, streaming=True)
    assert _texts(_stream(tok, data), 1) == ["hub row"]
    assert calls == [("someorg/corpus", {"name": "en", "revision": None, "split": "train", "streaming": True})]


def test_bad_rows_and_sources_fail_with_the_file(tok, cfg, write, tmp_path):
    f = write("bad.jsonl", [{"text": "fine"}, {"text": 7}])
    with pytest.raises(FinetuneError, match=r"data.train\[0\] '.*bad.jsonl': a streamed row is not a valid 'text' "
                                            r"row \(.*bad.jsonl line 2\): \{\"text\": 7\}"):
        list(itertools.islice(_stream(tok, cfg({"path": str(f), "format": "text"}, streaming=True)), 2))
    empty = write("empty.jsonl", [])
    with pytest.raises(FinetuneError, match="holds no rows"):
        _stream(tok, cfg(empty, streaming=True))
    with pytest.raises(FinetuneError, match="does not exist"):
        _stream(tok, cfg(tmp_path / "missing.jsonl", streaming=True))


def test_streaming_needs_max_steps_before_anything_loads(tiny_model, write):
    f = write("t.jsonl", [{"text": "x"}])
    recipe = {"model": {"name_or_path": str(tiny_model)}, "data": {"train": [{"path": str(f)}], "streaming": True}}
    with pytest.raises(Exception, match=r"training.max_steps: data.streaming reads the data as it trains"):
        Recipe.model_validate(recipe)
    Recipe.model_validate({**recipe, "training": {"max_steps": 10}})


def test_preview_and_checks_read_the_head_of_a_stream_only(tok, cfg, write, monkeypatch):
    import finetune.data.stream_train as stream_train
    from finetune.data import build_dataset
    from finetune.data.build import prepare

    monkeypatch.setattr(stream_train, "HEAD_ROWS", 3)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    f = write("c.jsonl", rows)
    data = cfg({"path": str(f), "max_samples": 5}, streaming=True)
    apply_template(tok, data)
    head = prepare(data, tok, "sft", 5, "train")
    assert len(head.dataset) == 3 and head.report.samples == 3
    # each sample: <|im_start|>user\nqN<|im_end|><|im_start|>assistant\naN<|im_end|> = 1+5+2+1+1+10+2+1 tokens
    assert head.report.tokens == 3 * 23 and head.report.trained_tokens == 3 * 3
    assert "data.train[0] messages first 3 rows/streamed" in head.report.summary()
    whole = list(itertools.islice(_stream(tok, data), 6))  # max_samples: the first 5 rows, then the next pass
    five = build_dataset(cfg(write("five.jsonl", rows[:5])), tok, "sft", seed=5, split="train")
    assert [s["input_ids"] for s in whole[:5]] == [s["input_ids"] for s in five]
    assert whole[5] == whole[0]
