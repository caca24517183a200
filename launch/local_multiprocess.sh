#!/usr/bin/env bash
# Runs the multi-process (multi-host) code path on ONE machine: N processes of afm_jax.main joined by
# jax.distributed over 127.0.0.1, each with its own CPU device(s) (or its own GPU via
# CUDA_VISIBLE_DEVICES if you set AFM_GPU_PER_PROCESS=1). CI uses it with N=2 on CPU.
#
#   launch/local_multiprocess.sh 2 --config configs/demo.py --workdir /tmp/mp --config.total_steps=20
#
# Every process gets the same arguments plus --coordinator/--num_processes/--process_id. Output of
# process i goes to <workdir>/logs/process_<i>.log (process 0 is also echoed). The script fails if
# any process fails, and stops the others.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config CONFIG --workdir DIR [--config.key=value ...]" >&2
  exit 2
fi
N=$1; shift
workdir=""
prev=""
for a in "$@"; do
  case "$a" in --workdir=*) workdir="${a#--workdir=}";; esac
  if [[ "$prev" == "--workdir" ]]; then workdir="$a"; fi
  prev="$a"
done
if [[ -z "$workdir" ]]; then echo "error: give --workdir DIR" >&2; exit 2; fi
PY=${PYTHON:-python}
PORT=${AFM_COORDINATOR_PORT:-$(( 20000 + RANDOM % 20000 ))}
mkdir -p "$workdir/logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < N; i++)); do
  if [[ "${AFM_GPU_PER_PROCESS:-0}" == "1" ]]; then export CUDA_VISIBLE_DEVICES=$i; fi
  "$PY" -m afm_jax.main "$@" --coordinator "127.0.0.1:$PORT" --num_processes "$N" --process_id "$i" \
    > "$workdir/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$workdir/logs/process_0.log" --pid "${pids[0]}" &
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; its log: $workdir/logs/process_$i.log" >&2
    tail -n 20 "$workdir/logs/process_$i.log" >&2
    status=1
  fi
done
trap - EXIT
exit $status
