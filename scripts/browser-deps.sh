#!/usr/bin/env bash
# What the report's browser test needs beyond pip: Debian's chromium and chromium-driver
# (/usr/bin/chromium, /usr/bin/chromedriver). Installs them when missing; does nothing when present.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "error: chromium and chromium-driver are missing and this user cannot install them; run as root, or install them first" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: chromium and chromedriver are missing and there is no apt-get; install Chromium and ChromeDriver with this system's package manager" >&2
  exit 1
fi
echo "installing Debian's chromium and chromium-driver (for the report's browser test)" >&2
# finish any dpkg run that was cut off earlier (a machine stopped mid-install): apt-get refuses
# to work until it is done ("dpkg was interrupted"); a no-op when nothing is pending
DEBIAN_FRONTEND=noninteractive $sudo dpkg --configure -a >/dev/null
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
