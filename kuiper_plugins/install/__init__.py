"""The install pipeline: fetch, inspect, decide, stage, run install.sh, swap."""
