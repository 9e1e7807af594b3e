#!/bin/bash
# A/B of SMTP intake between two checkouts, in one sitting: rounds alternate
# A and B, each on a fresh SQLite daemon, 3,000 messages of 1 KiB from
# smtp-source (20 sessions at once; AB_COUNT, AB_SIZE in bytes and AB_SESSIONS
# change these, e.g. AB_COUNT=60 AB_SIZE=10485760 AB_SESSIONS=4 for 10 MiB). Besides the rate it prints the CPU time
# the daemon's whole process tree spent per message during the load, which a
# busy machine disturbs far less than the rate, and until nothing is left to
# extract ("all done": the whole cost of a message). Each checkout needs its own venv
# (python3 -m venv venv && venv/bin/pip install -e . --config-settings editable_mode=compat:
# without compat mode twistd does not find the plugin).
#
# usage: bench/ab_intake.sh A_DIR B_DIR [ROUNDS] [PROCESSES]
set -u
count=${AB_COUNT:-3000} size=${AB_SIZE:-1024} sessions=${AB_SESSIONS:-20}
a=$(cd "$1" && pwd) b=$(cd "$2" && pwd) rounds=${3:-4} procs=${4:-2}
source=${SMTP_SOURCE:-/usr/sbin/smtp-source}
here=$(cd "$(dirname "$0")/.." && pwd)
tree_cpu() {  # pid: CPU seconds of the process and its descendants (bench/targets.py)
  (cd "$here" && python3 -c "from bench.targets import cpu_seconds; print(cpu_seconds($1))")
}
# Scratch directories are removed at the end, not between rounds: on ext4
# without a journal, files created near ones just deleted cost the kernel many
# times more (bench/README.md, "Measuring fairly"), which would favour whichever
# side runs first.
scratch_list=$(mktemp)
trap 'xargs rm -rf <"$scratch_list"; rm -f "$scratch_list"' EXIT
round() {  # label checkout port
  local label=$1 src=$2 port=$3 dir pid t0 t1 stored
  dir=$(mktemp -d)
  cd "$dir"  # not in a checkout: twistd would import the mailingest of the working directory
  local store=(--database "sqlite:///$dir/m.db" --storage "file://$dir/blobs")
  "$src/venv/bin/mailingest" "${store[@]}" migrate >/dev/null
  "$src/venv/bin/mailingest" "${store[@]}" org add acme >/dev/null
  "$src/venv/bin/twistd" -n --pidfile= mailingest "${store[@]}" --smtp "tcp:$port:interface=127.0.0.1" \
    --http none --processes "$procs" --domain example.com >"$dir/log" 2>&1 &
  pid=$!
  local up=""
  for _ in $(seq 100); do
    "$source" -c -s 1 -m 1 -f a@b.example -t orders+acme@example.com "127.0.0.1:$port" >/dev/null 2>&1 && up=1 && break
    sleep 0.2
  done
  if [ -z "$up" ]; then
    echo "$label: the daemon of $src did not start; its log:" >&2
    tail -5 "$dir/log" >&2
    exit 1
  fi
  local cpu0 cpu1
  cpu0=$(tree_cpu "$pid")
  t0=$(date +%s.%N)
  "$source" -4 -d -s "$sessions" -m "$count" -l "$size" -f a@b.example -t orders+acme@example.com "127.0.0.1:$port" >/dev/null
  t1=$(date +%s.%N)
  cpu1=$(tree_cpu "$pid")
  stored=$(python3 -c "import sqlite3; print(sqlite3.connect('$dir/m.db').execute('select count(*) from inbound_message').fetchone()[0] - 1)")
  # Then until nothing is left to extract: the whole cost of the messages.
  python3 -c "
import sqlite3, time
deadline = time.monotonic() + 120
while time.monotonic() < deadline and sqlite3.connect('$dir/m.db').execute(\"select count(*) from inbound_message where status = 'received'\").fetchone()[0]:
    time.sleep(0.05)"
  local cpu2
  cpu2=$(tree_cpu "$pid")
  python3 -c "print(f'$label {$count / ($t1 - $t0):6.1f} msg/s  {($cpu1 - $cpu0) * 1000 / $count:5.2f} CPU ms/msg  {($cpu2 - $cpu0) * 1000 / $count:5.2f} all done  stored {$stored} of $count')"
  kill "$pid"; wait "$pid" 2>/dev/null
  cd - >/dev/null
  echo "$dir" >>"$scratch_list"
}
for _ in $(seq "$rounds"); do
  round A "$a" 2911
  round B "$b" 2912
done
