#!/usr/bin/env bash
# System packages napari needs to run headless (Xvfb + the xcb libraries of Qt 6).
# Installs only what is missing; needs root (or sudo) the first time.
set -euo pipefail
PKGS="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libgl1 libegl1 libgl1-mesa-dri libglib2.0-0
libfontconfig1 libdbus-1-3 libxkbcommon-x11-0 libxcb-cursor0 libxcb-image0 libxcb-randr0
libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null; then
    echo "install-system-deps: no apt-get; install these yourself:$missing" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
