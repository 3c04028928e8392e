# Two commands on a fresh machine:  make demo  (the whole pipeline)  and  make test.
# A torch already in the virtualenv is kept (install your CUDA build first on a GPU machine);
# otherwise TORCH_SPEC is installed and every later install is constrained to it, so pip never
# swaps in a multi-GB CUDA build on a CPU box.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist processes, each taking whole test files: most tests wait on subprocesses and
# sockets, so 2 fill a 2-core box (TEST_WORKERS=0 runs them in this process, one at a time)
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export DS_BUILD_OPS ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test gpu-kit clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(VENV))/constraints.txt $(PY) -m pip install --quiet -e ".[dev]"
	# DeepSpeed JIT-builds its CPU all-reduce op at the first process-group start, and its CPU
	# AdamW (ZeRO-Offload) at the first offloaded run; a rank killed mid-build leaves a lock that
	# stalls every later start, so both are built once, here.
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pipeline.demo $(DEMO_ARGS)

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile $(TEST_ARGS)

# What bench/gpu/run.sh needs on a bare, offline GPU image: wheels and seq_len-1024 shards.
gpu-kit: $(STAMP)
	PYTHON=$(abspath $(PY)) bash bench/gpu/wheels.sh
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m data_prep --input "$$($(PY) -m data_prep fetch-demo-corpus | tail -1)" \
	    --out runs/gpu-data --tokenizer train:8192 --seq-len 1024 --val-fraction 0.02

clean:
	rm -rf runs .pytest_cache
