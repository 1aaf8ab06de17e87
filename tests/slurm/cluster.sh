#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on localhost for the tests (Debian's slurm-wlm 22.05, root, no systemd):
#   tests/slurm/cluster.sh start [DIR]   install slurm if missing, write DIR/slurm.conf (DIR: a fresh temp dir),
#                                        start slurmctld + slurmd, wait for the node to be idle; the last line of
#                                        stdout is the SLURM_CONF path
#   tests/slurm/cluster.sh stop [CONF]   stop the daemons and every process a job of this cluster left behind
#   tests/slurm/cluster.sh env [CONF]    print `export SLURM_CONF=...` for a shell: eval "$(cluster.sh env CONF)"
# CONF defaults to $SLURM_CONF. Auth is auth/none (no munged): fine for a private test cluster, never for a real one.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return 0
  [[ $(id -u) == 0 ]] || die "slurm is not installed and installing it needs root"
  command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get to install it with"
  echo "cluster.sh: installing slurm (apt-get)" >&2
  apt-get update -qq >&2 || die "apt-get update failed"
  # The postinst scripts try to start the services; policy-rc.d refuses (no systemd here), which is harmless.
  # slurm-wlm (the metapackage) would also pull ~30 recommended -dev/plugin packages nothing here uses.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >&2 \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >&2 \
    || die "apt-get install of slurm failed"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  [[ $(id -u) == 0 ]] || die "needs root (SlurmUser/SlurmdUser=root; slurmd switches to the submitting user)"
  install_slurm
  local dir=${1:-$(mktemp -d /tmp/megaapo-slurm.XXXXXX)}
  mkdir -p "$dir"/{state,spool,log}
  # Free ports rather than 6817/6818: a system slurm or a second test session must not collide with this one.
  local ctld_port d_port
  ctld_port=$(free_port); d_port=$(free_port)
  while [[ $d_port == "$ctld_port" ]]; do d_port=$(free_port); done
  local conf=$dir/slurm.conf
  # MinJobAge keeps finished jobs visible to `scontrol show job` (there is no accounting database, so no sacct).
  # KillWait (TERM -> KILL on cancel) is short so a cancelled test job is gone in seconds.
  # RealMemory is left out: configured above what the machine reports, the node would go `inval`.
  # proctrack/pgid kills a job's process group at its end; cgroups are not available here.
  cat >"$conf" <<EOF
ClusterName=megaapo-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=3600
KillWait=10
MessageTimeout=30
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$conf
  # setsid: signals sent to the test's process group must not reach the daemons.
  setsid slurmctld -D -f "$conf" >"$dir/log/slurmctld.out" 2>&1 </dev/null &
  echo $! >"$dir/launched-slurmctld.pid"
  setsid slurmd -D -N localhost -f "$conf" >"$dir/log/slurmd.out" 2>&1 </dev/null &
  echo $! >"$dir/launched-slurmd.pid"
  local state="" i name
  for i in $(seq 1 120); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    [[ $state == idle ]] && break
    for name in slurmctld slurmd; do
      if ! kill -0 "$(cat "$dir/launched-$name.pid")" 2>/dev/null; then
        tail -20 "$dir/log/$name.out" "$dir/log/$name.log" >&2 || true
        stop "$conf"
        die "$name exited during startup"
      fi
    done
    sleep 0.5
  done
  if [[ $state != idle ]]; then
    sinfo -N -l >&2 || true
    tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    stop "$conf"
    die "node not idle after 60 s (state: ${state:-none})"
  fi
  echo "cluster.sh: up (ports $ctld_port/$d_port, logs in $dir/log)" >&2
  echo "$conf"
}

# PIDs of this cluster's daemons and slurmstepds (they hold files under its directory open: logs, spool sockets;
# slurmstepd overwrites its environment with its process title) and of everything its jobs started (SLURM_CONF=<conf>
# plus a SLURM_JOB_ID: srun, torchrun, trainers, vLLM engines, reward workers), even those in sessions of their own
# or reparented to init. A shell that merely exported SLURM_CONF is not one of them.
cluster_pids() {
  local conf=$1 dir p env
  dir=$(dirname "$conf")
  {
    find /proc/[0-9]*/fd -maxdepth 1 -lname "$dir/*" 2>/dev/null | cut -d/ -f3
    for p in /proc/[0-9]*; do
      env=$({ tr '\0' '\n' <"$p/environ"; } 2>/dev/null) || continue
      if grep -qxF "SLURM_CONF=$conf" <<<"$env" && grep -q "^SLURM_JOB_ID=" <<<"$env"; then
        echo "${p#/proc/}"
      fi
    done
  } | sort -un | grep -vxF -e "$$" -e "$BASHPID" || true
}

stop() {
  local conf=${1:-${SLURM_CONF:-}}
  [[ -n $conf ]] || die "stop: give the slurm.conf path (or set SLURM_CONF)"
  local dir pid pids i
  dir=$(dirname "$conf")
  export SLURM_CONF=$conf
  # Jobs first, while the daemons can still end them the normal way (their processes get TERM, then KILL).
  if squeue -h -o %i 2>/dev/null | grep -q .; then
    scancel --partition=debug 2>/dev/null || true
    for i in $(seq 1 30); do
      squeue -h -o %i 2>/dev/null | grep -q . || break
      sleep 0.5
    done
  fi
  for f in launched-slurmctld.pid launched-slurmd.pid; do
    pid=$(cat "$dir/$f" 2>/dev/null || true)
    [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null || true
  done
  for sig in TERM KILL; do
    for i in $(seq 1 20); do
      pids=$(cluster_pids "$conf")
      [[ -z $pids ]] && break
      [[ $i == 1 ]] && kill -"$sig" $pids 2>/dev/null || true
      sleep 0.5
    done
    [[ -z $pids ]] && break
    echo "cluster.sh: still running after SIG$sig: $(echo $pids)" >&2
  done
  pids=$(cluster_pids "$conf")
  [[ -z $pids ]] || die "could not stop: $(echo $pids)"
  echo "cluster.sh: stopped" >&2
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  env)
    conf=${2:-${SLURM_CONF:-}}
    [[ -n $conf ]] || die "env: give the slurm.conf path"
    echo "export SLURM_CONF=$conf" ;;
  *) echo "usage: $0 start [DIR] | stop [CONF] | env [CONF]" >&2; exit 2 ;;
esac
