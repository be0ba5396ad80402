#!/bin/sh
# A "plugin" whose output is not text: control bytes and invalid UTF-8, then a last line, then failure.
head -c 300000 /dev/urandom
printf '\n\033[31mnoisy: the last line\033[0m\n'
exit 1
