"""Loading Alpaca and chat records from files, malformed records, the split."""

import json

import pandas as pd
import pytest

from trainer.core.errors import StepwiseError
from trainer.training.data import load_records, split_records

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Reverse the list.", "input": "a, b", "output": "b, a"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_alpaca_in_every_format(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(ALPACA))
    elif suffix == ".jsonl":
        write_jsonl(path, ALPACA)
    elif suffix == ".parquet":
        pd.DataFrame(ALPACA).to_parquet(path)
    else:
        pd.DataFrame(ALPACA).to_csv(path, index=False)
    records, report = load_records(str(path))
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Reverse the list.\n\na, b"}, {"role": "assistant", "content": "b, a"}],
    ]
    assert report.kept == 2 and not report.skipped_lines


def test_chat_and_sharegpt_records(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
    ])
    records, _ = load_records(str(path))
    assert records[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert records[1]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]


def test_malformed_lines_are_skipped_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        ALPACA[0],
        "{not json",
        {"instruction": "No output"},
        {"instruction": 7, "output": "x"},
        {"instruction": "Empty", "output": "   "},
        ALPACA[1],
    ])
    records, report = load_records(str(path))
    assert len(records) == 2
    assert report.skipped_lines == [2, 3, 4, 5]
    assert "skipped 4 malformed" in report.summary() and "first at line 2" in report.summary()


def test_strict_rejects_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ALPACA[0], {"instruction": "x", "output": 3}])
    with pytest.raises(StepwiseError, match=r"bad\.jsonl:2: missing or non-string output"):
        load_records(str(path), strict=True)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(StepwiseError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))
    other = tmp_path / "data.txt"
    other.write_text("hello")
    with pytest.raises(StepwiseError, match="unknown format"):
        load_records(str(other))


def test_second_load_uses_the_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = write_jsonl(tmp_path / "clean.jsonl", ALPACA * 50)
    load_records(str(path))
    cached = list((tmp_path / "cache").rglob("*.arrow"))
    assert cached, "a clean file goes through datasets and lands in its cache"
    stamp = {p: p.stat().st_mtime_ns for p in cached}
    load_records(str(path))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.arrow")} == stamp


def test_split_is_deterministic_and_rounds_val_up():
    records = list(range(52002))
    train, val = split_records(records, 0.05, seed=1)
    assert (len(train), len(val)) == (49401, 2601)
    assert split_records(records, 0.05, seed=1) == (train, val)
    assert split_records(records, 0.05, seed=2)[1] != val
    assert not set(train) & set(val)


def test_empty_file_folder_and_all_in_validation(tmp_path):
    from trainer.training.data import load_train_val

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(StepwiseError, match="no records"):
        load_records(str(empty))
    with pytest.raises(StepwiseError, match="is a folder"):
        load_records(str(tmp_path))
    one = write_jsonl(tmp_path / "one.jsonl", ALPACA[:1])
    with pytest.raises(StepwiseError, match="leaves none of the 1 record"):
        load_train_val(str(one), None, 0.05, 0, False, 10)


def write_with_bad_byte(path):
    """Two good Alpaca records around one whose text has a Latin-1 byte (not UTF-8): line 3 of each file."""
    bad = b'{"instruction": "Say caf\xe9.", "output": "caf\xe9"}'
    rows = [json.dumps(r).encode() for r in ALPACA]
    if path.suffix == ".jsonl":
        path.write_bytes(b"\n".join([rows[0], b"", bad, rows[1]]) + b"\n")  # a blank line 2
    elif path.suffix == ".json":
        path.write_bytes(b"[" + b",\n".join([rows[0], bad, rows[1]]) + b"]")  # records 1-3
    else:
        path.write_bytes(b'instruction,input,output\nAdd 2 and 3.,,5\nSay caf\xe9.,,caf\xe9\nReverse the list.,"a, b","b, a"\n')
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_bytes_that_are_not_utf8_are_one_malformed_record(tmp_path, suffix):
    path = write_with_bad_byte(tmp_path / f"data{suffix}")
    lines = {".jsonl": 3, ".json": 2, ".csv": 3}[suffix]  # a JSON array's "line" is the record's position
    records, report = load_records(str(path))
    assert [r["messages"][-1]["content"] for r in records] == ["5", "b, a"]
    assert report.skipped_lines == [lines] and report.reasons == {"not UTF-8 text": 1}
    with pytest.raises(StepwiseError, match=rf"data{suffix}:{lines}: not UTF-8 text$"):
        load_records(str(path), strict=True)


def test_a_bad_byte_outside_any_string_of_a_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"instruction": "a", "output": "b"},\n\xff{"instruction": "a", "output": "b"}]')
    with pytest.raises(StepwiseError, match=r"data\.json:2: not UTF-8 text \(byte 0xff\)$"):
        load_records(str(path))


def test_csv_errors_name_the_file_and_the_cause(tmp_path):
    """Not `datasets`' "An error occurred while generating the dataset"."""
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,input,output\na,,b\nc,,d,e\n")
    with pytest.raises(StepwiseError, match=r"ragged\.csv: could not load \(.*Expected 3 fields in line 3, saw 4\)$"):
        load_records(str(ragged))
    header = tmp_path / "header.csv"
    header.write_bytes(b"instrucci\xf3n,input,output\na,,b\n")
    with pytest.raises(StepwiseError, match=r"header\.csv:1: not UTF-8 text in the header"):
        load_records(str(header))
