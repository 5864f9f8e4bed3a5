#!/usr/bin/env bash
# An operator session with nothing but mosquitto_sub and mosquitto_pub (Debian: mosquitto-clients).
#
#   SHOAL_HOST=broker.example.net SHOAL_PORT=1883 SHOAL_USER=alice SHOAL_PASSWORD=... \
#       examples/operator-session.sh GATEWAY [DEPLOYMENT]
#
# Four requests to the orchestrator's operator API (docs/topics.md, "Operator API"), each on
# its op's request channel (read ops on .../req, admin ops on .../admin):
#   1. devices.list    (req)    every gateway, its state and its nodes
#   2. devices.show    (req)    GATEWAY in detail
#   3. devices.accept  (admin)  GATEWAY, which must be pending (added with `shoal devices add
#                               GATEWAY`); the account must be an admin
#   4. deploy.status   (req)    DEPLOYMENT (skipped when none is given)
# Each reply is printed as the orchestrator sent it: a "# op" line, then one line of JSON.
# The script stops with exit status 1 at the first refusal (`"ok": false`) or missing reply.
#
# Settings, from the environment:
#   SHOAL_HOST, SHOAL_PORT        the MQTT broker (default 127.0.0.1:1883)
#   SHOAL_USER, SHOAL_PASSWORD    the operator account (`shoal serve` writes admin's secret to
#                                 DATA/admin.secret). Note that a password on the command line
#                                 is visible in `ps` to other users of this machine.
#   SHOAL_CAFILE                  a CA certificate: speak TLS and check the broker's certificate
#   SHOAL_GATEWAY, SHOAL_DEPLOYMENT   instead of the arguments
set -euo pipefail

host=${SHOAL_HOST:-127.0.0.1}
port=${SHOAL_PORT:-1883}
user=${SHOAL_USER:?set SHOAL_USER to your operator id}
password=${SHOAL_PASSWORD:?set SHOAL_PASSWORD to your operator secret}
gateway=${1:-${SHOAL_GATEWAY:-}}
deployment=${2:-${SHOAL_DEPLOYMENT:-}}
if [ -z "$gateway" ]; then
    echo "usage: $0 GATEWAY [DEPLOYMENT]   (or SHOAL_GATEWAY, SHOAL_DEPLOYMENT)" >&2
    exit 2
fi

fail() {
    echo "operator-session: $*" >&2
    exit 1
}

# Ids go into JSON as they are, so only Shoal's id characters are let through.
check_id() {  # check_id WHAT VALUE
    case $2 in
        '' | *[!a-z0-9_-]* | [-_]*)
            echo "operator-session: $1 '$2' is not an id (a-z, 0-9, - and _)" >&2
            exit 2 ;;
    esac
}
check_id "operator" "$user"
check_id "gateway" "$gateway"
[ -z "$deployment" ] || check_id "deployment" "$deployment"

connection=(-h "$host" -p "$port" -u "$user" -P "$password")
[ -z "${SHOAL_CAFILE:-}" ] || connection+=(--cafile "$SHOAL_CAFILE")

# The operator's topics: requests go to one of three channels, shoal/v1/ops/$user/CHANNEL,
# by the least role the op needs: req (viewer: read-only ops), write (deployer), admin (admin).
# The orchestrator answers on .../resp. The broker lets this account read .../resp and publish
# on the channels of its role, and nothing else: a request on another channel is dropped by
# the broker without a reply, and one on the wrong channel for its op is refused by the
# orchestrator ("devices.accept must be sent on shoal/v1/ops/alice/admin, ...").
reply_topic="shoal/v1/ops/$user/resp"

# One reader for the whole session: mosquitto_sub, subscribed to our reply topic with QoS 1,
# printing each reply on a line of its own into a pipe that this script reads (descriptor 3).
# It runs until the script ends, so there is one subscription, made once, before any request.
work=$(mktemp -d)
reader=
cleanup() {
    if [ -n "$reader" ]; then kill "$reader" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
mkfifo "$work/replies"
mosquitto_sub "${connection[@]}" -q 1 -t "$reply_topic" > "$work/replies" &
reader=$!
exec 3< "$work/replies"

# next_line SECONDS: the next whole line from the reader into $line. Exit status 0, or over
# 128 when none came in time (what arrived of an unfinished line is kept for the next call),
# or 1 when the reader has stopped (it could not log in: its error is above).
line=
unfinished=
next_line() {
    local chunk status=0
    IFS= read -r -t "$1" chunk <&3 || status=$?
    if [ "$status" -eq 0 ]; then
        line=$unfinished$chunk
        unfinished=
        return 0
    fi
    unfinished=$unfinished$chunk
    return "$status"
}

session="$user-$$-$RANDOM"
sequence=0

# request CHANNEL OP [ARGS_JSON] [REPEAT]: send one request on shoal/v1/ops/$user/CHANNEL,
# print its reply, stop unless "ok": true. With REPEAT the request is sent again every second
# until its reply comes: for the first request only, which must be one that changes nothing
# (see below).
request() {
    local channel=$1 op=$2 args=${3:-} repeat=${4:-}
    local request_topic="shoal/v1/ops/$user/$channel"
    sequence=$((sequence + 1))
    # The request id comes back in the reply: it tells our reply from any other on the topic
    # (a reply to an earlier repeat, or to another session of the same operator).
    local id="$session-$sequence"
    local body="{\"id\": \"$id\", \"op\": \"$op\"${args:+, \"args\": $args}}"
    local deadline=$((SECONDS + 10)) reply= status wait
    # QoS 1: mosquitto_pub returns once the broker has the request.
    mosquitto_pub "${connection[@]}" -q 1 -t "$request_topic" -m "$body"
    while [ -z "$reply" ]; do
        wait=$((deadline - SECONDS))
        if [ "$wait" -le 0 ]; then
            [ "$channel" = req ] || echo "operator-session: the broker drops requests on" \
                "$request_topic unless $user's role may use $op" >&2
            fail "no reply to $op (request $id) within 10 s"
        fi
        if [ -n "$repeat" ] && [ "$wait" -gt 1 ]; then wait=1; fi
        status=0
        next_line "$wait" || status=$?
        if [ "$status" -eq 0 ]; then
            case $line in *"\"id\": \"$id\""*) reply=$line ;; esac
        elif [ "$status" -le 128 ]; then
            fail "the reply reader stopped"
        elif [ -n "$repeat" ]; then
            mosquitto_pub "${connection[@]}" -q 1 -t "$request_topic" -m "$body"
        fi
    done
    echo "# $op"
    echo "$reply"
    # Replies are {"id": ..., "ok": true, "result": ...} or {"id": ..., "ok": false, "error": ...}.
    case $reply in
        *'"ok": true'*) ;;
        *) fail "$op was refused" ;;
    esac
}

# 1. Every gateway: id, state (pending, accepted, decommissioned), online, and its nodes.
#    mosquitto_sub says nothing when its subscription is in place, so a reply to a request
#    sent too early would pass unseen. This request changes nothing, so it is simply repeated
#    until its reply arrives; from then on the reader is known to be listening, and each
#    later request is sent once. (No pause of a guessed length anywhere.)
request req devices.list "" repeat

# 2. One gateway: its nodes, what each runs, their deployments, commands not yet acknowledged.
request req devices.show "{\"id\": \"$gateway\"}"

# 3. Accept it: from now on it may be sent work (a pending gateway may only report).
#    An admin op, so it goes on the admin channel.
request admin devices.accept "{\"id\": \"$gateway\"}"

# 4. A deployment: each node's state, bytes over MQTT and serial, and its latest events.
if [ -n "$deployment" ]; then
    request req deploy.status "{\"id\": \"$deployment\"}"
fi
