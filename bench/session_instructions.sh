#!/bin/bash
# Instructions per message of bench/smtp_session.py for one or more checkouts,
# under valgrind (callgrind): unlike CPU time, a count a busy machine does not
# disturb, for A/B of changes smaller than the CPU time's noise. The figure is
# (Ir of 300 messages - Ir of 100 messages) / 220 (the round plus its warm-up
# of a tenth), so start-up and imports cancel out. About 45 s per checkout.
#
# usage: bench/session_instructions.sh DIR...
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/venv/bin/python}
ir() {  # dir messages
  (cd "$1" && PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$python" -m bench.smtp_session --messages "$2" --repeat 1 2>&1 >/dev/null | sed -n 's/.*Collected : //p')
}
for dir in "$@"; do
  low=$(ir "$dir" 100) high=$(ir "$dir" 300)
  echo "$dir $(( (high - low) / 220 )) instructions per message"
done
