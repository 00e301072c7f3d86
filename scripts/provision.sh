#!/usr/bin/env bash
# Provisions the server binaries the real-server tests run (tests/servers.py): Prometheus, promtool
# and Alertmanager. `make test` and `.ci/run` both call it, so a laptop and CI get them the same way:
#
# - a binary already on PATH, under any of its names, is used as it is (Alertmanager is
#   `prometheus-alertmanager` on Debian, `alertmanager` in the upstream archives and elsewhere);
# - as root with apt-get (Debian/Ubuntu; CI), the missing ones are installed from the Debian
#   packages `prometheus` (prometheus, promtool) and `prometheus-alertmanager`; a policy-rc.d keeps
#   the packages from starting their system services during the install;
# - otherwise it says what is missing and how to install it, and exits 0: the tests that need a
#   missing binary are skipped, each naming it (pytest's summary counts them).
#
# REQUIRE_SERVER_BINARIES=1 (or --require; .ci/run sets it): exit 1 when a binary is still missing,
# and the tests fail rather than skip (tests/servers.py reads the same variable).
set -euo pipefail

if [ "${1:-}" = "--require" ]; then
  REQUIRE_SERVER_BINARIES=1
fi
require=${REQUIRE_SERVER_BINARIES:-0}

say() { printf 'provision: %s\n' "$*" >&2; }

have() {  # have NAME...: one of the names is on PATH
  local name
  for name in "$@"; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  return 1
}

missing=() packages=()
check() {
  missing=() packages=()
  have prometheus || missing+=(prometheus)
  have promtool || missing+=(promtool)
  have prometheus-alertmanager alertmanager || missing+=(alertmanager)
  if ! have prometheus || ! have promtool; then packages+=(prometheus); fi
  if ! have prometheus-alertmanager alertmanager; then packages+=(prometheus-alertmanager); fi
}

check
if [ ${#missing[@]} -eq 0 ]; then
  say "prometheus, promtool and alertmanager found; the real-server tests run"
  exit 0
fi
say "not found on PATH: ${missing[*]} (the real-server tests need them)"

if [ "$(id -u)" = 0 ] && have apt-get; then
  say "installing the Debian packages: ${packages[*]}"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"; }
  then
    say "apt-get failed (no network or no such package?)"
  fi
  check
elif have apt-get; then
  say "not root: run \`sudo scripts/provision.sh\` (it runs: apt-get install -y --no-install-recommends ${packages[*]})"
else
  say "no apt-get here: put ${missing[*]} on PATH, from the release archives of https://prometheus.io/download/"
  say "(prometheus and promtool: prometheus-*.tar.gz; alertmanager: alertmanager-*.tar.gz), or your package"
  say "manager's (e.g. brew install prometheus alertmanager)"
fi

if [ ${#missing[@]} -eq 0 ]; then
  say "installed: prometheus, promtool and alertmanager found; the real-server tests run"
  exit 0
fi
if [ "$require" = 1 ]; then
  say "still missing: ${missing[*]}; REQUIRE_SERVER_BINARIES=1: failing"
  exit 1
fi
say "still missing: ${missing[*]}; the tests that need them are skipped (pytest's summary lists them)"
