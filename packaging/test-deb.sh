#!/usr/bin/env bash
# Builds the .deb, installs it on this machine, uses it as a member of the
# warren group (sudo autostart with the installed sudoers snippet), then purges
# it and checks that nothing is left. Needs root. Refuses to run where warren
# is already installed, so it never clobbers a real installation.
#
# The test user exists only inside a private mount namespace (a copy of /etc
# with the user added, a fresh tmpfs on /run), so the machine's user database
# is never edited.
set -uo pipefail
cd "$(dirname "$0")/.."
pass=0 fail=0
ok()   { echo "ok   - $*"; pass=$((pass+1)); }
bad()  { echo "FAIL - $*"; fail=$((fail+1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }

if dpkg -s warren >/dev/null 2>&1; then
  echo "warren is already installed here; refusing to test-install over it" >&2
  exit 1
fi
deb=$(packaging/build-deb.sh | tail -1)
[[ -f $deb ]] || { echo "no package built" >&2; exit 1; }
work=$(mktemp -d /tmp/warren-deb-test.XXXXXX)
purged=0
cleanup() {
  [[ $purged = 1 ]] || dpkg --purge warren >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

check "dpkg -i installs the package" dpkg -i "$deb"
check "binaries installed" test -x /usr/bin/warren -a -x /usr/bin/warren-helper -a -x /usr/bin/warren-worker
check "group warren created" bash -c "getent group warren >/dev/null"
check "sudoers snippet is 0440 and valid" \
  bash -c '[[ $(stat -c %a /etc/sudoers.d/warren) = 440 ]] && visudo -c -f /etc/sudoers.d/warren >/dev/null'
check "units installed" test -f /usr/lib/systemd/system/warren-helper.socket -a -f /usr/lib/systemd/system/warren-helper.service
check "systemd-analyze verify passes for every installed unit" \
  systemd-analyze verify /usr/lib/systemd/system/warren-helper.socket /usr/lib/systemd/system/warren-helper.service \
    /usr/lib/systemd/user/warren-proxy.service
check "man pages installed" test -f /usr/share/man/man1/warren.1.gz -a -f /usr/share/man/man8/warren-helper.8.gz
check "bash completion installed" test -f /usr/share/bash-completion/completions/warren

# A group member, in a private mount namespace.
gid=$(getent group warren | cut -d: -f3)
cp -a /etc "$work/etc"
echo "wrpkguser:x:61200:61200::/nonexistent:/bin/sh" >>"$work/etc/passwd"
echo "wrpkguser:x:61200:" >>"$work/etc/group"
sed -i "s/^warren:x:$gid:.*/&,wrpkguser/; s/^warren:x:$gid:,/warren:x:$gid:/" "$work/etc/group"
echo "wrpkguser:*:19000:0:99999:7:::" >>"$work/etc/shadow"
out=$(unshare --mount --propagation private -- bash -c "
  mount --bind $work/etc /etc
  mount -t tmpfs -o mode=0755 tmpfs /run
  mkdir -p -m 700 /run/user/61200 && chown 61200 /run/user/61200
  as_user='setpriv --reuid=61200 --regid=61200 --init-groups --inh-caps=-all -- env XDG_RUNTIME_DIR=/run/user/61200'
  \$as_user /usr/bin/warren helper status >/dev/null 2>&1; echo \"before-start-rc=\$?\"
  \$as_user /usr/bin/warren helper start --json </dev/null; echo \"start-rc=\$?\"
  \$as_user /usr/bin/warren helper status --json; echo \"status-rc=\$?\"
  pid=\$(\$as_user /usr/bin/warren helper status --json | sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p')
  [ -n \"\$pid\" ] && kill -TERM \"\$pid\"
  for i in \$(seq 100); do [ -S /run/warren/helper.sock ] || break; sleep 0.05; done
  [ -S /run/warren/helper.sock ] && echo still-running || echo stopped
" 2>&1)
echo "$out" | sed 's/^/    /'
check "as a group member, the helper is absent before start (exit 3)" grep -q "before-start-rc=3" <<<"$out"
check "as a group member, warren helper start autostarts it through sudo" grep -q "start-rc=0" <<<"$out"
check "as a group member, warren helper status works" grep -q "status-rc=0" <<<"$out"
check "the autostarted helper stops on SIGTERM" grep -q "^stopped" <<<"$out"

check "dpkg --purge removes the package" dpkg --purge warren
purged=1
check "no binaries left" bash -c '! ls /usr/bin/warren /usr/bin/warren-helper /usr/bin/warren-worker 2>/dev/null'
check "no units left" bash -c '! ls /usr/lib/systemd/system/warren-helper.* /usr/lib/systemd/user/warren-* 2>/dev/null'
check "no sudoers snippet left" test ! -e /etc/sudoers.d/warren
check "no group left" bash -c '! getent group warren'
check "no /run/warren left" test ! -e /run/warren
check "no systemd enablement symlinks left" \
  bash -c '! find /etc/systemd -name "warren-helper*" 2>/dev/null | grep -q .'

# install.sh: the same layout without dpkg (staged, so the machine is untouched).
stage=$work/stage
DESTDIR=$stage packaging/install.sh >/dev/null 2>&1
check "install.sh installs binaries, units, sudoers, man pages, completions" bash -c "
  test -x $stage/usr/local/bin/warren -a -x $stage/usr/local/bin/warren-helper &&
  test -f $stage/etc/systemd/system/warren-helper.socket &&
  grep -q '^ExecStart=/usr/local/bin/warren-helper serve --user-cgroups$' $stage/etc/systemd/system/warren-helper.service &&
  grep -q 'WARREN_HELPER = /usr/local/bin/warren-helper serve --autostarted$' $stage/etc/sudoers.d/warren &&
  [[ \$(stat -c %a $stage/etc/sudoers.d/warren) = 440 ]] &&
  test -f $stage/usr/local/share/man/man8/warren-helper.8 &&
  test -f $stage/usr/local/share/bash-completion/completions/warren"
DESTDIR=$stage packaging/install.sh --uninstall >/dev/null 2>&1
check "install.sh --uninstall removes every file" bash -c "[[ -z \$(find $stage -type f) ]]"

echo "package: $pass passed, $fail failed"
[[ $fail -eq 0 ]]
