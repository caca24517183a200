#!/usr/bin/env bash
# A throw-away single-node SLURM on this machine, for testing the launchers (tests/cluster/, CI).
#
#   eval "$(launch/slurm_local_cluster.sh start [DIR])"   # prints `export SLURM_CONF=DIR/slurm.conf`
#   sbatch ...; srun ...; sinfo                           # with SLURM_CONF exported as printed
#   launch/slurm_local_cluster.sh stop DIR                # stops its own daemons (by pid), removes DIR
#
# Needs root and the Debian/Ubuntu packages `slurm-wlm munge` (`apt-get install -y slurm-wlm munge`).
# Everything lives under DIR (default: a new temporary folder): slurm.conf, a fresh munge key and
# socket, spool/state directories, pid files and daemon logs, so nothing in /etc is touched and a
# system SLURM or munged keeps running undisturbed. One node named after `hostname -s` with
# AFM_SLURM_CPUS CPUs (default: all) and AFM_SLURM_MEM_MB of memory (default 4096), no GPUs,
# proctrack/linuxproc + task/none (no cgroups needed), select/cons_tres, SlurmUser=root.
# `start` waits until the node is idle (at most AFM_SLURM_START_TIMEOUT s, default 60) and, if anything
# fails, stops what it started and prints the daemons' logs.
set -euo pipefail

usage() { echo "usage: $0 start [DIR] | stop DIR | status DIR" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
cmd=$1 dir=${2:-}

stop_cluster() {  # stops the daemons whose pid files are in $1, newest first; removes $1 unless KEEP
  local d=$1 f pid
  for f in slurmd.pid slurmctld.pid munged.pid; do
    [[ -s "$d/$f" ]] || continue
    pid=$(cat "$d/$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$d/$f"
  done
  # Job steps that outlived slurmd (slurmstepd and its tasks) belong to this cluster's spool: end them too.
  for pid in $(pgrep -f "slurmstepd.*" 2>/dev/null || true); do
    if grep -qs "$d" "/proc/$pid/environ" "/proc/$pid/cmdline"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  [[ "${AFM_SLURM_KEEP:-0}" == "1" ]] || rm -rf "$d"
}

case "$cmd" in
start)
  for b in munged mungekey slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || { echo "error: $b not found; install with: apt-get install -y slurm-wlm munge" >&2; exit 1; }
  done
  [[ $(id -u) == 0 ]] || { echo "error: the local cluster runs its daemons as root (SlurmUser=root); run as root" >&2; exit 1; }
  dir=${dir:-$(mktemp -d /tmp/afm-slurm.XXXXXX)}
  mkdir -p "$dir"/{spool,state,log,munge}
  dir=$(cd "$dir" && pwd)
  chmod 700 "$dir/munge"
  trap 'echo "error: the local SLURM did not start; logs follow" >&2; tail -n 30 "$dir"/log/* >&2 || true; stop_cluster "$dir"' ERR
  host=$(hostname -s)
  cpus=${AFM_SLURM_CPUS:-$(nproc)}
  mem=${AFM_SLURM_MEM_MB:-4096}
  port=${AFM_SLURM_PORT:-$(( 16000 + RANDOM % 20000 ))}
  # munge: its own key and socket (a system munged, if any, is left alone)
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=afmlocal
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=${AFM_SLURM_CRED_EXPIRE:-10}
SlurmctldPort=$port
SlurmdPort=$(( port + 1 ))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=300
KillWait=${AFM_SLURM_KILL_WAIT:-30}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  deadline=$(( SECONDS + ${AFM_SLURM_START_TIMEOUT:-60} ))
  until sinfo -h -o '%T' 2>/dev/null | grep -qx idle; do
    if (( SECONDS > deadline )); then false; fi
    sleep 0.5
  done
  trap - ERR
  echo "export SLURM_CONF=$SLURM_CONF"
  ;;
stop)
  [[ -n "$dir" && -f "$dir/slurm.conf" ]] || { echo "error: $dir is no local cluster folder (no slurm.conf)" >&2; exit 2; }
  stop_cluster "$dir"
  ;;
status)
  [[ -n "$dir" ]] || usage
  SLURM_CONF=$dir/slurm.conf sinfo && SLURM_CONF=$dir/slurm.conf squeue
  ;;
*) usage ;;
esac
