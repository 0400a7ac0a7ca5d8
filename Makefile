# The two commands of the README (`make demo`, `make test`). Both install what they need first (scripts/install_host.sh is idempotent).
# HOST picks the ComfyUI host: 0.3.75 (default, in .host/) or 0.33 (a developer check in .host033/; its source is
# on no package index, see scripts/install_host.sh). QS_COMFY_VERSION in the environment does the same.
HOST ?= $(or $(QS_COMFY_VERSION),0.3.75)
HOST_DIR_0.3.75 := .host
HOST_DIR_0.33 := .host033
export QS_COMFY_VERSION := $(HOST)
export QS_HOST_DIR ?= $(abspath $(or $(HOST_DIR_$(HOST)),$(error HOST must be 0.3.75 or 0.33, got '$(HOST)')))
PY := $(QS_HOST_DIR)/venv/bin/python

.PHONY: host browser demo test bench
host:
	@bash scripts/install_host.sh

# Debian chromium + npm playwright-core for tests/test_frontend.py. Where they cannot be installed the script says
# why and the frontend test skips with that reason; the other tests still run, so its failure does not stop make.
browser:
	@bash scripts/install_browser.sh || echo "browser unavailable: tests/test_frontend.py will skip (reason above)"

demo: host
	$(PY) scripts/demo.py

# pytest's exit 5 (no test ran) is non-zero, so make fails on it too. The 20 slowest tests are listed at the end
# (the suite must stay under 15 minutes on the 2-core CI machine).
test: host browser
	$(PY) -m pytest -q -rs --durations=20

bench: host
	$(PY) -m bench.solvers
