# Shortcuts for a checkout with the virtual environment of README.md active.
.PHONY: test test-quick lint docs

test:        ## everything, as CI runs it (the embedded model and the notebooks included)
	python -m pytest -q

test-quick:  ## offline and quick: leaves out the tests that need the embedded model and the slow ones
	python -m pytest -q -m "not demo and not slow"

lint:        ## lint, format check and the layering contracts
	ruff check . && ruff format --check . && lint-imports
