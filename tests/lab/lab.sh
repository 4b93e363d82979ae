# shellcheck shell=bash
# The deployment lab: a minimal Debian tree booted under systemd-nspawn, with
# a real systemd as PID 1, to run warren's package the way users run it
# (docs/adr/0006-host-mount-namespace.md, tests/lab/README.md).
#
#   lab_tree            build (or reuse) the cached tree, print its path
#   lab_boot ROOTFS     boot it (private network, volatile overlay)
#   lab_run CMD...      run a command inside, as root, in every namespace
#   lab_user CMD...     the same as the lab's test user (a warren group member)
#   lab_push SRC DST    copy a file in
#   lab_stop            power off, wait, remove the cgroups (also on EXIT)
#
# Nothing here talks to the host's systemd or D-Bus (there may be none):
# --register=no --keep-unit, the launching shell moved to cgroups of its own,
# nsenter instead of machinectl. Nothing inside can reach the host's network
# (--private-network). The tree itself is never changed by a run
# (--volatile=overlay). Fails loudly when the container cannot boot; never skips.

LAB_PACKAGES=(systemd systemd-sysv dbus libpam-systemd systemd-resolved iproute2 nftables
  sudo procps curl wireguard-tools wireguard-go iperf3 adduser tcpdump busybox dnsmasq-base
  ca-certificates)
LAB_CACHE=${WARREN_LAB_CACHE:-/var/tmp/warren-lab}
LAB_USER=wrlabuser
LAB_NAME=
LAB_PID=
LAB_LEADER=
LAB_CG=
LAB_LOG=

lab_die() { echo "lab: $*" >&2; exit 1; }

# The host's own Debian release and package sources: the tree matches the
# glibc the package was built against, and the machine's apt configuration
# says where packages come from (no address is written here).
lab_sources() {
  local f
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [[ -s $f ]] && { echo "$f"; return; }
  done
  lab_die "no apt sources on this machine (/etc/apt/sources.list[.d])"
}

lab_tree() {
  local suite key dir tmp
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:?}")
  key=$(printf '%s\n' "v1" "$suite" "${LAB_PACKAGES[@]}" | sha256sum | cut -c1-16)
  dir=$LAB_CACHE/$suite-$key
  if [[ -f $dir/ready ]]; then echo "$dir/rootfs"; return; fi
  command -v mmdebstrap >/dev/null || lab_die "mmdebstrap missing (scripts/deps.sh installs it)"
  mkdir -p "$LAB_CACHE"
  tmp=$(mktemp -d "$LAB_CACHE/build.XXXXXX")
  echo "lab: building a $suite tree (${#LAB_PACKAGES[@]} packages) in $dir" >&2
  if ! mmdebstrap --quiet --variant=minbase --skip=cleanup/apt/lists \
      --include="$(IFS=,; echo "${LAB_PACKAGES[*]}")" \
      "$suite" "$tmp/rootfs" "$(lab_sources)" >&2; then
    rm -rf "$tmp"; lab_die "mmdebstrap failed"
  fi
  local r=$tmp/rootfs
  printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n127.0.1.1 wrlab\n' >"$r/etc/hosts"
  echo wrlab >"$r/etc/hostname"
  : >"$r/etc/machine-id"
  # No login prompts on the console; nothing waits for a network.
  ln -sf /dev/null "$r/etc/systemd/system/console-getty.service"
  ln -sf /dev/null "$r/etc/systemd/system/systemd-networkd-wait-online.service"
  rm -rf "$dir"; mv "$tmp" "$dir"; touch "$dir/ready"
  echo "$dir/rootfs"
}

lab_cgroups() {
  local h
  for h in systemd unified; do
    [[ -d /sys/fs/cgroup/$h ]] && echo "/sys/fs/cgroup/$h/$LAB_CG"
  done
  # A pure cgroup v2 host.
  [[ -f /sys/fs/cgroup/cgroup.controllers ]] && echo "/sys/fs/cgroup/$LAB_CG"
  return 0
}

lab_boot() {
  local rootfs=$1 c i
  LAB_NAME=wrlab$$
  LAB_CG=warren-lab-$$
  LAB_LOG=$(mktemp /tmp/warren-lab-console.XXXXXX)
  trap lab_stop EXIT
  for c in $(lab_cgroups); do mkdir -p "$c"; done
  (
    for c in $(lab_cgroups); do echo "$BASHPID" >"$c/cgroup.procs"; done
    exec systemd-nspawn --quiet --boot --register=no --keep-unit --private-network \
      --volatile=overlay --directory="$rootfs" --machine="$LAB_NAME" --console=pipe \
      </dev/null >"$LAB_LOG" 2>&1
  ) &
  LAB_PID=$!
  for i in $(seq 200); do
    LAB_LEADER=$(pgrep -P "$LAB_PID" 2>/dev/null | head -1)
    [[ -n $LAB_LEADER && $(cat "/proc/$LAB_LEADER/comm" 2>/dev/null) == systemd ]] && break
    kill -0 "$LAB_PID" 2>/dev/null || break
    LAB_LEADER=; sleep 0.1
  done
  if [[ -z $LAB_LEADER ]]; then
    tail -20 "$LAB_LOG" >&2; lab_die "the container did not start (systemd-nspawn log above)"
  fi
  local state=
  for i in $(seq 600); do
    # Fails until PID 1's private socket exists; then says how far boot is.
    state=$(nsenter -t "$LAB_LEADER" -a -- systemctl is-system-running 2>/dev/null)
    case $state in running|degraded|maintenance|stopping) break ;; esac
    kill -0 "$LAB_PID" 2>/dev/null || break
    sleep 0.1
  done
  case $state in
    running|degraded) ;;
    *) tail -30 "$LAB_LOG" >&2
       lab_run systemctl --failed --no-pager >&2 || true
       lab_die "the container did not boot (state: '${state:-none}')" ;;
  esac
  export LAB_LEADER LAB_USER
  echo "lab: booted $LAB_NAME (leader $LAB_LEADER, state $state)" >&2
}

lab_run() {
  nsenter -t "$LAB_LEADER" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 "$@"
}

# As the test user, with the environment a login gives (runtime directory
# from the user's manager, which linger keeps running).
lab_user() {
  local uid
  uid=$(lab_run id -u "$LAB_USER")
  nsenter -t "$LAB_LEADER" -a -- env -i \
    PATH=/usr/local/bin:/usr/bin:/bin HOME="/home/$LAB_USER" USER="$LAB_USER" LANG=C.UTF-8 \
    XDG_RUNTIME_DIR="/run/user/$uid" DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/$uid/bus" \
    setpriv --reuid="$uid" --regid="$uid" --init-groups -- "$@"
}

lab_push() {
  lab_run sh -c "cat >'$2'" <"$1"
}

lab_stop() {
  local i
  [[ -n $LAB_PID ]] || return 0
  if kill -0 "$LAB_PID" 2>/dev/null; then
    [[ -n $LAB_LEADER ]] && lab_run systemctl --no-block poweroff >/dev/null 2>&1
    for i in $(seq 300); do kill -0 "$LAB_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$LAB_PID" 2>/dev/null; then
      echo "lab: the container did not power off in 30 s; killing it" >&2
      kill -KILL "$LAB_PID" 2>/dev/null
      [[ -n $LAB_LEADER ]] && kill -KILL "$LAB_LEADER" 2>/dev/null
    fi
  fi
  wait "$LAB_PID" 2>/dev/null
  local c
  for c in $(lab_cgroups); do
    [[ -d $c ]] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  rm -f "$LAB_LOG"
  LAB_PID=
}
