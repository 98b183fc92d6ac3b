#!/usr/bin/env bash
# Installs the Debian packages named on the command line when their binaries are missing.
# As root it installs them; otherwise it prints the one command that does.
set -euo pipefail

declare -A binary_of=(
  [mosquitto]=/usr/sbin/mosquitto
  [espeak-ng]=/usr/bin/espeak-ng
  [chromium]=/usr/bin/chromium
  [sox]=/usr/bin/sox
  [mbpoll]=/usr/bin/mbpoll
  [libcoap3-bin]=/usr/bin/coap-client-notls
)

missing=()
for package in "$@"; do
  binary=${binary_of[$package]:-}
  if [ -z "$binary" ]; then
    echo "ensure-system-packages: no binary known for package '$package'" >&2
    exit 2
  fi
  [ -x "$binary" ] || command -v "$(basename "$binary")" >/dev/null 2>&1 || missing+=("$package")
done

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "Missing system packages: ${missing[*]}. Install them with:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "Installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
