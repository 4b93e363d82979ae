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
  ca-certificates netbase)
LAB_CACHE=${WARREN_LAB_CACHE:-/var/tmp/warren-lab}
LAB_USER=wrlabuser
LAB_NAME=
LAB_PID=
LAB_LEADER=
LAB_CG=
LAB_LOG=

lab_die() { echo "lab: $*" >&2; exit 1; }

# Checks: `check WHAT CMD...` reports ok/FAIL; `within TENTHS CMD...` polls.
pass=0 fail=0
ok()  { echo "ok   - $*"; pass=$((pass+1)); }
bad() { echo "FAIL - $*"; fail=$((fail+1)); return 1; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
within() { local n=$1 i; shift; for i in $(seq "$n"); do "$@" && return 0; sleep 0.1; done; "$@"; }

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
  key=$(printf '%s\n' "v2" "$suite" "${LAB_PACKAGES[@]}" | sha256sum | cut -c1-16)
  dir=$LAB_CACHE/$suite-$key
  if [[ -f $dir/ready ]]; then echo "$dir/rootfs"; return; fi
  command -v mmdebstrap >/dev/null || lab_die "mmdebstrap missing (scripts/deps.sh installs it)"
  mkdir -p "$LAB_CACHE"
  tmp=$(mktemp -d "$LAB_CACHE/build.XXXXXX")
  echo "lab: building a $suite tree (${#LAB_PACKAGES[@]} packages) in $dir" >&2
  # The package lists and downloaded packages stay: apt inside can then
  # resolve the package's dependencies without a network.
  if ! mmdebstrap --quiet --variant=minbase --skip=cleanup/apt/lists,cleanup/apt/cache \
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
  # Cgroups of earlier labs whose script was killed (no trap ran): empty
  # ones of dead pids go.
  for c in /sys/fs/cgroup/{systemd,unified,}/warren-lab-*; do
    [[ -d $c ]] && ! kill -0 "${c##*-}" 2>/dev/null &&
      find "$c" -depth -type d -exec rmdir {} + 2>/dev/null
  done
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
  # Checks run in `bash -c` subshells: they need these.
  export LAB_LEADER LAB_USER
  export -f within lab_run lab_user
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

# Sends signal $1 to process $2 inside the container. Refuses anything but a
# positive pid: `kill 0` (an empty MainPID) would signal this script's own
# process group.
lab_kill() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || { echo "lab: no process to signal ('$2')" >&2; return 1; }
  lab_run kill "-$1" "$2"
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
  local c p
  for c in $(lab_cgroups); do
    [[ -d $c ]] || continue
    # Whatever of the container outlived it (only ever our own processes).
    for p in $(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    find "$c" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  rm -f "$LAB_LOG"
  LAB_PID=
}

# The package of an earlier commit (the last one users could have installed:
# tests/lab/previous-commit), built once and cached by commit, with a version
# that sorts before the current one. Prints its path.
lab_previous_deb() {
  local commit dir src tgt
  commit=$(cat tests/lab/previous-commit)
  dir=$LAB_CACHE/deb-$commit
  if [[ -f $dir/ready ]]; then echo "$dir/warren_previous.deb"; return; fi
  git cat-file -e "$commit^{commit}" 2>/dev/null || lab_die "previous commit $commit not in this clone"
  rm -rf "$dir"; mkdir -p "$dir/src"
  src=$dir/src tgt=$dir/target
  git archive "$commit" | tar -x -C "$src"
  echo "lab: building the previous package ($commit) once; cached in $dir" >&2
  (
    cd "$src" && export CARGO_TARGET_DIR=$tgt &&
    cargo build --quiet --release --locked --bins &&
    mkdir -p target/generated/man target/generated/completions &&
    "$tgt/release/warren" generate-man target/generated/man &&
    "$tgt/release/warren-helper" generate-man target/generated/man &&
    for s in bash zsh fish; do "$tgt/release/warren" completions $s >"target/generated/completions/c.$s"; done &&
    mv target/generated/completions/c.bash target/generated/completions/warren.bash &&
    mv target/generated/completions/c.zsh target/generated/completions/_warren &&
    mv target/generated/completions/c.fish target/generated/completions/warren.fish &&
    cargo deb --quiet -p warren --no-build --locked --deb-version "0.1.0~previous" \
      -o "$dir/warren_previous.deb"
  ) >&2 || { rm -rf "$dir"; lab_die "cannot build the previous package"; }
  rm -rf "$src" "$tgt"; touch "$dir/ready"
  echo "$dir/warren_previous.deb"
}

# Inside the container: a WireGuard exit (wireguard-go) in namespace
# wrlabexit behind veth wrlab0 (198.18.0.1/24 here, .2 there), a web server
# (198.18.100.1:8080 through the tunnel, 198.18.0.1:8081 on the uplink), a
# resolver answering web.lab.test with 198.18.100.1 through the tunnel and an
# uplink resolver at 198.18.0.53 answering 198.18.0.99; and the test user's
# wg-quick file /home/$LAB_USER/exit.conf for it.
lab_tunnel_exit() {
  local conf=/home/$LAB_USER/exit.conf
  lab_run sh -s <<'EOF'
set -e
ip netns add wrlabexit
ip link add wrlab0 type veth peer name wrlab1 netns wrlabexit
ip addr add 198.18.0.1/24 dev wrlab0 && ip link set wrlab0 up
ip -n wrlabexit addr add 198.18.0.2/24 dev wrlab1
# The uplink's resolver (on the exit's veth side, outside the tunnel): it
# answers differently, so a leak shows in the answer as well as on the wire.
ip -n wrlabexit addr add 198.18.0.53/24 dev wrlab1
ip -n wrlabexit link set wrlab1 up && ip -n wrlabexit link set lo up
umask 077; mkdir -p /root/wg
wg genkey >/root/wg/exit.key && wg pubkey </root/wg/exit.key >/root/wg/exit.pub
wg genkey >/root/wg/user.key && wg pubkey </root/wg/user.key >/root/wg/user.pub
WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 ip netns exec wrlabexit wireguard-go wg0 2>/dev/null
ip netns exec wrlabexit wg set wg0 private-key /root/wg/exit.key listen-port 51820 \
  peer "$(cat /root/wg/user.pub)" allowed-ips 198.18.100.2/32
ip -n wrlabexit addr add 198.18.100.1/24 dev wg0 && ip -n wrlabexit link set wg0 up
mkdir -p /srv/www && echo "hello from the exit" >/srv/www/index.html
ip netns exec wrlabexit busybox httpd -p 198.18.100.1:8080 -h /srv/www
busybox httpd -p 198.18.0.1:8081 -h /srv/www
ip netns exec wrlabexit dnsmasq --no-resolv --no-hosts --listen-address=198.18.100.1 \
  --bind-interfaces --address=/web.lab.test/198.18.100.1 --pid-file=/run/wrlab-dnsmasq.pid
ip netns exec wrlabexit dnsmasq --no-resolv --no-hosts --listen-address=198.18.0.53 \
  --bind-interfaces --address=/web.lab.test/198.18.0.99 --pid-file=/run/wrlab-dnsmasq-up.pid
EOF
  lab_run sh -c "printf '[Interface]\nPrivateKey = %s\nAddress = 198.18.100.2/32\nDNS = 198.18.100.1\n\n[Peer]\nPublicKey = %s\nEndpoint = 198.18.0.2:51820\nAllowedIPs = 0.0.0.0/0\nPersistentKeepalive = 25\n' \"\$(cat /root/wg/user.key)\" \"\$(cat /root/wg/exit.pub)\" >$conf && chown $LAB_USER $conf && chmod 600 $conf"
}
