#!/bin/sh
# A "plugin" that fails at once, as one missing its configuration does.
echo "quitter: reading settings"
echo "quitter: no settings found, giving up" >&2
exit 3
