#!/usr/bin/env bash
# Instructions per request of the socket-free data path (tests/perf/micro.py), counted by
# callgrind: deterministic, unlike timings on a shared machine. Runs micro.py at two request
# counts and divides the difference of the totals by the difference of the counts, so start-up
# (imports, config translation) cancels out. Takes about a minute. Usage: tests/perf/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
py=$(python -c 'import sys; print(sys.executable)')
total() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$py" tests/perf/micro.py \
    --requests "$1" --repeat 1 --no-warmup 2>&1 | awk '/Collected/ {gsub(",", "", $4); print $4}'
}
a=$(total 2000)
b=$(total 12000)
echo "instructions/request: $(( (b - a) / 10000 ))"
