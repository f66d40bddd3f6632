#!/usr/bin/env bash
# A real, throw-away SLURM cluster on localhost for sdtrain's CI and tests.
#
#   slurm/local-cluster.sh start  [DIR]   install if needed, start, wait until both nodes are idle
#   slurm/local-cluster.sh stop   [DIR]   stop exactly the daemons that `start` started (by pid)
#   slurm/local-cluster.sh status [DIR]   daemons and nodes; exit 0 only when the cluster is up
#   slurm/local-cluster.sh env    [DIR]   print the `export SLURM_CONF=...` line
#
# DIR (default $SDTRAIN_SLURM_DIR, else /tmp/sdtrain-slurm) holds everything: munge key and
# socket, slurm.conf, controller state, node spool folders, pid files and logs. Nothing under
# /etc, /run or /var is used, so the cluster does not touch (or need) a system SLURM/munge.
#
# The cluster: munged, one slurmctld and two slurmd (node1, node2) on this machine, each slurmd
# with its own NodeName and Port (Debian builds SLURM with --enable-multiple-slurmd), in one
# partition `debug`. Both nodes advertise more CPUs than the machine has (oversubscribed on
# purpose: tests want two nodes, not speed). Runs as root: SlurmUser=SlurmdUser=root.
#
# Timing knobs (measured on a 2-core Debian 12 container, SLURM 22.05.8, munge 0.5.15):
#  - A requeued batch job is held until now + (job credential lifetime) + 1 s, which SLURM reads
#    from AuthInfo=cred_expire (default 120 s, minimum 5 s): hence the "~120 s wait after a
#    requeue". munged's --max-ttl does not change it. We set cred_expire=5 and let the main and
#    backfill schedulers run every second, so a requeued job restarts within a few seconds.
#  - slurmctld checks time limits (and sends --signal=SIG@TIME warnings) only every ~30 s, so a
#    warning can arrive at job start when time limit minus warning time is small.
#  - MinJobAge=600: without accounting (no slurmdbd), `scontrol show job` is how tests see a
#    finished job's state, so finished jobs stay in memory for 10 minutes.
set -euo pipefail

COMMAND=${1:-}
DIR=${2:-${SDTRAIN_SLURM_DIR:-/tmp/sdtrain-slurm}}
DIR=$(realpath -m "$DIR") # slurm.conf wants absolute paths; pid checks want one spelling
# Ports: controller, node1, node2 (off SLURM's defaults so a system SLURM does not clash).
PORT_BASE=${SDTRAIN_SLURM_PORT:-16817}
CPUS_PER_NODE=${SDTRAIN_SLURM_CPUS:-4}
START_TIMEOUT=${SDTRAIN_SLURM_START_TIMEOUT:-60}
# Job credential lifetime in seconds (SLURM's minimum is 5): a requeued job waits this + 1 s.
CRED_EXPIRE=${SDTRAIN_SLURM_CRED_EXPIRE:-5}
NODES=(node1 node2)

CONF="$DIR/etc/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket"
MUNGE_KEY="$DIR/munge/munge.key"
RUN="$DIR/run"
LOG="$DIR/log"

export SLURM_CONF="$CONF"

usage() {
    echo "usage: $0 start|stop|status|env [DIR]   (DIR default: /tmp/sdtrain-slurm)" >&2
    exit 2
}

log() { echo "local-cluster: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# --- pids -----------------------------------------------------------------------------------
# Each daemon writes its pid file under $RUN. A pid counts as ours only while the process
# still runs and its command line names $DIR, so a stale file never gets a stranger killed.

# The pid files of everything `start` starts, in start order.
pid_files() {
    echo "$RUN/munged.pid"
    echo "$RUN/slurmctld.pid"
    local node
    for node in "${NODES[@]}"; do echo "$RUN/slurmd-$node.pid"; done
}

# Print the pid in file $1 if that process is alive and is one of ours.
our_pid() {
    local file=$1 pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/" || return 1
    echo "$pid"
}

# Exit status 0 when every daemon is running.
all_running() {
    local file
    while read -r file; do our_pid "$file" >/dev/null || return 1; done < <(pid_files)
}

# Exit status 0 when at least one daemon is running.
any_running() {
    local file
    while read -r file; do our_pid "$file" >/dev/null && return 0; done < <(pid_files)
    return 1
}

# --- install --------------------------------------------------------------------------------

install_packages() {
    local missing=() cmd
    for cmd in munged slurmctld slurmd sbatch srun sinfo scontrol; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0
    log "missing ${missing[*]}: installing slurmctld slurmd slurm-client munge"
    [[ $(id -u) == 0 ]] || die "installing packages needs root (apt-get); run as root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # The packages' own services are not wanted (and containers deny them via policy-rc.d).
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
}

# --- config ---------------------------------------------------------------------------------

write_slurm_conf() {
    local ctld_port=$PORT_BASE
    cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: a local test cluster, everything under $DIR.
ClusterName=sdtrain
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root

# munge on our own socket; cred_expire shortens the hold on requeued jobs (default 120 s).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE

# Containers: no cgroups, no task binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true

# Scheduling: CPUs only (memory is not a consumable), schedulers every second.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
InactiveLimit=0
# Node resources come from this file, not from what slurmd detects (we oversubscribe).
SlurmdParameters=config_overrides

# State, spool, pids and logs under $DIR (%n: the node name of each slurmd).
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

EOF
    local i=1 node
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeHostname=localhost NodeAddr=127.0.0.1" \
            "Port=$((PORT_BASE + i)) CPUs=$CPUS_PER_NODE RealMemory=1000 State=UNKNOWN" >>"$CONF"
        i=$((i + 1))
    done
    local node_list
    node_list=$(
        IFS=,
        echo "${NODES[*]}"
    )
    echo "PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

# --- start / stop ---------------------------------------------------------------------------

# Print the tail of every log under $LOG (for errors).
show_logs() {
    local file
    for file in "$LOG"/*.log; do
        [[ -e $file ]] || continue
        echo "----- $file (last 20 lines)" >&2
        tail -n 20 "$file" >&2
    done
}

# Exit status 0 when sinfo shows every node in one of the states $1 (a grep -E pattern).
nodes_in() {
    local states node
    states=$(sinfo --noheader --Node --format='%N %t' 2>/dev/null) || return 1
    for node in "${NODES[@]}"; do
        grep -qxE "$node ($1)" <<<"$states" || return 1
    done
}
nodes_idle() { nodes_in idle; }
# Up: responding and able to run jobs (idle, partly or fully allocated, completing a job).
nodes_up() { nodes_in 'idle|mix|alloc|comp'; }

start_munged() {
    if [[ ! -s $MUNGE_KEY ]]; then
        # 1024 random bytes; munged insists the key is private to its owner.
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    fi
    chmod 600 "$MUNGE_KEY"
    munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$RUN/munged.pid" \
        --log-file="$LOG/munged.log" --seed-file="$DIR/munge/munged.seed"
    # Check that a credential round-trips through our socket.
    munge --socket="$MUNGE_SOCKET" --no-input |
        unmunge --socket="$MUNGE_SOCKET" >/dev/null ||
        die "munged started but a credential does not decode (see $LOG/munged.log)"
}

start() {
    install_packages
    if all_running; then
        log "already running in $DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if any_running; then
        log "some daemons of an earlier start are still running: stopping them first"
        stop
    fi

    local started=$SECONDS
    # 755 throughout: munged wants its socket folder searchable by all, slurmd runs job
    # scripts out of its spool folder; the munge key itself is private (600).
    mkdir -p "$DIR"/{etc,munge,state,run,log} && chmod 755 "$DIR" "$DIR/munge"
    local node
    for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done
    chmod -R 755 "$DIR/spool"
    rm -f "$RUN"/*.pid "$MUNGE_SOCKET" "$LOG"/*.log
    write_slurm_conf

    # From here on, a failure (die or set -e) stops whatever has started, with the logs shown.
    trap 'log "start failed"; show_logs; stop' EXIT

    start_munged
    # -c: cold start, no jobs or node states from an earlier cluster in this DIR.
    slurmctld -c -f "$CONF"
    for node in "${NODES[@]}"; do
        slurmd -N "$node" -f "$CONF"
    done

    local deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        all_running || die "a daemon exited during start (logs below)"
        nodes_idle && break
        if ((SECONDS >= deadline)); then
            sinfo --Node --long >&2 || true
            die "nodes not idle after $((SECONDS - started)) s (sinfo above, logs below)"
        fi
        sleep 0.5
    done
    trap - EXIT

    log "up in $((SECONDS - started)) s: $(sinfo --noheader --Node --format='%N=%t' | xargs)"
    echo "export SLURM_CONF=$CONF"
}

# Cancel every job of this cluster and wait (up to 20 s) until none runs: a job's slurmstepd
# and processes would otherwise outlive slurmd.
cancel_jobs() {
    our_pid "$RUN/slurmctld.pid" >/dev/null || return 0
    local jobs
    jobs=$(squeue --noheader --format=%i 2>/dev/null | xargs) || return 0
    [[ -n $jobs ]] || return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086 # one argument per job id
    scancel $jobs 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while [[ -n $(squeue --noheader --format=%i 2>/dev/null) ]] && ((SECONDS < deadline)); do
        sleep 0.5
    done
}

stop() {
    cancel_jobs
    local file pid pids=()
    # Reverse start order: slurmd, slurmctld, then munged (the others talk to it on the way).
    while read -r file; do
        pid=$(our_pid "$file") || continue
        pids=("$pid" "${pids[@]}")
    done < <(pid_files)
    if ((${#pids[@]} == 0)); then
        log "nothing running in $DIR"
        return 0
    fi
    kill -TERM "${pids[@]}" 2>/dev/null || true

    # Wait up to 20 s for them to exit, then SIGKILL the rest.
    local deadline=$((SECONDS + 20)) alive
    while :; do
        alive=()
        for pid in "${pids[@]}"; do [[ -e /proc/$pid ]] && alive+=("$pid"); done
        ((${#alive[@]} == 0)) && break
        if ((SECONDS >= deadline)); then
            log "still running after 20 s, sending SIGKILL: ${alive[*]}"
            kill -KILL "${alive[@]}" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    log "stopped ${#pids[@]} daemons (pids ${pids[*]})"
}

status() {
    local file pid rc=0
    while read -r file; do
        if pid=$(our_pid "$file"); then
            echo "$(basename "$file" .pid): running (pid $pid)"
        else
            echo "$(basename "$file" .pid): not running"
            rc=1
        fi
    done < <(pid_files)
    if ((rc == 0)); then
        sinfo --Node --long || rc=1
        nodes_up || rc=1
    fi
    echo "export SLURM_CONF=$CONF"
    return "$rc"
}

case $COMMAND in
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*) usage ;;
esac
