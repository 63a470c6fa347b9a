#!/bin/sh
# Print the fingerprint of every primary key in an OpenPGP key file (armored or binary
# keyring), one a line; subkeys are not listed. A missing or empty file prints nothing. A
# throwaway GnuPG home leaves nothing behind. The one copy: role common, tasks/signed_repo.yml.
set -eu
[ -s "$1" ] || exit 0
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
gpg --homedir "$home" --batch --quiet --no-autostart --with-colons --show-keys "$1" |
  awk -F: '$1 == "pub" { primary = 1; next }
           $1 == "fpr" { if (primary) print $10; primary = 0; next }
           { primary = 0 }'
