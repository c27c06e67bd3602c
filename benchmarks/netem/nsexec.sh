#!/bin/bash
# Hydra's "ssh" launcher with -launcher-exec pointing here calls:
#     nsexec.sh -x <host> "<hydra_pmi_proxy>" --control-port ... --proxy-id K
# exactly as it would call ssh: the arguments are meant to be joined and run by a shell
# on <host>.  Here every <host> is a network namespace made by cluster.py, so the proxy
# (and the rank it forks) runs inside that namespace and its only route to the other
# ranks is the rate-limited veth link.  Refuses any host that is not one of ours.
set -euo pipefail
[ "${1:-}" = "-x" ] && shift
host=${1:?nsexec.sh: no host}
shift
if ! [[ $host =~ ^scnet-[A-Za-z0-9]+-r[0-9]+$ ]]; then
    echo "nsexec.sh: refusing host '$host' (not a signcomm netem namespace)" >&2
    exit 2
fi
if ! [ -e "/run/netns/$host" ]; then
    echo "nsexec.sh: namespace '$host' does not exist (cluster not up?)" >&2
    exit 2
fi
exec ip netns exec "$host" /bin/sh -c "$*"
