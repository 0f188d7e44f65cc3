#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (Debian 12, as root, no systemd), so that the tests
# can submit real job arrays through Hydra's submitit launcher (tests/test_slurm.py).
#
# Idempotent: when SLURM already answers with a usable node, it does nothing. Otherwise it installs
# munge + slurmctld + slurmd + slurm-client from Debian, writes /etc/slurm/slurm.conf for this node
# (CPUs and memory from `slurmd -C`), starts the three daemons and waits until the node is idle.
# Logs: /var/log/slurm/{slurmctld,slurmd}.log and /var/log/munge/munged.log.
set -euo pipefail

PARTITION="${SLURM_PARTITION:-debug}"
WAIT_S="${SLURM_WAIT_S:-60}"
CONF=/etc/slurm/slurm.conf

log() { echo "slurm.sh: $*"; }

# A node that is idle, mixed or allocated means SLURM answers and can run jobs.
node_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    timeout 10 sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'
}

if [[ $EUID -ne 0 ]]; then
    echo "error: .ci/slurm.sh must run as root (it installs packages and starts daemons)" >&2
    exit 2
fi

if node_ready; then
    log "SLURM already answers:"; sinfo
    exit 0
fi

# --- packages -----------------------------------------------------------------------------------
packages=(munge slurmctld slurmd slurm-client)
installed=$(dpkg-query -W -f='${Status}\n' "${packages[@]}" 2>/dev/null | grep -c 'install ok installed' || true)
if [[ $installed -eq ${#packages[@]} ]]; then
    log "packages already installed"
else
    log "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Without systemd the packages' own service starts fail (no slurm.conf yet): forbid them while
    # installing, as Docker images do; the daemons are started below.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # The package lists may be absent on a fresh machine; update only when the install needs it.
    apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; }
fi

# --- munge (authentication between the SLURM daemons and clients) --------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating the munge key"
    mungekey --create --force
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
fi
munge -n | unmunge >/dev/null

# --- slurm.conf for this one node ----------------------------------------------------------------
host=$(hostname -s)
# `slurmd -C` prints "NodeName=... CPUs=... Boards=... RealMemory=..." for the machine it runs on.
node_line=$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=${host}/")
install -d -m 0755 /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm
cat > "$CONF.new" <<EOF
# Written by .ci/slurm.sh: a one-node cluster for tests; the daemons and the jobs run as root.
ClusterName=memhead-ci
# Loopback addresses: the machine's own name need not resolve.
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# No cgroups here (containers/VMs without systemd): track processes by parent id, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Cores are the only consumable, so small array tasks share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
MaxArraySize=10001
${node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=${PARTITION} Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.new" "$CONF"
log "wrote $CONF ($node_line)"

# --- daemons ------------------------------------------------------------------------------------
# Stale daemons (e.g. started with another configuration) are stopped by their pid files only.
for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
    if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        kill "$(cat "$pidfile")"; sleep 1
    fi
done
log "starting slurmctld and slurmd"
/usr/sbin/slurmctld
/usr/sbin/slurmd

for ((i = 0; i < WAIT_S; i++)); do
    if node_ready; then
        log "SLURM is up:"; sinfo
        exit 0
    fi
    # A node that registered as down (e.g. after an unclean stop) is put back into service.
    if timeout 10 sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(down|drained|unknown)'; then
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 1
done
echo "error: SLURM did not report node ${host} idle within ${WAIT_S}s" >&2
sinfo >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
