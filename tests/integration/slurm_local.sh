#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and for trying the SLURM launcher.
#
#   tests/integration/slurm_local.sh up   STATE_DIR   # write slurm.conf, start munged, slurmctld, slurmd
#   tests/integration/slurm_local.sh down STATE_DIR   # cancel jobs, stop the daemons started by `up`
#   export SLURM_CONF=STATE_DIR/etc/slurm.conf        # then sbatch/squeue/scontrol talk to it
#
# Needs root and the Debian packages `slurm-wlm munge` (slurmctld, slurmd, sbatch, ...). There is no
# systemd here and apt's policy forbids service starts, so the daemons are started by hand and
# stopped by the pids in their pid files. Everything except munge's socket lives under STATE_DIR.
#
# No accounting database: submitit then logs "Bypassing sacct error" on each poll and reports job
# states as UNKNOWN, but results arrive all the same. jobcomp/filetxt records every finished job
# (id, state, exit code) in STATE_DIR/log/jobcomp.log, which is the record the tests check.
#
# Ports: SLURMCTLD_PORT (default 6817) and SLURMD_PORT (default 6818) in the environment.
set -euo pipefail

usage() { echo "usage: $0 up|down STATE_DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
state=$(realpath -m "$2")
conf=$state/etc/slurm.conf
export SLURM_CONF=$conf
munge_run=/run/munge

log() { echo "slurm_local: $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then log "timed out waiting for $what"; return 1; fi
    sleep 0.2
  done
}

write_config() {
  mkdir -p "$state"/{etc,ctld,spool,run,log}
  local host node
  host=$(hostname -s)
  # slurmd -C prints this machine's node line (CPUs, sockets, cores, memory); we add its address.
  node=$(slurmd -C | head -n 1)
  cat >"$conf" <<EOF
# Written by $0 up $state
ClusterName=cbnlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
# No cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Cores are the scheduled resource; memory is not tracked (Hydra's launcher sends no --mem by default).
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Start batch jobs at once instead of batching submissions (halves the test time).
SchedulerParameters=batch_sched_delay=0
# Reject impossible requests at submission; otherwise they stay PENDING forever and a sweep hangs.
EnforcePartLimits=ALL
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/log/jobcomp.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

munge_works() { munge -n </dev/null | unmunge >/dev/null; }

start_munge() {
  if munge_works 2>/dev/null; then
    log "munged already running; using it"
    return
  fi
  if [[ ! -f /etc/munge/munge.key ]]; then  # the munge package creates it; an image may have dropped it
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 "$munge_run"
  runuser -u munge -- munged --pid-file="$munge_run/munged.pid"
  cp "$munge_run/munged.pid" "$state/run/munged.pid"  # ours to stop
  wait_for 20 munged munge_works
}

ctld_up() { scontrol ping | grep -q UP; }
node_idle() { [[ $(sinfo -h -o %T) == idle ]]; }

up() {
  write_config
  start_munge
  slurmctld -f "$conf"
  wait_for 30 slurmctld ctld_up
  slurmd -f "$conf"
  wait_for 30 "the node to become idle" node_idle
  log "up: export SLURM_CONF=$conf"
}

stop_pid_file() {  # stop_pid_file FILE: TERM the process, KILL it after 15 s, remove the file
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    wait_for 15 "pid $pid to exit" bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  if [[ -f $conf ]]; then
    scancel --user="$(id -un)" 2>/dev/null || true
    wait_for 15 "jobs to end" bash -c '[[ -z $(squeue -h) ]]' || true
  fi
  stop_pid_file "$state/run/slurmd.pid"
  stop_pid_file "$state/run/slurmctld.pid"
  stop_pid_file "$state/run/munged.pid"
  log "down"
}

case $action in
  up) up ;;
  down) down ;;
  *) usage ;;
esac
