#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for affinage's tests and demos.
#
#   slurm/local-cluster.sh start    install what is missing, start munged, slurmctld, slurmd x2
#   slurm/local-cluster.sh stop     cancel its jobs, stop only the daemons it started
#   slurm/local-cluster.sh status   print whether it runs, and sinfo when it does
#
# Needs root (the daemons run as root, packages come from apt). Everything lives under one
# state folder, $AFFINAGE_SLURM_DIR (default /tmp/affinage-slurm); clients find the cluster with
#   export SLURM_CONF=$AFFINAGE_SLURM_DIR/etc/slurm.conf
# The settings follow ../shared/SLURM-NOTES.md: cred_expire=10 (a requeued job reruns in
# seconds, not ~180 s), two slurmd on ports 17001/17002 named node1/node2 (an /etc/hosts line makes
# the names resolve; it is removed on stop), linuxproc process tracking, no accounting database.
# Exit codes: 0 ok, 1 failure, 77 cannot run here (not root, or apt cannot install).
set -euo pipefail

STATE_DIR=${AFFINAGE_SLURM_DIR:-/tmp/affinage-slurm}
CONF=$STATE_DIR/etc/slurm.conf
RUN=$STATE_DIR/run
PACKAGES=(slurmctld slurmd slurm-client munge)
NODES=(node1 node2)
HOSTS_MARK="# affinage-local-slurm"
SLURMD_PIDS=()
for node in "${NODES[@]}"; do SLURMD_PIDS+=("$RUN/slurmd-$node.pid"); done

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit "${2:-1}"; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

running() {
  local f
  for f in "$RUN/munged.pid" "$RUN/slurmctld.pid" "${SLURMD_PIDS[@]}"; do
    pid_alive "$f" || return 1
  done
}

install_missing() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No systemd here: keep the packages' own service starts from running.
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >"$STATE_DIR/log/apt.log" 2>&1; then
    apt-get update >>"$STATE_DIR/log/apt.log" 2>&1 || true
    apt-get install -y --no-install-recommends "${missing[@]}" >>"$STATE_DIR/log/apt.log" 2>&1 \
      || die "apt-get cannot install ${missing[*]} (see $STATE_DIR/log/apt.log)" 77
  fi
}

write_config() {
  local cpus=2 mem=4096 port=17001 node
  cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: a two-node test cluster on one machine.
ClusterName=affinage-local
SlurmctldHost=localhost
SlurmctldPort=16817
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE_DIR/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=5
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/log/jobcomp.txt
EOF
  for node in "${NODES[@]}"; do
    echo "NodeName=$node NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
    port=$((port + 1))
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

add_hosts_entry() {
  grep -q "$HOSTS_MARK" /etc/hosts || echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >>/etc/hosts
}

remove_hosts_entry() {
  # Rewrite in place: /etc/hosts is often a bind mount that cannot be replaced by a rename.
  local kept
  kept=$(grep -v "$HOSTS_MARK" /etc/hosts || true)
  printf '%s\n' "$kept" >/etc/hosts
}

start_munge() {
  mkdir -p "$STATE_DIR/munge"
  chmod 755 "$STATE_DIR/munge"
  dd if=/dev/urandom of="$STATE_DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$STATE_DIR/munge/munge.key"
  munged --socket="$STATE_DIR/munge/munge.socket" --key-file="$STATE_DIR/munge/munge.key" \
    --pid-file="$RUN/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$STATE_DIR/munge/munge.seed" --force
}

wait_idle() {
  local deadline=$((SECONDS + 60)) states
  while ((SECONDS < deadline)); do
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')
    [[ $states == "idle " ]] && return 0
    sleep 0.2
  done
  die "nodes not idle after 60 s (sinfo states: ${states:-none}; logs in $STATE_DIR/log)"
}

cmd_start() {
  [[ $(id -u) -eq 0 ]] || die "needs root (the daemons run as root and packages come from apt)" 77
  if running; then
    say "already running (SLURM_CONF=$CONF)"
    return 0
  fi
  cmd_stop quiet  # leftovers of a half-started cluster
  local t0_ns t_install
  t0_ns=$(date +%s%N)
  # Start from a clean state folder, but never delete a folder this script did not make.
  if [[ -e $STATE_DIR && ! -e $STATE_DIR/.affinage-local-slurm && -n $(ls -A "$STATE_DIR") ]]; then
    die "$STATE_DIR exists and was not made by this script: set AFFINAGE_SLURM_DIR to a new folder"
  fi
  rm -rf "$STATE_DIR"
  mkdir -p "$STATE_DIR"/{etc,state,spool,log} "$RUN"
  touch "$STATE_DIR/.affinage-local-slurm"
  install_missing
  t_install=$(( ($(date +%s%N) - t0_ns) / 1000000 ))
  write_config
  add_hosts_entry
  start_munge
  slurmctld -f "$CONF"
  local node
  for node in "${NODES[@]}"; do
    mkdir -p "$STATE_DIR/spool/$node"
    slurmd -f "$CONF" -N "$node"
  done
  wait_idle
  local total_ms=$(( ($(date +%s%N) - t0_ns) / 1000000 ))
  say "ready in $(seconds "$total_ms") s (install $(seconds "$t_install") s); export SLURM_CONF=$CONF"
}

seconds() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }

stop_pids() {  # TERM every daemon given (pid files), wait for all, KILL what is left after 5 s
  local file pids=() alive=() pid i
  for file in "$@"; do
    pid_alive "$file" && pids+=("$(cat "$file")")
    rm -f "$file"
  done
  [[ ${#pids[@]} -eq 0 ]] && return 0
  kill "${pids[@]}" 2>/dev/null || true
  for i in $(seq 50); do
    alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [[ ${#alive[@]} -eq 0 ]] && return 0
    sleep 0.1
  done
  kill -9 "${alive[@]}" 2>/dev/null || true
}

cmd_stop() {
  local quiet=${1:-}
  [[ -d $RUN ]] || { remove_hosts_entry; [[ -n $quiet ]] || say "not running"; return 0; }
  if pid_alive "$RUN/slurmctld.pid"; then
    SLURM_CONF=$CONF scancel --full --user=root 2>/dev/null || true
    sleep 1  # let the jobs' processes get their signals before the slurmd go
  fi
  stop_pids "${SLURMD_PIDS[@]}" "$RUN/slurmctld.pid"
  stop_pids "$RUN/munged.pid"
  remove_hosts_entry
  [[ -n $quiet ]] || say "stopped"
}

cmd_status() {
  if running; then
    say "running (SLURM_CONF=$CONF)"
    SLURM_CONF=$CONF sinfo -N
  else
    say "not running"
    return 3
  fi
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
