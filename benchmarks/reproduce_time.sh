#!/usr/bin/env bash
# Wall time and peak memory of `make reproduce` on a profile, from scratch and re-run with nothing changed.
#   benchmarks/reproduce_time.sh [PROFILE]      (default smoke; deletes runs/<profile> first)
# Prints one line per measurement; the issue's targets for smoke on 2 cores: <= 15 min, re-run < 30 s,
# peak memory < 8 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-smoke}
make setup > /dev/null
rm -rf "runs/$profile" "figures/$profile" "paper/generated/$profile"
measure() {
  local label=$1
  /usr/bin/time -f "%e %M" -o /tmp/reproduce_time.$$ make reproduce PROFILE="$profile" > "/tmp/reproduce_$label.log" 2>&1
  read -r secs kb < /tmp/reproduce_time.$$
  python3 -c "import sys; s, kb = float(sys.argv[2]), float(sys.argv[3]); print(f'{sys.argv[1]:8s} profile={sys.argv[4]} wall={s:7.1f} s ({s / 900:.2f} of a 15-min budget) peak_rss={kb / 2**20:.2f} GB')" \
    "$label" "$secs" "$kb" "$profile"
}
measure fresh
measure rerun
