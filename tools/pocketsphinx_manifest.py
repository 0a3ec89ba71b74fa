#!/usr/bin/env python3
"""Ten real recorded English utterances as a tiny test set: Debian's pocketsphinx-testdata
(5 LibriVox read-speech clips from "Sense and Sensibility", 5 "cards" commands, all 16 kHz WAV)
converted to a fairseq manifest with .wrd (upper case) and .ltr labels.

    apt-get install pocketsphinx-testdata
    python3 tools/pocketsphinx_manifest.py --out pocketsphinx     # then: engine eval --data pocketsphinx/test.tsv
"""
import argparse
import os
import re
import wave

DATA = "/usr/share/pocketsphinx/test/data"
SETS = [("librivox", "transcription"), ("cards", "cards.transcription")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=DATA)
    args = ap.parse_args()
    rows, words = [], []
    for folder, trans in SETS:
        for line in open(os.path.join(args.data, folder, trans)):
            m = re.match(r"\s*<s>(.*)</s>\s*\((.+)\)\s*$", line)
            if not m:
                continue
            text, uid = " ".join(m.group(1).split()).upper(), m.group(2).strip()
            wav = os.path.join(args.data, folder, uid + ".wav")
            with wave.open(wav) as w:
                assert w.getframerate() == 16000, wav
                rows.append(f"{folder}/{uid}.wav\t{w.getnframes()}")
            words.append(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "test.tsv"), "w") as f:
        f.write(args.data + "\n" + "".join(r + "\n" for r in rows))
    with open(os.path.join(args.out, "test.wrd"), "w") as f:
        f.write("".join(w + "\n" for w in words))
    with open(os.path.join(args.out, "test.ltr"), "w") as f:
        f.write("".join(" ".join(w.replace(" ", "|")) + " |\n" for w in words))
    print(f"{len(rows)} utterances -> {args.out}/test.tsv")


if __name__ == "__main__":
    main()
