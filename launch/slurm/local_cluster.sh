#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on this machine, for testing the sbatch scripts (needs root).
#
#   launch/slurm/local_cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge (Debian/Ubuntu)
#   eval "$(launch/slurm/local_cluster.sh start)"   # starts munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   sbatch ...; squeue; scontrol show job ...
#   launch/slurm/local_cluster.sh stop      # cancels its jobs, stops the three daemons it started
#
# Everything lives in $DCGAN_SLURM_DIR (default /tmp/dcgan-slurm): its own slurm.conf (clients find it
# through SLURM_CONF), own ports, pid files, spool and logs, and its own munged socket, so a machine's
# real SLURM or munge setup is neither read nor touched. Daemons run as root without systemd.
set -euo pipefail
dir="${DCGAN_SLURM_DIR:-/tmp/dcgan-slurm}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

install_packages() {
  command -v apt-get >/dev/null || die "apt-get not found: install slurmctld, slurmd, slurm-client and munge yourself"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge
}

write_conf() {
  local node
  node="$(slurmd -C | head -n 1)"  # NodeName=<host> CPUs=... RealMemory=..., as slurmd sees this machine
  cat > "$conf" <<EOF
ClusterName=dcgan-local
SlurmctldHost=$(hostname -s)
SlurmctldPort=${DCGAN_SLURMCTLD_PORT:-6917}
SlurmdPort=${DCGAN_SLURMD_PORT:-6918}
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SlurmUser=root
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmdSpoolDir=$dir/slurmd
StateSaveLocation=$dir/slurmctld
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MinJobAge=600
$node State=UNKNOWN
PartitionName=debug Nodes=$(hostname -s) Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || die "$tool not found: run '$0 install' (Debian/Ubuntu) first"
  done
  [ "$(id -u)" = 0 ] || die "the daemons need root"
  alive "$dir/slurmctld.pid" && die "already running in $dir (stop it first)"
  mkdir -p "$dir/slurmd" "$dir/slurmctld"
  chmod 755 "$dir"
  write_conf
  munged --force --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" \
    --seed-file="$dir/munged.seed"
  slurmctld -f "$conf"
  slurmd -f "$conf"
  for _ in $(seq 1 60); do
    state="$(sinfo -h -o %T 2>/dev/null || true)"
    [ "$state" = idle ] && { echo "export SLURM_CONF=$conf"; return 0; }
    sleep 1
  done
  die "node not idle after 60 s (sinfo: '${state:-}'); see $dir/slurmctld.log and $dir/slurmd.log"
}

stop_pid() {  # stop_pid PIDFILE NAME: SIGTERM, then SIGKILL after 10 s
  local pidfile="$1" pid
  alive "$pidfile" || return 0
  pid="$(cat "$pidfile")"
  kill "$pid"
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  echo "local_cluster.sh: $2 ($pid) ignored SIGTERM, killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  if alive "$dir/slurmctld.pid"; then
    jobs="$(squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 30); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
    fi
  fi
  stop_pid "$dir/slurmd.pid" slurmd
  stop_pid "$dir/slurmctld.pid" slurmctld
  stop_pid "$dir/munged.pid" munged
}

case "${1:-}" in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF="$conf" sinfo ;;
  *) die "usage: $0 install|start|stop|status" ;;
esac
