#!/usr/bin/env bash
# The whole suite (`make test`): two pytest processes at once.
#
# The sandbox suite spends most of its time waiting (boots, restores, timeouts): ~40% of two
# cores busy in CI. The tests that start no sandbox and time nothing by the wall clock
# (parsers, the guard, the protocol, the chart schema; the guard's bounds are in thread CPU
# time) run beside it, then the guard again on its fallback matcher (where no hyperscan wheel
# loads it must give the same results), at a low priority (nice): the sandbox suite's
# latency-bound tests keep the cores when they need them. The side tests make no process,
# mount or cgroup that the sandbox suite's checks from outside would see, and MOAT_SUITE_PURE
# makes any that starts a sandbox fail (tests/conftest.py). Their output follows the main
# run's. Tests with wall-clock bounds (test_guard_budget, test_pty_output) stay in the main run.
# The main run lists its 40 slowest tests: CI has a 30-minute budget, watch what it costs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PURE=(
  tests/test_chart_schema.py tests/test_egress_env.py tests/test_egress_hostport.py
  tests/test_guard_api.py tests/test_guard_binary.py tests/test_guard_corpus.py
  tests/test_guard_coverage.py tests/test_guard_linear.py tests/test_guard_literals.py
  tests/test_guard_stream.py tests/test_protocol.py tests/test_tunnels_dial.py
)
GUARD=(
  tests/test_guard_api.py tests/test_guard_stream.py tests/test_guard_corpus.py
  tests/test_guard_literals.py tests/test_guard_coverage.py tests/test_guard_binary.py
  tests/test_guard_linear.py
)
log=$(mktemp /tmp/moat-pure-XXXXXX.log)
(
  export MOAT_SUITE_PURE=1
  nice -n 10 "$PY" -m pytest -q -p no:cacheprovider "${PURE[@]}"
  a=$?
  MOAT_GUARD_MATCHER=ahocorasick nice -n 10 "$PY" -m pytest -q -p no:cacheprovider "${GUARD[@]}"
  b=$?
  exit $((a || b))
) >"$log" 2>&1 &
side=$!
trap 'kill "$side" 2>/dev/null' EXIT
ignore=()
for f in "${PURE[@]}"; do ignore+=("--ignore=$f"); done
"$PY" -m pytest -q --durations=40 "${ignore[@]}" "$@"
main=$?
wait "$side"
side_rc=$?
trap - EXIT
echo "---- beside it: the tests that start no sandbox, then the guard on its fallback matcher ----"
cat "$log"
rm -f "$log"
exit $((main || side_rc))
