"""Speech that can be made offline: the multi-voice demo corpus (`corpus`), its sentences (`sentences`) and an
in-process espeak-ng driver (`espeak`)."""
