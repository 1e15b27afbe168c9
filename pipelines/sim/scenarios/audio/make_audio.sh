#!/usr/bin/env bash
# Regenerates the scenario suite's caller and engine audio (committed, so runs need no espeak-ng/sox).
# Needs: apt-get install -y espeak-ng sox   (made with espeak-ng 1.51, sox 14.4.2, Debian 12)
#
# The caller speaks with a different espeak-ng voice (en-us+f3, a female variant) than the holding
# clips in configs/clips/ (en-us, male), so that what the caller hears back can be told from a clip by
# cross-correlation. The engine's own scripted lines (answer, bot_mm_hm) use a third voice (en-us+m3).
# Each file: speech trimmed of espeak's silence (below 0.1%), 100 ms of digital silence padded each
# side, normalised to -3 dBFS peak, mono PCM16, at 8 kHz (Exotel, Twilio) and 16 kHz (browser).
#
# cough_*.wav is synthetic, not a recording: a 0.3 s pink-noise burst, band-passed around 1 kHz,
# with a 5 ms attack and a decay over the rest (a plausible cough's envelope and spectrum).
# Noise bursts are generated at run time (pipelines/sim/scenarios/__init__.py), not stored.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say() {  # NAME VOICE TEXT [WPM [TEMPO]]
    espeak-ng -v "$2" -s "${4:-160}" -w "$tmp/$1.wav" "$3"
    for rate in 8000 16000; do
        sox -R "$tmp/$1.wav" -r "$rate" -c 1 -b 16 -e signed-integer "${1}_$((rate / 1000))k.wav" \
            silence 1 0.01 0.1% reverse silence 1 0.01 0.1% reverse tempo -s "${5:-1}" rate -v "$rate" \
            norm -3 pad 0.1 0.1
    done
}

caller=en-us+f3
say question "$caller" "Could you tell me where my order is?"
say question_long "$caller" "I ordered a pair of running shoes last week, and I would like to know when they will arrive."
say interruption "$caller" "Wait, stop, I have a different question."
say account_first "$caller" "My account number is"
say account_second "$caller" "four five six, seven eight nine."
# Backchannels as people say them, quickly: 200 wpm, then sped up (sox tempo) to about 0.25 s of sound.
say uh_huh "$caller" "uh-huh" 200 1.7
say okay "$caller" "okay" 200 2.0
say mm_hm "$caller" "[[m@'hm]]" 200 2.0  # espeak phonemes: "mm-hm" spelled out is three syllables long

bot=en-us+m3
say answer "$bot" "Sure, I can help you with that. Your shoes are on their way."
say bot_mm_hm "$bot" "[[m@'hm]]" 200 2.0

for rate in 8000 16000; do
    sox -R -n -r "$rate" -c 1 -b 16 -e signed-integer "cough_$((rate / 1000))k.wav" \
        synth 0.3 pinknoise sinc 400-2500 fade q 0.005 0.3 0.25 norm -6 pad 0.1 0.1
done

# What each file holds: length, and how much of it Silero (processors/silero.py, threshold 0.5)
# scores as speech; backchannels should stay well under the 0.4 s a caller needs to take the floor.
cd ../../..
python - <<'PY'
import glob, os
import numpy as np
from pipelines.audio import read_wav
from processors.silero import CallState, silero_session

for path in sorted(glob.glob("pipelines/sim/scenarios/audio/*_16k.wav")):
    pcm = read_wav(path, 16000).astype(np.float32) / 32768
    state = CallState()
    state.session = silero_session()
    probs = [float(state(pcm[i:i + 512], 16000)[0, 0]) for i in range(0, len(pcm) - 511, 512)]
    voiced = sum(p >= 0.5 for p in probs) * 512 / 16000
    print(f"{os.path.basename(path):<26} {len(pcm) / 16000:5.2f} s, Silero voiced {voiced:4.2f} s")
PY
