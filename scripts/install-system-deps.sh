#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use as real peers:
# postfix (with smtp-source/smtp-sink), swaks and graphviz. Idempotent.
set -euo pipefail
need=()
command -v swaks >/dev/null || need+=(swaks)
command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v dot >/dev/null || need+=(graphviz)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "install-system-deps: need root (or sudo) to install: ${need[*]}" >&2; exit 2
  fi
fi
echo "installing Debian packages: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
