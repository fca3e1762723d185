#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for the tests and for trying the job scripts on a laptop.
#   slurm/local-cluster.sh start [DIR]   installs munge/slurmctld/slurmd/slurm-client (Debian) when absent,
#                                        writes DIR/slurm.conf, starts munged, slurmctld and slurmd
#   slurm/local-cluster.sh stop  [DIR]   stops them by PID
#   eval "$(slurm/local-cluster.sh env [DIR])"   exports SLURM_CONF for sbatch/squeue/scontrol
# DIR defaults to /tmp/fusion-slurm; MAX_ARRAY_SIZE sets the cluster's limit (default 1001).
# Needs root (apt-get, munged's key, slurmd). Known to work with SLURM 22.05.
set -euo pipefail
cmd=${1:-}
dir=$(realpath -m "${2:-/tmp/fusion-slurm}")
conf="$dir/slurm.conf"

install() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$dir/apt.log" 2>&1 ||
      { apt-get update -qq >>"$dir/apt.log" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >>"$dir/apt.log" 2>&1; } ||
      { echo "apt-get install ${missing[*]} failed; see $dir/apt.log" >&2; exit 1; }
  fi
}

write_conf() {
  local cpus; cpus=$(nproc)
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
  cat >"$conf" <<EOF
ClusterName=fusion-local
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
DependencyParameters=kill_invalid_depend
ReturnToService=2
MaxArraySize=${MAX_ARRAY_SIZE:-1001}
MinJobAge=600
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  mkdir -p "$dir"
  install
  write_conf
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
  fi
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket.2" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"
  export SLURM_CONF="$conf"
  slurmctld -f "$conf"
  slurmd -f "$conf" -N localhost
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "SLURM up: SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.5
  done
  echo "the node did not come up; logs in $dir/log" >&2
  tail -n 20 "$dir/log/"*.log >&2 || true
  exit 1
}

stop() {
  for name in slurmd slurmctld munged; do
    pidfile="$dir/$name.pid"
    if [ -s "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  echo "SLURM stopped ($dir)"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) echo "usage: $0 start|stop|env [DIR]" >&2; exit 2 ;;
esac
