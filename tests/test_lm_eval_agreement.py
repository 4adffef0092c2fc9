"""bench/lm_eval_agreement.py: lm-evaluation-harness's own ifeval task (its HF backend, the copied task
folder, the chat template applied) and `trainer eval`'s library path give the same responses and the
same pass/fail verdicts on a trained tiny checkpoint; and the copied task folder is lm-eval's own,
changed in its dataset path only."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from trainer.evals.prompts import HeldoutPrompt

pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    """bench/lm_eval_agreement.py as a module (bench/ is scripts, not a package)."""
    if "lm_eval_agreement" in sys.modules:
        return sys.modules["lm_eval_agreement"]
    spec = importlib.util.spec_from_file_location("lm_eval_agreement", ROOT / "bench" / "lm_eval_agreement.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Prompts trained_checkpoint answers (support.PAIRS), each with checks its answer passes and fails.
PROMPTS = [
    HeldoutPrompt("fruit", "Name a fruit.", ["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}]),
    HeldoutPrompt("hello", "Say hello.", ["keywords:existence", "punctuation:no_comma"],
                  [{"keywords": ["hello"]}, {}]),
    HeldoutPrompt("france", "Capital of France?", ["length_constraints:number_words", "startend:end_checker"],
                  [{"relation": "less than", "num_words": 5}, {"end_phrase": "Paris."}]),
]


def test_lm_eval_and_trainer_eval_agree_on_a_tiny_checkpoint(trained_checkpoint):
    bench = _bench()
    ours, theirs, result = bench.agreement(trained_checkpoint, PROMPTS, max_new_tokens=16, batch_size=2)
    print("\n" + "\n".join(bench.report(ours, theirs, result)))
    assert all(ours.responses), "the checkpoint answers every prompt"
    verdicts = [v for side in (ours, theirs) for per_prompt in side.strict for v in per_prompt]
    assert True in verdicts and False in verdicts, "the checks pass and fail, so a disagreement would show"
    assert result.same_prompt_ids == len(PROMPTS), "both render the same chat template into the same token ids"
    assert theirs.responses == ours.responses
    assert theirs.strict == ours.strict and theirs.loose == ours.loose
    assert result.identical == len(PROMPTS) and result.differences == []
    assert theirs.metrics == pytest.approx(ours.metrics)
    assert result.agree


def test_the_task_folder_is_lm_evals_own_but_for_the_dataset_path():
    import lm_eval

    theirs = Path(lm_eval.__file__).parent / "tasks" / "ifeval"
    ours = ROOT / "bench" / "lm_eval_ifeval"
    assert (ours / "utils.py").read_text() == (theirs / "utils.py").read_text()
    a, b = (theirs / "ifeval.yaml").read_text().splitlines(), (ours / "ifeval.yaml").read_text().splitlines()
    changed = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    assert changed == [("dataset_path: google/IFEval", "dataset_path: json")]
