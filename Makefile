# The two commands of the README (`make demo`, `make test`). Both install what they need first (scripts/install_host.sh is idempotent).
PY := .host/venv/bin/python

.PHONY: host browser demo test bench
host:
	@bash scripts/install_host.sh

# Debian chromium + npm playwright-core for tests/test_frontend.py. Where they cannot be installed the script says
# why and the frontend test skips with that reason; the other tests still run, so its failure does not stop make.
browser:
	@bash scripts/install_browser.sh || echo "browser unavailable: tests/test_frontend.py will skip (reason above)"

demo: host
	$(PY) scripts/demo.py

# pytest's exit 5 (no test ran) is non-zero, so make fails on it too.
test: host browser
	$(PY) -m pytest -q -rs

bench: host
	$(PY) -m bench.solvers
