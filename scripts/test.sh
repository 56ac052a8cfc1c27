#!/usr/bin/env bash
# The test command of the README: installs what the tests need beyond cargo (the Python
# interop client's packages), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f interop/requirements.txt ]; then
  python3 -m pip install --quiet --disable-pip-version-check -r interop/requirements.txt
fi

# Cluster mode (backbone/): its tests start their own nats-server with JetStream, so install
# Debian's package when it is missing, and make those tests fail rather than skip without it.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nats-server
fi
export BARRAGE_REQUIRE_NATS=1

# The interop tests must not skip here: they run a client we did not write.
export BARRAGE_REQUIRE_INTEROP=1
cargo test --workspace --all-targets
