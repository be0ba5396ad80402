#!/bin/sh
# A "plugin" that starts like one but never shakes hands: it shows what it sees, leaves a child and a file
# behind in /tmp, and waits. eKuiper (and the check) must give up on it at portable.initTimeout.
echo "silent plugin started with $*"
echo "its /tmp holds: $(ls /tmp | tr '\n' ' ')"
touch "/tmp/left-by-$(basename "$(dirname "$PWD")")"
sh -c 'sleep 600; :' "$PWD/child" &
echo "silent plugin left child $! and waits"
sleep 600
