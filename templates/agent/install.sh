{% autoescape off %}#!/bin/sh
# The ReClo agent's installer, served by the ReClo portal at {{ portal }}.
#
#   curl -fsSL {{ portal }}/agent/install.sh | sudo sh -s -- --key KEY
#
# KEY is the one-time enrollment key from the portal's "Add a server": the
# server trades it for a credential of its own, so the owner's password is
# never typed here. The script checks the system (Linux, Python 3.11 or
# newer, root), unpacks the agent {{ version }} bundle from the portal into
# PREFIX (default /opt/reclo-agent: no pip, no package index), links
# reclo-agent into PREFIX/bin (and /usr/local/bin for the default PREFIX),
# enrols with the key, installs an hourly schedule of the disk holding /
# (--source, --every; --no-schedule to skip), and says when the next backup
# runs. Run it again to upgrade in place: the configuration (the server's
# credential) and the state folder stay; --reenroll enrols again with a new key.
# Uninstall with: sudo PREFIX/bin/reclo-agent-uninstall
# (--purge also removes the configuration and the state folder).
#
# With another --prefix, the configuration (PREFIX/etc/agent.json) and the
# state (PREFIX/state) live there too, so nothing outside PREFIX changes
# except the schedule (--root DIR puts that under DIR as well).
set -eu

PORTAL={{ portal_sh }}
DEFAULT_PREFIX=/opt/reclo-agent
PREFIX=$DEFAULT_PREFIX
BIN_DIR=
KEY=
SOURCE=
EVERY=1h
SCHEDULE=yes
BACKUP_NOW=no
ROOT=
REENROLL=no
UNINSTALL=no
PURGE=

say() { echo "reclo install: $*"; }
fail() { echo "reclo install: $*" >&2; exit 1; }
usage="--key KEY [--portal URL] [--prefix DIR] [--bin-dir DIR] [--source DISK] [--every 1h] [--no-schedule] [--backup-now] [--root DIR] [--reenroll] | --uninstall [--purge]"
need() { [ $# -ge 2 ] || fail "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --key) need "$@"; KEY=$2; shift 2 ;;
    --key=*) KEY=${1#--key=}; shift ;;
    --portal) need "$@"; PORTAL=${2%/}; shift 2 ;;
    --prefix) need "$@"; PREFIX=${2%/}; shift 2 ;;
    --bin-dir) need "$@"; BIN_DIR=$2; shift 2 ;;
    --source) need "$@"; SOURCE=$2; shift 2 ;;
    --every) need "$@"; EVERY=$2; shift 2 ;;
    --no-schedule) SCHEDULE=no; shift ;;
    --backup-now) BACKUP_NOW=yes; shift ;;
    --root) need "$@"; ROOT=$2; shift 2 ;;
    --reenroll) REENROLL=yes; shift ;;
    --uninstall) UNINSTALL=yes; shift ;;
    --purge) PURGE=--purge; shift ;;
    -h|--help) echo "usage: install.sh $usage"; exit 0 ;;
    *) fail "unknown option $1 (usage: install.sh $usage)" ;;
  esac
done

case "$PREFIX" in /*) ;; *) fail "--prefix must be an absolute path, not $PREFIX" ;; esac
AGENT=$PREFIX/bin/reclo-agent
if [ "$PREFIX" = "$DEFAULT_PREFIX" ]; then
  CONFIG=/etc/reclo/agent.json; STATE=/var/lib/reclo-agent; BIN_DIR=${BIN_DIR:-/usr/local/bin}
else
  CONFIG=$PREFIX/etc/agent.json; STATE=$PREFIX/state
fi

if [ "$UNINSTALL" = yes ]; then
  [ -x "$PREFIX/bin/reclo-agent-uninstall" ] || fail "no agent installed in $PREFIX"
  exec "$PREFIX/bin/reclo-agent-uninstall" $PURGE
fi

# --- the system -------------------------------------------------------------------
[ "$(uname -s)" = Linux ] || fail "the agent runs on Linux; this is $(uname -s)"
[ "$(id -u)" = 0 ] || fail "run it as root (sudo): image backups read whole disks"
[ -n "$KEY" ] || [ -s "$CONFIG" ] \
  || fail "give --key KEY: the one-time key from the portal's Add a server ($PORTAL/servers/add/)"
PYTHON=$(command -v python3 || true)
[ -n "$PYTHON" ] || fail "python3 is missing; install Python 3.11 or newer (Debian/Ubuntu: apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "$("$PYTHON" -V 2>&1) is too old; the agent needs Python 3.11 or newer"
command -v tar >/dev/null || fail "tar is missing"

# --- the agent --------------------------------------------------------------------
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
say "downloading the agent from $PORTAL"
curl -fsSL "$PORTAL/agent/reclo-agent.tar.gz" -o "$tmp/agent.tar.gz" \
  || fail "could not download $PORTAL/agent/reclo-agent.tar.gz"
tar -xzf "$tmp/agent.tar.gz" -C "$tmp"
unpacked=$(echo "$tmp"/reclo-agent-*/)
[ -f "$unpacked/VERSION" ] || fail "the download is not an agent bundle"
VERSION=$(sed -n 1p "$unpacked/VERSION")
DIGEST=$(sed -n 2p "$unpacked/VERSION" | cut -c1-12)
DEST=$PREFIX/versions/$VERSION-$DIGEST
LIB=$DEST/lib
if [ -d "$DEST" ]; then
  say "agent $VERSION ($DIGEST) is already unpacked in $DEST"
else
  mkdir -p "$PREFIX/versions"
  rm -rf "$DEST.partial"
  mv "$unpacked" "$DEST.partial"
  mv "$DEST.partial" "$DEST"
fi

# zstd is the one compiled dependency: the bundle's copy may be for another Python.
works() { "$PYTHON" -I -c 'import sys; sys.path.insert(0, sys.argv[1]); import reclo_agent.vhd.seekzstd' "$LIB" 2>/dev/null; }
if ! works; then
  tag=$("$PYTHON" -c 'import sys, platform; print("cp%d%d %s" % (sys.version_info[:2] + (platform.machine(),)))')
  wheel=$(ls "$DEST"/wheels/backports_zstd-*-"${tag% *}"-"${tag% *}"-*"${tag#* }"*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ]; then
    "$PYTHON" -m zipfile -e "$wheel" "$LIB"
  elif "$PYTHON" -m pip --version >/dev/null 2>&1; then
    say "fetching zstd for $("$PYTHON" -V) from the Python package index"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --target "$LIB" --upgrade --no-deps backports.zstd
  fi
  works || fail "the agent's zstd module does not load with $("$PYTHON" -V) on $(uname -m); install python3-pip and run this again"
fi

mkdir -p "$PREFIX/bin"
ln -sfn "$DEST" "$PREFIX/current.new"
mv -T "$PREFIX/current.new" "$PREFIX/current"
# -I: neither PYTHONPATH nor the user's site-packages reach the agent (nor its lib/ their scripts).
cat > "$AGENT.new" <<SHIM
#!/bin/sh
# reclo-agent, installed by $PORTAL/agent/install.sh
RECLO_AGENT_LAUNCHER='$AGENT'; export RECLO_AGENT_LAUNCHER
$( [ "$PREFIX" = "$DEFAULT_PREFIX" ] || echo ": \"\${RECLO_AGENT_CONFIG:=$CONFIG}\"; export RECLO_AGENT_CONFIG" )
exec '$PYTHON' -I -c 'import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module("reclo_agent", run_name="__main__", alter_sys=True)' '$PREFIX/current/lib' "\$@"
SHIM
chmod 755 "$AGENT.new"
mv "$AGENT.new" "$AGENT"
cat > "$PREFIX/bin/reclo-agent-uninstall" <<UNINSTALL
#!/bin/sh
# Removes the ReClo agent installed in $PREFIX; --purge also its configuration and state.
set -u
[ "\$(id -u)" = 0 ] || { echo "reclo uninstall: run it as root (sudo)" >&2; exit 1; }
'$AGENT' schedule remove || true
$( [ -n "$BIN_DIR" ] && echo "[ \"\$(readlink '$BIN_DIR/reclo-agent')\" = '$AGENT' ] && rm -f '$BIN_DIR/reclo-agent'" )
rm -rf '$PREFIX/versions' '$PREFIX/current'
if [ "\${1:-}" = --purge ]; then
  rm -rf '$CONFIG' '$STATE'
  echo "reclo uninstall: removed the agent, its configuration and its state. Revoke the server in the portal."
else
  echo "reclo uninstall: removed the agent; kept $CONFIG and $STATE (--purge removes them)."
fi
rm -rf '$PREFIX/bin'
rmdir '$PREFIX/etc' '$PREFIX' 2>/dev/null || true
UNINSTALL
chmod 755 "$PREFIX/bin/reclo-agent-uninstall"
if [ -n "$BIN_DIR" ]; then
  mkdir -p "$BIN_DIR"
  ln -sfn "$AGENT" "$BIN_DIR/reclo-agent"
fi
for old in "$PREFIX"/versions/*; do
  [ "$old" = "$DEST" ] || rm -rf "$old"
done
say "installed reclo-agent $("$AGENT" --version | cut -d' ' -f2) in $PREFIX (command: $AGENT)"

# --- enrolment ----------------------------------------------------------------------
# A rerun of the same line upgrades: its key is used up, and the credential in CONFIG stays.
if [ -s "$CONFIG" ] && [ "$REENROLL" = no ]; then
  say "already enrolled ($CONFIG); upgraded in place, the state folder $STATE is kept (--reenroll uses the key)"
else
  [ -n "$KEY" ] || fail "give --key KEY to enrol"
  "$AGENT" enroll --portal "$PORTAL" --key "$KEY" --state-dir "$STATE"
fi

# --- the schedule and the first backup ------------------------------------------------
if [ -z "$SOURCE" ] && { [ "$SCHEDULE" = yes ] || [ "$BACKUP_NOW" = yes ]; }; then
  part=$(findmnt -no SOURCE / 2>/dev/null || true)
  disk=$(lsblk -no PKNAME "$part" 2>/dev/null | head -n 1 || true)
  if [ -n "$disk" ]; then SOURCE=/dev/$disk; elif [ -b "$part" ]; then SOURCE=$part; fi
  [ -n "$SOURCE" ] || fail "could not tell which disk holds / ($part); give --source /dev/sdX (or --no-schedule)"
fi
status=0
if [ "$SCHEDULE" = yes ]; then
  if "$AGENT" schedule install --every "$EVERY" "$SOURCE" ${ROOT:+--root "$ROOT"}; then
    :
  else
    status=$?
    say "the agent is installed and enrolled, but NOT scheduled (see above). Fix that, then run:"
    say "  $AGENT schedule install --every $EVERY $SOURCE"
  fi
else
  say "no schedule installed (--no-schedule); later: $AGENT schedule install --every 1h $SOURCE"
fi
if [ "$BACKUP_NOW" = yes ]; then
  say "first backup of $SOURCE"
  "$AGENT" backup "$SOURCE" || { status=$?; say "the first backup failed (see above)"; }
fi
if [ "$status" = 0 ]; then
  say "done: uninstall with $PREFIX/bin/reclo-agent-uninstall; the portal shows this server's health"
fi
exit "$status"
{% endautoescape %}