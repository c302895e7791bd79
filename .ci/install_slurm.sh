#!/usr/bin/env bash
# Install a local Slurm (Debian slurm-wlm) and munge so tests/test_slurm.py can run
# a real two-node cluster on 127.0.0.1.
#
# Usage:   sudo .ci/install_slurm.sh
#
# Idempotent: packages already installed (checked with dpkg-query) are not fetched
# again and `apt-get update` only runs when something is missing.  Without root it
# prints a message and exits 0, so CI images without root simply skip the Slurm tests.
#
# Environment:
#   SLURM_PACKAGES  space-separated package list (default: "slurm-wlm munge")
set -euo pipefail

packages=${SLURM_PACKAGES:-"slurm-wlm munge"}

if [[ $(id -u) -ne 0 ]]; then
    echo "install_slurm.sh: not root; skipping the Slurm install (Slurm tests will be skipped)."
    exit 0
fi

missing=()
for pkg in $packages; do
    # "install ok installed" is the only state in which the package is usable.
    if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_slurm.sh: already installed: $packages"
    exit 0
fi

echo "install_slurm.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# The packages' postinst scripts try to start services via invoke-rc.d; in containers
# without an init system that fails harmlessly, and the tests start the daemons themselves.
apt-get install -y --no-install-recommends "${missing[@]}"
echo "install_slurm.sh: done"
