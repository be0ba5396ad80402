#!/bin/sh
# A "plugin" that is killed by a signal before any handshake, as one the kernel's OOM killer takes.
echo "crasher: about to be killed"
kill -KILL $$
