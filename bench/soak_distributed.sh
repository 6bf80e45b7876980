#!/usr/bin/env bash
# The failing paths of both scripts under torchrun, N times in a row (default 30): a refused lock, a failing rank,
# bad input found late, Ctrl-C. Prints one line per round and the count of failed rounds; exits 1 if any failed.
#   bash bench/soak_distributed.sh [N]
# Each round is one pytest process over these tests; a failed round's output is kept in bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-30}
PY=${PYTHON:-.venv/bin/python}
TESTS=(
  "tests/test_extract_distributed.py::test_a_locked_output_folder_stops_every_rank_with_one_line"
  "tests/test_extract_distributed.py::test_a_killed_rank_resumes_with_the_same_command"
  "tests/test_extract_distributed.py::test_more_ranks_than_items_one_line_on_rank_0"
  "tests/test_extract_distributed.py::test_errors_reach_every_rank_and_rank_0_alone_prints"
  "tests/test_interrupt_distributed.py"
  "tests/test_distributed.py::test_rank0_alone_checks_and_locks_the_output_folder"
  "tests/test_distributed.py::test_a_failing_rank_stops_all_and_leaves_no_run"
  "tests/test_distributed.py::test_bad_input_under_torchrun_one_line_exit_2"
)
mkdir -p bench/results
stamp=$(date +%Y%m%d-%H%M%S)
failed=0
for i in $(seq 1 "$N"); do
  log="bench/results/soak-$stamp-round$i.log"
  start=$(date +%s)
  if PYTHONPATH=. "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" >"$log" 2>&1; then
    rm -f "$log"; verdict=passed
  else
    failed=$((failed + 1)); verdict="FAILED (see $log)"
  fi
  echo "round $i/$N: $verdict in $(( $(date +%s) - start )) s, load $(cut -d' ' -f1 /proc/loadavg)"
done
echo "soak: $failed of $N rounds failed ($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
[ "$failed" -eq 0 ]
