#!/bin/bash
# Installs what the frontend test drives the real ComfyUI web UI with: Debian's chromium (apt) and npm playwright-core
# (into .host/browser/, git-ignored). Playwright never downloads a browser here: the test launches /usr/bin/chromium.
# Idempotent: a second run takes well under a second. Exits non-zero with the reason on stderr when either cannot
# be installed; the frontend test then skips with that reason.
#   usage: scripts/install_browser.sh        (QS_HOST_DIR overrides the location of .host)
set -uo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
DEST=${QS_HOST_DIR:-$PACK/.host}/browser
mkdir -p "$DEST"

fail() { echo "install_browser: $1" >&2; exit 1; }

# Debian packages, with one `apt-get update` per run, only when something is missing.
APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null || fail "$* missing and no apt-get to install it"
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || fail "$* missing and not root (nor passwordless sudo) to apt-get install it"
    sudo="sudo -n"
  fi
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$APT_UPDATED" ]; then
    $sudo apt-get update -q >/dev/null || fail "apt-get update failed: Debian registry unreachable?"
    APT_UPDATED=1
  fi
  $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null || fail "apt-get install $* failed"
}

[ -x /usr/bin/chromium ] || apt_install chromium
[ -x /usr/bin/chromium ] || fail "apt-get installed chromium but /usr/bin/chromium is missing"
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm

if [ ! -f "$DEST/node_modules/playwright-core/package.json" ]; then
  [ -f "$DEST/package.json" ] || echo '{"private": true}' > "$DEST/package.json"
  # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing itself; the variable makes that explicit.
  (cd "$DEST" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --silent playwright-core@1.65.1) \
    || fail "npm install playwright-core failed: npm registry unreachable?"
fi
echo "browser ready: /usr/bin/chromium, $DEST/node_modules/playwright-core"
