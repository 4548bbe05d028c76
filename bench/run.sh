#!/usr/bin/env bash
# Builds weir (release) and runs the benchmarks: `bench/run.sh [csv|pg|checks|tpch|orchestration|nexmark|cdc|all] [args...]`.
# Not part of the test suite; numbers go to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir-target}"
which="${1:-all}"; shift || true
python3 -c "import duckdb, polars, deltalake, pyarrow, connectorx, datafusion" 2>/dev/null ||
  python3 -m pip install --quiet duckdb polars deltalake pyarrow connectorx datafusion==55.0.0
cargo build --release -p weir-cli
weir="$CARGO_TARGET_DIR/release/weir"
if [ "$which" = csv ] || [ "$which" = all ]; then python3 bench/ingest_csv.py --weir "$weir" "$@"; fi
if [ "$which" = pg ] || [ "$which" = all ]; then python3 bench/pg.py --weir "$weir" "$@"; fi
if [ "$which" = checks ] || [ "$which" = all ]; then python3 bench/checks.py --weir "$weir" "$@"; fi
if [ "$which" = tpch ] || [ "$which" = all ]; then python3 bench/tpch.py --weir "$weir" "$@"; fi
if [ "$which" = orchestration ] || [ "$which" = all ]; then
  python3 -c "import dagster" 2>/dev/null || python3 -m pip install --quiet dagster
  python3 bench/orchestration.py --weir "$weir" "$@"
fi
# Nexmark installs Apache Flink (PyPI, in its own venv under ~/.cache/weir-tools) on first use.
if [ "$which" = nexmark ] || [ "$which" = all ]; then python3 bench/nexmark.py --weir "$weir" "$@"; fi
if [ "$which" = cdc ] || [ "$which" = all ]; then python3 bench/cdc.py --weir "$weir" "$@"; fi
