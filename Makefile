# The two commands of the README. Both install what they need first (scripts/install_host.sh is idempotent).
PY := .host/venv/bin/python

.PHONY: host demo test bench
host:
	@bash scripts/install_host.sh

demo: host
	$(PY) scripts/demo.py

# pytest's exit 5 (no test ran) is non-zero, so make fails on it too.
test: host
	$(PY) -m pytest -q -rs

bench: host
	$(PY) -m bench.solvers
