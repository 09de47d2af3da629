# The two commands of the README. Both do their own set-up (scripts/setup.sh is idempotent).
.PHONY: setup demo test test-fast bench

setup:
	./scripts/setup.sh

# Prune the embedded SmolLM2-135M with Wanda at 50%, evaluate dense and pruned perplexity on the
# offline default corpus, print the table, save the model to out/smollm2-wanda50.
demo: setup
	.venv/bin/prunekit prune default --method wanda --sparsity 0.5 --out out/smollm2-wanda50 --overwrite

# The whole test suite, real-model integration included (what .ci/run runs).
test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

bench: setup
	.venv/bin/python bench/cpu_smollm2.py
