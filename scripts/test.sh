#!/usr/bin/env bash
# The test command of the README: installs what the tests need beyond cargo (the Python
# interop client's packages), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f interop/requirements.txt ]; then
  python3 -m pip install --quiet --disable-pip-version-check -r interop/requirements.txt
fi

# The interop tests must not skip here: they run a client we did not write.
export BARRAGE_REQUIRE_INTEROP=1
cargo test --workspace --all-targets
