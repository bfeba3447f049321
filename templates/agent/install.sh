{% autoescape off %}#!/bin/sh
# The ReClo agent's installer, served by the ReClo portal at {{ portal }}.
#
#   curl -fsSL {{ portal }}/agent/install.sh | sudo sh -s -- --key KEY
#
# KEY is the one-time enrollment key from the portal's "Add a server".
# It installs the agent into its own Python virtual environment (PREFIX,
# default /opt/reclo-agent) from this portal, links reclo-agent into
# BIN_DIR (default /usr/local/bin) and enrols this server with the key, so
# the owner's password is never typed here. It changes nothing else: no
# schedule, no service; the next steps are printed at the end.
set -eu

PORTAL={{ portal_sh }}
PREFIX=/opt/reclo-agent
BIN_DIR=/usr/local/bin
KEY=""

fail() { echo "reclo install: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --key) [ $# -ge 2 ] || fail "--key needs a value"; KEY=$2; shift 2 ;;
    --key=*) KEY=${1#--key=}; shift ;;
    --prefix) [ $# -ge 2 ] || fail "--prefix needs a value"; PREFIX=$2; shift 2 ;;
    --bin-dir) [ $# -ge 2 ] || fail "--bin-dir needs a value"; BIN_DIR=$2; shift 2 ;;
    *) fail "unknown option $1 (use --key KEY [--prefix DIR] [--bin-dir DIR])" ;;
  esac
done

[ -n "$KEY" ] || fail "give --key KEY: the one-time key from the portal's Add a server ($PORTAL/servers/add/)"
PYTHON=$(command -v python3 || true)
[ -n "$PYTHON" ] || fail "python3 is missing; install Python 3.11 or newer (Debian/Ubuntu: apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "$("$PYTHON" -V 2>&1) is too old; the agent needs Python 3.11 or newer"

echo "reclo install: installing the agent into $PREFIX"
[ -x "$PREFIX/bin/pip" ] || "$PYTHON" -m venv "$PREFIX" \
  || fail "could not make a virtual environment in $PREFIX (Debian/Ubuntu: apt-get install python3-venv)"
"$PREFIX/bin/pip" install --quiet --disable-pip-version-check --upgrade "$PORTAL/agent/reclo-agent.tar.gz" \
  || fail "could not install the agent from $PORTAL/agent/reclo-agent.tar.gz"
mkdir -p "$BIN_DIR"
ln -sf "$PREFIX/bin/reclo-agent" "$BIN_DIR/reclo-agent"

echo "reclo install: enrolling this server"
"$PREFIX/bin/reclo-agent" enroll --portal "$PORTAL" --key "$KEY"

cat <<'NEXT'
reclo install: done. Next, back up a disk and schedule it hourly:
  reclo-agent backup /dev/sda
  reclo-agent schedule install --every 1h
NEXT
{% endautoescape %}