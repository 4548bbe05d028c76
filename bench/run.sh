#!/usr/bin/env bash
# Builds weir (release) and runs the benchmarks. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir-target}"
python3 -c "import duckdb, polars, deltalake, pyarrow" 2>/dev/null || python3 -m pip install --quiet duckdb polars deltalake pyarrow
cargo build --release -p weir-cli
python3 bench/ingest_csv.py --weir "$CARGO_TARGET_DIR/release/weir" "$@"
