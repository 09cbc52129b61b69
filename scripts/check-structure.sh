#!/usr/bin/env bash
# The shape rules of the tree (docs/ARCHITECTURE.md, "Shape"): no import
# cycle between the files of a crate, no .rs file over 800 lines, no function
# over 120 lines outside tests. `--report` prints the longest files and
# functions as well. Run by `make test` (lint).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p corral-structure --bin check-structure -- "$@" .
