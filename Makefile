# A fresh machine needs Python 3.11 (the last onnxruntime-training wheels stop there).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-matrices lint bench mutation clean

$(BIN)/gfcompile: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,federated]'
	touch $(BIN)/gfcompile

setup: $(BIN)/gfcompile

# Compile the bundled pretrained model (digits 0-4) and fine-tune it on digits 5-9.
demo: setup
	$(BIN)/gfcompile models/zoo/mobilenetv2_digits.onnx --filter-layers 4 --batch-size 32 --lr 0.003 -o out/ --force
	$(BIN)/gfcompile train out/ --data models/data/digits_5to9_train.npz \
		--eval-data models/data/digits_5to9_test.npz --steps 50

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The full matrices the default run samples (hours on 2 cores): zoo x N x r, zoo x portable mode,
# every torchvision architecture x mode.
test-matrices: setup
	$(BIN)/python -m pytest -q -m "zoo_matrix or portable_matrix or torchvision_matrix"

# Plant known bugs (scripts/mutation.py) in a copy of the repository; fails if the tests miss one.
mutation: setup
	$(BIN)/python scripts/mutation.py --baseline

bench: setup
	$(BIN)/python -m benchmarks all --profile quick

clean:
	rm -rf $(VENV) out
