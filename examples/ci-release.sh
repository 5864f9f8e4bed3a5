#!/usr/bin/env bash
# What a CI job runs for a firmware release: build, sign, delta, upload, start a rollout.
#
#   examples/ci-release.sh OLD.bin NEW.bin VERSION SEQUENCE
#
# Environment:
#   SHOAL_RELEASE_KEY   the release private key (never on the orchestrator)
#   DEVICE_TYPE         e.g. nrf52840
#   OLD_VERSION         the version the fleet runs now (default 1.0.0)
#   ROLLOUT_TARGET      --group NAME, --filter EXPR or --nodes GW/NODE,... (default: --filter device_type=$DEVICE_TYPE)
#   ROLLOUT_PHASES      default 1,10%,100%
#   SHOAL_HOST, SHOAL_PORT, SHOAL_USER, SHOAL_PASSWORD or SHOAL_PASSWORD_FILE: a deployer account
#   SHOAL (optional)    the shoal command (default: shoal)
set -euo pipefail

if [ $# -ne 4 ]; then
    echo "usage: $0 OLD.bin NEW.bin VERSION SEQUENCE" >&2
    exit 2
fi
old_image=$1 new_image=$2 version=$3 sequence=$4
shoal=${SHOAL:-shoal}
: "${SHOAL_RELEASE_KEY:?set SHOAL_RELEASE_KEY to the release private key}"
: "${DEVICE_TYPE:?set DEVICE_TYPE}"
old_version=${OLD_VERSION:-1.0.0}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Progress goes to stderr; stdout carries only the rollout, as JSON, for the CI to keep.
exec 3>&1 1>&2

# 1. Sign the new image (and the one the fleet runs, to make the delta from).
$shoal artifact build "$old_image" --version "$old_version" --seq "$((sequence - 1))" \
    --device-type "$DEVICE_TYPE" --key "$SHOAL_RELEASE_KEY" -o "$out/old.art"
$shoal artifact build "$new_image" --version "$version" --seq "$sequence" \
    --device-type "$DEVICE_TYPE" --key "$SHOAL_RELEASE_KEY" -o "$out/new.art" \
    --meta "ci_commit=${CI_COMMIT_SHA:-local}"

# 2. The delta (the tool falls back to the full artifact when a delta is not worth it).
$shoal artifact delta "$out/old.art" "$out/new.art" --key "$SHOAL_RELEASE_KEY" -o "$out/delta.art"

# 3. Upload both: the orchestrator verifies them and picks, per node, the delta
#    when the node runs its base, else the full artifact.
$shoal artifact upload "$out/new.art" --json > "$out/uploaded.json"
$shoal artifact upload "$out/delta.art" --json > /dev/null

# 4. Start the rollout of the new image, phase by phase, stopping itself on failures.
image=$($shoal artifact inspect "$out/new.art" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["image_sha256"])')
# shellcheck disable=SC2086 # ROLLOUT_TARGET is a list of options on purpose
$shoal rollout create --artifact "$image" ${ROLLOUT_TARGET:---filter device_type=$DEVICE_TYPE} \
    --phases "${ROLLOUT_PHASES:-1,10%,100%}" --failure-threshold 10 --min-failures 1 \
    --on-failure pause --json >&3
