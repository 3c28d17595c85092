#!/usr/bin/env bash
# Installs the Debian packages that provide the capabilities the tests and benchmarks use
# (tests/doctor.py is the one list: swaks with Perl's Net::SSLeay for --tls, postfix with
# smtp-source/smtp-sink, graphviz, prometheus for promtool). It asks the doctor which
# capabilities are missing, so a machine that has a binary without what it needs (swaks without
# TLS) gets the package too. Today that can be: swaks libnet-ssleay-perl postfix graphviz
# prometheus (the table in tests/doctor.py decides; this line only names them). Idempotent; the helm binary is scripts/install-helm.sh's.
set -euo pipefail
python=${1:-.venv/bin/python}
mapfile -t need < <("$python" -m tests.doctor --debian-packages)
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
left=$("$python" -m tests.doctor --debian-packages)
if [ -n "$left" ]; then
  echo "install-system-deps: still missing after installing: $left (see make doctor)" >&2
  exit 1
fi
