#!/bin/bash
# Installs what the frontend test drives the real ComfyUI web UI with: Debian's chromium (apt) and npm playwright-core
# (into .host/browser/, git-ignored). Playwright never downloads a browser here: the test launches /usr/bin/chromium.
# Idempotent: a second run takes well under a second. Exits non-zero with the reason when either cannot be installed;
# the frontend test then skips with that reason.
#   usage: scripts/install_browser.sh        (QS_HOST_DIR overrides the location of .host)
set -uo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
DEST=${QS_HOST_DIR:-$PACK/.host}/browser
REASON_FILE=$DEST/unavailable.txt
mkdir -p "$DEST"

fail() { echo "$1" > "$REASON_FILE"; echo "install_browser: $1" >&2; exit 1; }

if [ ! -x /usr/bin/chromium ]; then
  command -v apt-get >/dev/null || fail "no /usr/bin/chromium and no apt-get to install Debian's chromium"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || fail "no /usr/bin/chromium and not root (nor passwordless sudo) to apt-get install it"
    SUDO="sudo -n"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >/dev/null || fail "apt-get update failed: Debian registry unreachable?"
  $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null || fail "apt-get install chromium failed"
  [ -x /usr/bin/chromium ] || fail "apt-get installed chromium but /usr/bin/chromium is missing"
fi

if [ ! -f "$DEST/node_modules/playwright-core/package.json" ]; then
  command -v npm >/dev/null || fail "npm not found (needed for playwright-core)"
  [ -f "$DEST/package.json" ] || echo '{"private": true}' > "$DEST/package.json"
  # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing itself; the variable makes that explicit.
  (cd "$DEST" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --silent playwright-core@1) \
    || fail "npm install playwright-core failed: npm registry unreachable?"
fi
rm -f "$REASON_FILE"
echo "browser ready: /usr/bin/chromium, $DEST/node_modules/playwright-core"
