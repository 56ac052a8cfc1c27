#!/usr/bin/env bash
# The test command of the README: installs what the tests need beyond cargo (the Python
# interop client's packages, headless Chromium for the browser test), then runs every test of
# the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f interop/requirements.txt ]; then
  python3 -m pip install --quiet --disable-pip-version-check -r interop/requirements.txt
fi

# The browser test (tests/browser.rs) drives Debian's headless Chromium over WebDriver; it
# fails, never skips, without them. apt needs root (CI runs as root on a fresh Debian machine).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
  else
    echo "scripts/test.sh: chromium and chromium-driver are missing; install them as root:" >&2
    echo "  apt-get update && apt-get install -y chromium chromium-driver" >&2
  fi
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

# The fault suite (tests/faults/network.rs) makes network namespaces with veth pairs and
# nftables rules: it needs root, iproute2 and nftables. CI runs as root, so those tests fail
# here rather than skip when a namespace cannot be made (`cargo test` alone skips them).
if ! command -v ip >/dev/null 2>&1 || ! command -v nft >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq iproute2 nftables
fi
export BARRAGE_REQUIRE_NETNS=1

# The WSS interop test with OpenSSL's client (edge/tests/wss.rs, `openssl s_client` with a
# KeyUpdate against the edge's own TLS 1.3 record layer).
if ! command -v openssl >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl
fi

# The interop tests must not skip here: they run a client we did not write.
export BARRAGE_REQUIRE_INTEROP=1
cargo test --workspace --all-targets
