#!/bin/sh
# Install the Debian packages msgbus needs to build, test and run its demo, if any
# is missing. Uses sudo when not root.
set -eu
PKGS="gcc clang make pkg-config libpq-dev postgresql-15 postgresql-client-15 lua5.4 liblua5.4-dev
      lua-busted lua-check lua-argparse luarocks valgrind lua-sql-postgres lua-cqueues lua-luv
      iproute2 nftables libclang-rt-14-dev"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "msgbus: installing Debian packages:$missing"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
