#!/usr/bin/env bash
# Installs every recorded voice the synthetic corpus can use (Debian/Ubuntu, as root), and irstlm for n-gram LMs:
#   flite (slt, rms, awb, kal16), festival diphone/HTS voices (kal, ked, slt, rab, don), festival's MBROLA voices
#   us1/us2/us3/en1 and SVOX pico (en-US, en-GB). MBROLA and pico live in Debian contrib/non-free, which this
#   enables next to main. espeak-ng needs nothing from apt: it comes from the espeakng-loader wheel.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "setup_voices.sh: run as root (apt-get), e.g. sudo bash scripts/setup_voices.sh" >&2
  exit 2
fi
sources=/etc/apt/sources.list.d/debian.sources
extra=/etc/apt/sources.list.d/debian-contrib-nonfree.sources
if [ -f "$sources" ] && [ ! -f "$extra" ]; then
  sed -e 's/^Components: main$/Components: contrib non-free/' "$sources" > "$extra"
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts festvox-rablpc16k festvox-don \
  festvox-us1 festvox-us2 festvox-us3 festvox-en1 mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 \
  libttspico-utils irstlm >/dev/null
echo "voices installed: flite $(flite -lv | sed 's/Voices available: //'), festival $(ls /usr/share/festival/voices/*/ | tr '\n' ' '), pico $(ls /usr/share/pico/lang | grep -c _sg.bin) voices"
