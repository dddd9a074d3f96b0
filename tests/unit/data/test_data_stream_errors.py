"""Bad lines deep in a streamed training file (issue 33, item 10): training names the file and line instead of a raw
Arrow error, and `ft validate` says that it read only the head of a streamed source, reading it whole with `--full`."""

from __future__ import annotations

import itertools

import pytest
from typer.testing import CliRunner

import finetune.data.stream as stream
from finetune.cli import app
from finetune.data import apply_template
from finetune.data.stream_train import TokenStream
from finetune.errors import FinetuneError


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i} " + "x" * 40},
                         {"role": "assistant", "content": f"answer {i}"}]}


def _read_all(tok, data) -> None:
    apply_template(tok, data)
    list(itertools.islice(TokenStream(data, tok, seed=5), 10_000))


def test_a_truncated_line_deep_in_a_streamed_file_names_file_and_line(tok, cfg, write):
    rows = [chat(i) for i in range(3000)]
    rows[2499] = '{"messages": [{"role": "user", "cont'  # line 2500 cut off mid-write
    f = write("big.jsonl", rows)
    with pytest.raises(FinetuneError) as err:  # the Arrow reader fails on the chunk that holds it
        _read_all(tok, cfg(f, streaming=True, shuffle_buffer=100))
    assert str(err.value).startswith(f"data.train[0]: {f} line 2500 is not valid JSON (")
    assert "ArrowInvalid" not in str(err.value) and "--full" in str(err.value)


def test_a_bad_streamed_row_names_its_line(tok, cfg, write):
    rows = [chat(i) for i in range(30)]
    rows[20] = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}
    f = write("c.jsonl", rows[:10] + [""] + rows[10:])  # a blank line: line numbers are not row numbers
    with pytest.raises(FinetuneError) as err:
        _read_all(tok, cfg(f, streaming=True, shuffle_buffer=8))
    assert f"a streamed row is not a valid 'messages' row ({f} line 22)" in str(err.value)
    assert "(line 22: message 2: 'robot')" in str(err.value)


def _recipe(tmp_path, tiny_model, data) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name_or_path: {tiny_model}}}\ndata: {{train: [{{path: {data}}}], streaming: true}}\n"
                    f"training: {{max_steps: 5}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    return str(path)


def test_validate_says_it_read_the_head_and_full_reads_the_whole_stream(tmp_path, tiny_model, write, monkeypatch):
    monkeypatch.setattr(stream, "HEAD_ROWS", 5)
    rows = [chat(i) for i in range(12)]
    rows[8] = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}
    recipe = _recipe(tmp_path, tiny_model, write("s.jsonl", rows))
    head = CliRunner().invoke(app, ["validate", recipe])
    assert head.exit_code == 0, head.output
    assert ("of streamed training sources (data.train[0]) only the first 5 rows of each were read (training reads "
            "the rest as it goes): `ft validate --full` reads them whole") in head.output
    full = CliRunner().invoke(app, ["validate", recipe, "--full"])
    assert full.exit_code == 2 and "Traceback" not in full.output, full.output
    assert f"stage sft: data.train[0] '{tmp_path / 's.jsonl'}': a streamed row is not a valid 'messages' row " \
           f"({tmp_path / 's.jsonl'} line 9)" in full.output
    rows[8] = chat(8)
    recipe = _recipe(tmp_path, tiny_model, write("s.jsonl", rows))
    good = CliRunner().invoke(app, ["validate", recipe, "--full"])
    assert good.exit_code == 0 and "streamed training sources (data.train[0]) read whole (--full)" in good.output

