#!/bin/sh
# A "plugin" that prints far more than an error message should quote, then fails.
seq 1 200000
exit 1
