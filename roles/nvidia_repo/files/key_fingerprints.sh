#!/bin/sh
# Print the fingerprint of every primary key in an OpenPGP keyring, one a line
# (subkeys are not listed). A throwaway GnuPG home leaves nothing behind.
set -eu
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
gpg --homedir "$home" --batch --quiet --no-autostart --with-colons --show-keys "$1" |
  awk -F: '$1 == "pub" { primary = 1; next }
           $1 == "fpr" { if (primary) print $10; primary = 0; next }
           { primary = 0 }'
