#!/usr/bin/env bash
# Installs Debian's headless browser for the dashboard's browser test
# (tests/service/test_dashboard_browser.py) when it is missing. Debian's packages
# only: the test never downloads a browser build of its own.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromium && command -v chromedriver
