#!/usr/bin/env python3
"""A multilingual speech corpus made offline with espeak-ng, as fairseq manifests.

For each language: sentences of real words drawn from the `wordfreq` frequency lists, spoken by
espeak-ng with several voice variants, speeds and pitches, resampled to 16 kHz 16-bit FLAC with
sox, labelled with espeak-ng's own IPA phonemes (stress marks stripped; `|` between words) and
the words themselves. Splits train/dev/test get disjoint sentences. Everything follows from the
seed, so the same command rebuilds the same corpus (given the same espeak-ng and wordfreq).

    apt-get install espeak-ng sox && pip install wordfreq
    python3 tools/make_corpus.py --out tests/fixtures/corpus --train 16 --dev 4 --test 4   # committed
    python3 tools/make_corpus.py --out corpus --train 2000 --dev 200 --test 200            # for real runs

Writes OUT/<lang>/{train,dev,test}.{tsv,wrd,phn}, OUT/<lang>/audio/*.flac and OUT/VERSIONS.json.
The .tsv root line is OUT/<lang> as given (relative paths resolve from where the engine runs).
"""
import argparse
import json
import os
import random
import subprocess
import tempfile

import wordfreq

# espeak-ng voice per language (the eight).
LANGUAGES = {"en": "en-us", "nl": "nl", "es": "es", "it": "it", "ru": "ru", "sv": "sv", "tr": "tr", "fr": "fr-fr"}
VARIANTS = ["", "+m1", "+m3", "+f2", "+f4", "+m7"]
STRESS = str.maketrans("", "", "ˈˌ")


def words_for(lang, n=3000):
    """Frequent words of the language, alphabetic only (no numbers, no punctuation)."""
    return [w for w in wordfreq.top_n_list(lang, n) if w.isalpha() and len(w) > 1]


def phonemes(voice, text):
    out = subprocess.run(["espeak-ng", "-v", voice, "-q", "--ipa", "--sep= ", text], capture_output=True, text=True, check=True).stdout
    words = []
    for line in out.splitlines():
        words += [w.translate(STRESS).split() for w in line.strip().split("  ") if w.strip()]
    return " | ".join(" ".join(w) for w in words if w)


def synthesize(voice, speed, pitch, text, flac):
    """espeak-ng to a 16 kHz 16-bit FLAC; sox -D: no dither, so the same text gives the same samples
    (with sox's default TPDF dither, rebuilt corpora differed by +-1 LSB)."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", wav.name, text], check=True)
        subprocess.run(["sox", "-D", wav.name, "-r", "16000", "-b", "16", "-c", "1", flac, "gain", "-1"], check=True, capture_output=True)
    info = subprocess.run(["soxi", "-s", flac], capture_output=True, text=True, check=True)
    return int(info.stdout.strip())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--languages", default=",".join(LANGUAGES))
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--dev", type=int, default=4)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--min-words", type=int, default=2)
    ap.add_argument("--max-words", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    versions = {
        "espeak-ng": subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip(),
        "sox": subprocess.run(["sox", "--version"], capture_output=True, text=True).stdout.strip(),
        "wordfreq": getattr(wordfreq, "__version__", "unknown"),
        "args": vars(args),
    }
    for lang in args.languages.split(","):
        voice = LANGUAGES[lang]
        rng = random.Random(f"{args.seed}-{lang}")
        vocab = words_for(lang)
        d = os.path.join(args.out, lang)
        os.makedirs(os.path.join(d, "audio"), exist_ok=True)
        seen = set()
        for split in ("train", "dev", "test"):
            rows, wrd, phn = [], [], []
            for i in range(getattr(args, split)):
                while True:  # disjoint sentences across splits
                    text = " ".join(rng.choice(vocab) for _ in range(rng.randint(args.min_words, args.max_words)))
                    if text not in seen:
                        seen.add(text)
                        break
                variant = rng.choice(VARIANTS)
                speed, pitch = rng.randint(130, 190), rng.randint(30, 70)
                uid = f"{lang}_{split}_{i:05d}"
                n = synthesize(voice + variant, speed, pitch, text, os.path.join(d, "audio", uid + ".flac"))
                rows.append(f"audio/{uid}.flac\t{n}")
                wrd.append(text)
                phn.append(phonemes(voice, text))
            with open(os.path.join(d, f"{split}.tsv"), "w") as f:
                f.write(d + "\n" + "".join(r + "\n" for r in rows))
            for ext, lines in (("wrd", wrd), ("phn", phn)):
                with open(os.path.join(d, f"{split}.{ext}"), "w") as f:
                    f.write("".join(line + "\n" for line in lines))
        print(lang, "done")
    with open(os.path.join(args.out, "VERSIONS.json"), "w") as f:
        json.dump(versions, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
