#!/bin/bash
# Run round N's Ray instance at the lowest CPU priority so it only takes what the round beside it
# leaves idle:  ./lowprio.sh 6 &
# Ray workers are children of their instance's raylet, which runs in the `eac run` session; the
# scheduler groups by session (autogroup), so a plain renice does not reach them. Every 20 s this sets
# autogroup nice 19 on every descendant of round N's `eac run` (new evaluation actors included).
round=${1:?usage: lowprio.sh ROUND}
while true; do
  root=$(pgrep -f "eac run .*/round$round\.yaml" | head -1)
  if [ -n "$root" ]; then
    for p in $(ps -e -o pid= -o ppid= | awk -v r="$root" '
        {parent[$1] = $2}
        END {mine[r] = 1; grew = 1
             while (grew) { grew = 0; for (p in parent) if ((parent[p] in mine) && !(p in mine)) { mine[p] = 1; grew = 1 } }
             for (p in mine) print p}'); do
      echo 19 > /proc/$p/autogroup 2>/dev/null
    done
  fi
  sleep 20
done
