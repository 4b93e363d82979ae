#!/usr/bin/env bash
# An upgrade from the previous package (tests/lab/previous-commit) with an
# instance up, in a booted Debian with systemd as PID 1 (tests/lab/lab.sh).
# The documented behaviour: the upgrade restarts the helper cleanly (its
# instances end and leave nothing), the new helper serves the next request,
# and a client of the previous release gets a clear error from the new helper.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/lab/lab.sh

[[ $(id -u) -eq 0 ]] || lab_die "needs root"
deb=${WARREN_DEB:-$(packaging/build-deb.sh | tail -1)}
old=$(lab_previous_deb) || exit 1
rootfs=$(lab_tree) || exit 1
lab_boot "$rootfs"
lab_push "$old" /root/warren-previous.deb
lab_push "$deb" /root/warren-new.deb
lab_run sh -c 'mkdir -p /etc/warren && printf "idle_timeout_secs = 2\n" >/etc/warren/helper.toml'
check "the previous package installs" \
  lab_run sh -c "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq /root/warren-previous.deb >/dev/null 2>&1"
lab_run useradd --create-home --shell /bin/bash "$LAB_USER"
lab_run usermod -aG warren "$LAB_USER"
lab_run loginctl enable-linger "$LAB_USER"
within 100 lab_run test -d "/run/user/$(lab_run id -u "$LAB_USER")" || bad "the user's manager (linger) did not start"
# The previous release's unit cannot create instances (issue #21 bug 1): the
# instance comes from a sudo-autostarted helper, as its users had to do.
lab_run systemctl disable --now warren-helper.socket >/dev/null 2>&1
lab_tunnel_exit
conf=/home/$LAB_USER/exit.conf
lab_user warren up prev --wg "$conf" >/dev/null 2>&1
check "an instance is up under the previous release" \
  bash -c "lab_run ip netns list 2>/dev/null | grep -q '^warren-prev'"
lab_run cp /usr/bin/warren /root/warren-previous
check "the upgrade installs" \
  lab_run sh -c "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq /root/warren-new.deb >/dev/null 2>&1"
check "the upgrade stopped the previous helper" bash -c "! lab_run pgrep -x warren-helper >/dev/null"
check "its instance ended cleanly: no namespace, /etc/netns entry or worker left" \
  bash -c "! lab_run ip netns list 2>/dev/null | grep -q warren- && ! lab_run test -e /etc/netns/warren-prev && ! lab_run pgrep -f warren-worker >/dev/null"
check "the new release serves the next request (instance up again)" \
  lab_user warren up prev --wg "$conf" --json
st=$(lab_user warren helper status 2>&1)
proto=$(lab_user warren helper status --json | sed -n 's/.*"protocol":\([0-9]*\).*/\1/p')
check "the helper now is the new release (protocol $proto)" \
  bash -c "[[ -n '$proto' && '$proto' -gt 2 ]]"
msg=$(lab_user /root/warren-previous helper status 2>&1)
echo "    previous client: $msg"
check "a client of the previous release gets a clear error" \
  grep -q "different warren releases" <<<"$msg"
lab_user warren down prev >/dev/null 2>&1
lab_stop
echo "lab upgrade: $pass passed, $fail failed"
[[ $fail -eq 0 ]]
