#!/bin/sh
# npm "install" hook (package.json): build the optional native addon in this folder (splice(2)
# data relay, libnftables for the kernel data path, SO_ORIGINAL_DST for interception).
# It never fails the install: without the addon (not Linux, no compiler, no Node headers)
# the proxy uses its JS relay, and src/data/splice-relay.ts says which one it picked.
cd "$(dirname "$0")" || exit 0
if [ "$(uname -s)" != Linux ]; then
  echo "ftp-nat-proxy: the splice(2) relay is Linux-only; using the JS relay"
  exit 0
fi
# Build against the headers of the Node that runs this (Debian's nodejs ships them under
# /usr/include/node) instead of downloading them, unless npm was told a nodedir already.
set --
prefix=$(dirname "$(dirname "$(command -v node)")")
if [ -z "${npm_config_nodedir:-}" ] && [ -f "$prefix/include/node/node_api.h" ]; then
  set -- "--nodedir=$prefix"
fi
# npm puts its own node-gyp on PATH for lifecycle scripts; run by hand, look for one.
gyp=node-gyp
if ! command -v node-gyp > /dev/null 2>&1; then
  bundled="$(dirname "$(command -v npm 2>/dev/null || echo /nonexistent)")/../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js"
  if [ -x ../../node_modules/.bin/node-gyp ]; then gyp=../../node_modules/.bin/node-gyp
  elif [ -f "$bundled" ]; then gyp="node $bundled"
  fi
fi
if $gyp rebuild "$@" > build.log 2>&1; then
  echo "ftp-nat-proxy: built the splice(2) data relay (src/native/build/Release/splice_relay.node)"
else
  echo "ftp-nat-proxy: splice(2) relay not built (see src/native/build.log); using the JS relay"
fi
exit 0
