"""Data people already have: ShareGPT and Alpaca rows, renamed columns, tool turns and
multi-turn chats become the chats tuneloop trains on, and a row missing what its format reads
is named with the column."""

import json

import pytest

from helpers import tiny_config
from tuneloop.config import ConfigError, Source, load_config
from tuneloop.data_pipeline.prepare import DataError, prepare, read_source, to_example
from tuneloop.formats import FormatError, to_chat


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_sharegpt_speakers_become_roles_and_other_columns_stay():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello"}, {"from": "function_response", "value": "{}"},
                             {"from": "gpt", "value": "Done"}], "category": "chat"}
    chat = to_chat(row, "sharegpt")
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert chat["category"] == "chat" and "conversations" not in chat
    renamed = {"dialog": [{"speaker": "human", "text": "Hi"}, {"speaker": "gpt", "text": "Yo"}]}
    cols = {"conversations": "dialog", "from": "speaker", "value": "text"}
    assert to_chat(renamed, "sharegpt", cols)["messages"][1] == {"role": "assistant", "content": "Yo"}
    with pytest.raises(FormatError, match=r"conversations.1.from: unknown speaker 'robot'"):
        to_chat({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}, "sharegpt")


def test_alpaca_instruction_and_input_make_the_prompt_and_output_the_answer():
    chat = to_chat({"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Math.", "level": 1}, "alpaca")
    assert chat["messages"] == [{"role": "system", "content": "Math."}, {"role": "user", "content": "Add.\n\n2 and 3"},
                                {"role": "assistant", "content": "5"}]
    assert chat["level"] == 1 and "instruction" not in chat
    mine = to_chat({"question": "Capital of France?", "answer": "Paris"}, "alpaca",
                   {"instruction": "question", "output": "answer"})
    assert [m["content"] for m in mine["messages"]] == ["Capital of France?", "Paris"]
    with pytest.raises(FormatError, match="no output in column 'answer'"):
        to_chat({"question": "q"}, "alpaca", {"instruction": "question", "output": "answer"})


def test_a_source_reads_its_format_and_names_the_row_that_lacks_a_column(tmp_path):
    p = write(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say yo."}])
    with pytest.raises(DataError, match=r"a.jsonl:2: no output in column 'output'"):
        read_source(p, "a", 1.0, "fail", source=Source(path=str(p), format="alpaca"))
    src = read_source(p, "a", 1.0, "skip", source=Source(path=str(p), format="alpaca"))
    assert len(src.rows) == 1 and src.rows[0].answer == "hi" and len(src.rejected) == 1


def test_source_settings_that_cannot_work_are_refused_at_load(tmp_path):
    c = tmp_path / "c.yaml"
    for source, says in (("{path: a.jsonl, format: alpaca, columns: {question: q}}", "format alpaca reads instruction"),
                         ("{path: a.jsonl, revision: main}", "subset and revision are for a hub data set"),
                         ("{path: a.jsonl, format: csv}", "data.sources.0.format")):
        c.write_text(f"data: {{sources: [{source}]}}\n")
        with pytest.raises(ConfigError, match=says):
            load_config(c)
    c.write_text("data: {sources: [{hub: org/name, subset: fr, revision: v1.0}]}\n")
    assert load_config(c).data.sources[0].subset == "fr"


def test_every_assistant_turn_of_a_chat_is_trained_with_the_chat_before_it(tmp_path):
    """SFT learns each answer of a multi-turn chat (the prompt: everything before it), so every
    assistant turn is in the loss and no user turn is; `turns: last` keeps the last answer only;
    held-out cases are the last answer."""
    chat = {"messages": [{"role": "user", "content": f"q{i}"} if i % 2 == 0 else {"role": "assistant", "content": f"a{i}"}
                         for i in range(6)]}  # q0 a1 q2 a3 q4 a5
    chat["messages"].insert(3, {"role": "tool", "content": "t"})  # a tool's answer before q2
    rows = [{**chat, "messages": [dict(m, content=f"{m['content']}-{n}") for m in chat["messages"]]} for n in range(40)]
    data = write(tmp_path / "multi.jsonl", rows)
    cfg = tiny_config(tmp_path)
    cfg.data.sources[0].path, cfg.data.val_fraction, cfg.data.test_fraction = str(data), 0.1, 0.1
    cfg.data.quality.max_violation_rate = 1.0  # (the answers are not the protocol task's JSON)
    p = prepare(cfg, tmp_path / "data", tmp_path)
    train = [json.loads(line) for line in (tmp_path / p.splits["train"][0]).read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / p.splits["val"][0]).read_text().splitlines()]
    assert len(train) == 3 * 32 and len(val) == 4
    answers = sorted({t["completion"].split("-")[0] for t in train})
    assert answers == ["a1", "a3", "a5"]
    third = next(t for t in train if t["completion"].startswith("a5"))
    assert "q4" in third["prompt"] and "a3" in third["prompt"] and "t-" in third["prompt"]  # the chat before it
    assert all(v["completion"].startswith("a5") for v in val)
    cfg.data.turns = "last"
    last = prepare(cfg, tmp_path / "data", tmp_path)
    assert last.splits["train"][1] == 32


def test_a_tool_turn_is_rendered_as_input_in_tuneloops_template():
    from tuneloop.data_pipeline.prepare import Row

    row = Row.model_validate({"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "call"},
                                           {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]})
    ex = to_example(row, "tuneloop")
    assert ex["prompt"].count("sunny") == 1 and ex["completion"] == "Sunny."
    assert to_example(row, "tuneloop", turn=1)["completion"] == "call"
    assert to_example(row, "model")["prompt"][2] == {"role": "tool", "content": "sunny"}
