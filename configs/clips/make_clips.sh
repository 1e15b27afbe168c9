#!/usr/bin/env bash
# Regenerates the holding-message and call-action clips (committed, so CI needs no espeak-ng/sox).
# Needs: apt-get install -y espeak-ng sox   (made with espeak-ng 1.51, sox 14.4.2, Debian 12)
# Holding clips must sound at once: speech starts within 10 ms of sample 0 and ends with at most 20 ms
# of silence. Output: mono PCM16, 24 kHz (PersonaPlex's own rate), about -3 dBFS peak.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

make() {  # NAME TEXT
    espeak-ng -v en-us -s 160 -w "$tmp/$1.wav" "$2"
    # trim leading/trailing silence below 1% (-40 dBFS), each cut edge faded over 3 ms so it does not click
    # (the trailing one while reversed); resample, normalise, pad 20 ms of silence at the end only.
    # -R: repeatable dither, so rerunning the script reproduces the committed bytes
    sox -R "$tmp/$1.wav" -r 24000 -c 1 -b 16 -e signed-integer "$1.wav" \
        silence 1 0.005 1% fade t 0.003 reverse silence 1 0.005 1% fade t 0.003 reverse \
        rate -v 24000 norm -3 pad 0 0.02
}

make greeting "Hello, thanks for calling. Please hold on a moment while I connect you."
make one_moment "One moment, please."
make apology "Sorry, we are having technical trouble right now. Please call again later. Goodbye."
# call actions (processors/call_actions.py)
make goodbye "Thank you for calling. Goodbye."
make transferring "Please hold while I transfer you to a colleague."
make still_there "Are you still there?"
make wrapping_up "We are almost out of time for this call."
