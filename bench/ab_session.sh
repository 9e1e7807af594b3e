#!/bin/bash
# A/B of the SMTP session's CPU per message (bench/smtp_session.py) between two
# checkouts, in one sitting: runs alternate A and B, so the load of a shared
# machine weighs on both alike; each prints its best of --repeat rounds, and the
# last line the best of all runs of each. Both run with this checkout's Python,
# each importing mailingest from its own directory (python -m puts it first on the path).
#
# usage: bench/ab_session.sh A_DIR B_DIR [RUNS] [-- smtp_session options]
set -eu
a=$(cd "$1" && pwd) b=$(cd "$2" && pwd) runs=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/venv/bin/python}
best_a="" best_b=""
for _ in $(seq "$runs"); do
  for side in a b; do
    dir=$a; [ $side = b ] && dir=$b
    us=$(cd "$dir" && "$python" -m bench.smtp_session --messages 400 --repeat 10 "$@" | cut -d' ' -f1)
    echo "$side $us µs/msg"
    if [ $side = a ]; then best_a=$(printf '%s\n' $best_a $us | sort -g | head -1)
    else best_b=$(printf '%s\n' $best_b $us | sort -g | head -1); fi
  done
done
echo "best: A $best_a  B $best_b µs/msg"
