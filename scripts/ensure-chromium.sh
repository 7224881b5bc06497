#!/bin/sh
# Make sure Debian's chromium is installed for the browser tests (tests/browser).
# Exits 0 when /usr/bin/chromium (or $CADENCE_CHROMIUM) runs, 1 when it cannot be installed.
# Never downloads browsers through Playwright: the tests drive this system Chromium.
set -u
CHROMIUM="${CADENCE_CHROMIUM:-/usr/bin/chromium}"

works() { [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; }

if works; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure-chromium: $CHROMIUM is missing and installing it needs root (or password-less sudo)" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: $CHROMIUM is missing and apt-get is not available to install it" >&2
    exit 1
fi

echo "ensure-chromium: installing Debian's chromium package..." >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; }

if works; then
    echo "ensure-chromium: $("$CHROMIUM" --version)" >&2
    exit 0
fi
echo "ensure-chromium: could not install chromium with apt-get" >&2
exit 1
