#!/usr/bin/env python3
"""Builds the parity fixtures under tests/fixtures/ with PyTorch + transformers.

Tiny random Wav2Vec2ForCTC models in two architectures (post-LN with group norm = "base-like",
pre-LN "stable layer norm" with layer norm in every conv = "large-like"), non-default sizes,
16-bit WAV inputs of odd lengths, and transformers' outputs for every utterance run alone:
logits plus intermediates (feature-encoder output, each encoder layer's output, encoder output).

    pip install torch transformers safetensors numpy soundfile jiwer
    python3 tools/make_fixtures.py            # rewrites tests/fixtures/

Everything is seeded; VERSIONS.json records the library versions that produced the files.
"""
import json
import os
import shutil
import sys
import wave

import jiwer
import numpy as np
import safetensors.torch
import soundfile
import torch
import transformers
from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC, Wav2Vec2ForPreTraining

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

MODELS = {
    # post-LN, group norm in conv 0, no conv bias, even pos-conv kernel, blank at 0.
    "base-like": dict(
        conv_dim=(16, 24, 24, 20), conv_kernel=(10, 3, 3, 2), conv_stride=(5, 2, 2, 2), conv_bias=False,
        feat_extract_norm="group", do_stable_layer_norm=False, hidden_size=36, num_hidden_layers=2,
        num_attention_heads=3, intermediate_size=50, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, vocab_size=12, pad_token_id=0, layer_norm_eps=1e-5,
        do_normalize=False,
        vocab=["<pad>", "<s>", "</s>", "<unk>", "|", "A", "B", "C", "D", "E", "F", "G"],
    ),
    # pre-LN, layer norm in every conv, conv bias, odd pos-conv kernel, blank not at 0.
    "large-like": dict(
        conv_dim=(20, 20, 28), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), conv_bias=True,
        feat_extract_norm="layer", do_stable_layer_norm=True, hidden_size=40, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=72, num_conv_pos_embeddings=7,
        num_conv_pos_embedding_groups=2, vocab_size=9, pad_token_id=2, layer_norm_eps=1e-6,
        do_normalize=True,
        vocab=["a", "b", "<pad>", "|", "c", "d", "<unk>", "e", "f"],
    ),
}

# Odd lengths in samples (16 kHz); the shortest is near the receptive field.
UTTERANCE_SAMPLES = [3203, 1601, 4799]


def record_versions(tool):
    """Adds the torch and transformers versions `tool` (a script that adds fixtures) ran with to
    VERSIONS.json."""
    path = os.path.join(ROOT, "VERSIONS.json")
    with open(path) as f:
        versions = json.load(f)
    versions[tool] = {"torch": torch.__version__, "transformers": transformers.__version__}
    with open(path, "w") as f:
        json.dump(versions, f, indent=1)


def write_wav(path, samples_i16, rate=16000):
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples_i16.astype("<i2").tobytes())


def make_audio(rng):
    """Speech-like test signals: a few harmonics with vibrato plus noise, as int16."""
    out = []
    for n in UTTERANCE_SAMPLES:
        t = np.arange(n) / 16000.0
        f0 = rng.uniform(90, 220)
        x = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6)) / h for h in range(1, 6))
        x = x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)) + 0.1 * rng.standard_normal(n)
        out.append(np.round(x / np.abs(x).max() * 12000).astype(np.int16))
    return out


def perturb(model, seed):
    """Random values for every parameter, layer norms included (defaults would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            if name.endswith("original0") or name.endswith("weight_g"):
                p.copy_(p.abs() * (1 + 0.2 * noise.abs()))  # weight-norm magnitudes stay positive
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + noise)
            else:
                p.copy_(p + noise * p.std().clamp(min=0.05))


def reference_outputs(model, cfg, audio):
    """transformers' outputs for each utterance alone, with hooks on the intermediates."""
    captured = {}
    encoder = model.base_model  # model.wav2vec2, or model.hubert
    hooks = [encoder.feature_extractor.register_forward_hook(
        lambda m, i, o: captured.__setitem__("conv_features", o[0].transpose(0, 1)))]
    for j, layer in enumerate(encoder.encoder.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, j=j: captured.__setitem__(f"layer{j}", (o[0] if isinstance(o, tuple) else o)[0])))
    out = {}
    for u, samples in enumerate(audio):
        x = torch.from_numpy(samples.astype(np.float32) / 32768.0)
        if cfg["do_normalize"]:
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        captured.clear()
        with torch.no_grad():
            res = model(x[None], output_hidden_states=False)
            enc = encoder(x[None]).last_hidden_state[0]
        out[f"utt{u}.logits"] = res.logits[0]
        out[f"utt{u}.encoder_out"] = enc
        for k, v in captured.items():
            out[f"utt{u}.{k}"] = v
    for h in hooks:
        h.remove()
    return {k: v.float().clone().contiguous() for k, v in out.items()}


def swap_weight_norm_spelling(path):
    """Rewrites a model.safetensors with the other weight-norm key spelling."""
    tensors = safetensors.torch.load_file(path)
    renames = {
        "parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v",
        "weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1",
    }
    out = {}
    for k, v in tensors.items():
        for old, new in renames.items():
            if k.endswith(old):
                k = k[: -len(old)] + new
                break
        out[k] = v
    safetensors.torch.save_file(out, path, metadata={"format": "pt"})
    return sorted(k for k in out if "pos_conv" in k)


def build(name, spec, audio, seed, classes=(Wav2Vec2Config, Wav2Vec2ForCTC)):
    config_class, model_class = classes
    spec = dict(spec)
    vocab = spec.pop("vocab")
    do_normalize = spec.pop("do_normalize")
    cfg = config_class(**spec, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                         feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
    # Random models put many frames near an argmax tie, where a 1e-6 rounding difference flips the
    # greedy transcript. Spread the logits (scaled head) and take the first seed whose top-2
    # margin is at least 2e-3 on every frame, so transcripts are a fair comparison.
    for attempt in range(200):
        torch.manual_seed(seed + 1000 * attempt)
        model = model_class(cfg).eval()
        perturb(model, seed + 1000 * attempt)
        with torch.no_grad():
            model.lm_head.weight.mul_(30.0)
            model.lm_head.bias.mul_(30.0)
        probe = reference_outputs(model, {"do_normalize": do_normalize}, audio)
        margins = [torch.topk(probe[f"utt{u}.logits"], 2).values for u in range(len(audio))]
        if min((m[:, 0] - m[:, 1]).min().item() for m in margins) >= 2e-3:
            break
    else:
        raise SystemExit(f"{name}: no seed without argmax near-ties")
    folder = os.path.join(ROOT, name)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, indent=1)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"do_normalize": do_normalize, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
                   "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
                   "return_attention_mask": spec.get("feat_extract_norm", "layer") == "layer", "sampling_rate": 16000}, f, indent=1)
    ref = reference_outputs(model, {"do_normalize": do_normalize}, audio)
    safetensors.torch.save_file(ref, os.path.join(folder, "reference.safetensors"))
    # Greedy transcripts as transformers' own CTC tokenizer writes them (default decode: special
    # tokens kept; skip_special_tokens=True would drop them *before* collapsing repeats, merging
    # letters a blank separated).
    tok = Wav2Vec2CTCTokenizer(os.path.join(folder, "vocab.json"), pad_token=vocab[spec["pad_token_id"]],
                               unk_token="<unk>", word_delimiter_token="|")
    ids = [ref[f"utt{u}.logits"].argmax(-1).tolist() for u in range(len(audio))]
    with open(os.path.join(folder, "transcripts.json"), "w") as f:
        json.dump(tok.batch_decode(ids), f, indent=1, ensure_ascii=False)
    return model, folder


# Transcripts of the three utterances in base-like's alphabet (A-G, | between words).
TRANSCRIPTS = ["BAD CAFE", "DEAF", "FACE A BEE"]


def greedy_text(logits, vocab):
    """Greedy CTC text as the engine defines it: argmax, collapse repeats, drop blank and special
    tokens, | as the word delimiter, spaces tidied."""
    ids = logits.argmax(-1).tolist()
    out, prev = [], None
    for i in ids:
        if i != prev:
            tok = vocab[i]
            if i != MODELS["base-like"]["pad_token_id"] and not (tok.startswith("<") and tok.endswith(">")):
                out.append(" " if tok == "|" else tok)
        prev = i
    return " ".join("".join(out).split())


def make_datasets(audio):
    """The three utterances in every dataset layout the engine reads, plus what `engine eval`
    must report for base-like on them (loss from torch's ctc_loss on transformers' logits, error
    counts from jiwer)."""
    root = os.path.join(ROOT, "datasets")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    ids = [f"utt{u}" for u in range(len(audio))]
    # fairseq: root line relative to the repository root (tests run there).
    fs = os.path.join(root, "fairseq")
    os.makedirs(fs)
    with open(os.path.join(fs, "test.tsv"), "w") as f:
        f.write("tests/fixtures/audio\n")
        for i, a in zip(ids, audio):
            f.write(f"{i}.wav\t{len(a)}\n")
    with open(os.path.join(fs, "test.wrd"), "w") as f:
        f.write("".join(t + "\n" for t in TRANSCRIPTS))
    with open(os.path.join(fs, "test.ltr"), "w") as f:
        f.write("".join(" ".join(t.replace(" ", "|")) + " |\n" for t in TRANSCRIPTS))
    with open(os.path.join(fs, "test.phn"), "w") as f:
        f.write("".join(" ".join(t.replace(" ", "|")) + "\n" for t in TRANSCRIPTS))
    # LibriSpeech, and Libri-light's librispeech_finetuning layout (1h/0, 1h/1, 9h).
    def libri(folder, utts):
        os.makedirs(folder, exist_ok=True)
        spk, chap = os.path.basename(os.path.dirname(folder)), os.path.basename(folder)
        with open(os.path.join(folder, f"{spk}-{chap}.trans.txt"), "w") as f:
            for u in utts:
                uid = f"{spk}-{chap}-{u:04d}"
                soundfile.write(os.path.join(folder, uid + ".flac"), audio[u], 16000, subtype="PCM_16")
                f.write(f"{uid} {TRANSCRIPTS[u]}\n")
    libri(os.path.join(root, "librispeech", "dev-clean", "11", "22"), [0, 1, 2])
    ft = os.path.join(root, "librispeech_finetuning")
    libri(os.path.join(ft, "1h", "0", "clean", "11", "22"), [0])
    libri(os.path.join(ft, "1h", "1", "other", "33", "44"), [1])
    libri(os.path.join(ft, "9h", "clean", "55", "66"), [2])
    # CommonVoice: MP3 clips, a test.tsv whose columns are not in the usual order.
    cv = os.path.join(root, "commonvoice")
    os.makedirs(os.path.join(cv, "clips"))
    with open(os.path.join(cv, "test.tsv"), "w") as f:
        f.write("sentence\tclient_id\tup_votes\tpath\n")
        for u, a in enumerate(audio):
            soundfile.write(os.path.join(cv, "clips", f"cv_{u}.mp3"), a.astype(np.float32) / 32768.0, 16000, format="MP3")
            f.write(f"{TRANSCRIPTS[u].lower()}\tclient{u}\t2\tcv_{u}.mp3\n")
    # NeMo JSON lines, audio paths relative to the manifest.
    js = os.path.join(root, "jsonl")
    os.makedirs(js)
    with open(os.path.join(js, "test.jsonl"), "w") as f:
        for u, a in enumerate(audio):
            f.write(json.dumps({"audio_filepath": f"../../audio/utt{u}.wav", "text": TRANSCRIPTS[u].lower(), "duration": len(a) / 16000}) + "\n")

    # Expected `engine eval` numbers for base-like on these utterances.
    model = Wav2Vec2ForCTC.from_pretrained(os.path.join(ROOT, "base-like")).eval()
    vocab = MODELS["base-like"]["vocab"]
    losses, hyps = [], []
    for u, a in enumerate(audio):
        x = torch.from_numpy(a.astype(np.float32) / 32768.0)[None]
        with torch.no_grad():
            logits = model(x).logits[0]
        target = torch.tensor([vocab.index("|" if ch == " " else ch) for ch in TRANSCRIPTS[u]])
        lp = torch.log_softmax(logits, -1)[:, None]
        losses.append(torch.nn.functional.ctc_loss(lp, target[None], torch.tensor([lp.shape[0]]), torch.tensor([len(target)]),
                                                   blank=0, reduction="sum", zero_infinity=True).item())
        hyps.append(greedy_text(logits, vocab))
    w = jiwer.process_words(TRANSCRIPTS, hyps)
    c = jiwer.process_characters(TRANSCRIPTS, hyps)
    nospace = lambda ts: [t.replace(" ", "") or "" for t in ts]
    un = jiwer.process_characters(nospace(TRANSCRIPTS), nospace(hyps))
    counts = lambda o: {"sub": o.substitutions, "del": o.deletions, "ins": o.insertions, "ref_len": o.hits + o.substitutions + o.deletions}
    with open(os.path.join(root, "expected_eval.json"), "w") as f:
        json.dump({"model": "base-like", "hypotheses": hyps, "loss": sum(losses) / len(losses),
                   "wer": counts(w), "cer": counts(c), "uer": counts(un)}, f, indent=1)


def make_mask_set(audio):
    """A mask set over base-like in the s3router-masks-v1 format (random 10% of each FFN weight
    dropped, a new 9-token head and vocabulary), and transformers' logits for the masked model."""
    folder = os.path.join(ROOT, "base-like-masks")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    model = Wav2Vec2ForCTC.from_pretrained(os.path.join(ROOT, "base-like")).eval()
    g = torch.Generator().manual_seed(99)
    masks, meta = {}, {"format": "s3router-masks-v1", "sparsity": "0.1"}
    with torch.no_grad():
        for i, layer in enumerate(model.wav2vec2.encoder.layers):
            for part in ("intermediate_dense", "output_dense"):
                lin = getattr(layer.feed_forward, part)
                keep = torch.rand(lin.weight.shape, generator=g) >= 0.1
                lin.weight.mul_(keep.float())
                name = f"wav2vec2.encoder.layers.{i}.feed_forward.{part}.weight"
                masks[name] = torch.from_numpy(np.packbits(keep.numpy().reshape(-1), bitorder="little"))
                meta[f"{name}.shape"] = ",".join(map(str, lin.weight.shape))
        vocab = ["<pad>", "<s>", "</s>", "<unk>", "|", "W", "X", "Y", "Z"]
        head = torch.nn.Linear(model.config.hidden_size, len(vocab))
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 3.0)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g))
        model.lm_head = head
    safetensors.torch.save_file(masks, os.path.join(folder, "masks.safetensors"), metadata=meta)
    safetensors.torch.save_file({"lm_head.weight": head.weight.detach().contiguous(), "lm_head.bias": head.bias.detach().contiguous()},
                                os.path.join(folder, "head.safetensors"))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, indent=1)
    ref = {}
    for u, a in enumerate(audio):
        x = torch.from_numpy(a.astype(np.float32) / 32768.0)[None]
        with torch.no_grad():
            ref[f"utt{u}.logits"] = model(x).logits[0].contiguous()
    safetensors.torch.save_file(ref, os.path.join(folder, "reference.safetensors"))


def main():
    if os.path.isdir(ROOT):
        for entry in os.listdir(ROOT):
            if entry in MODELS or entry in ("audio", "base-like-f16", "base-like-bf16", "base-like-other-wn", "base-like-pretraining"):
                shutil.rmtree(os.path.join(ROOT, entry))
    os.makedirs(os.path.join(ROOT, "audio"), exist_ok=True)
    rng = np.random.default_rng(1234)
    audio = make_audio(rng)
    for u, samples in enumerate(audio):
        write_wav(os.path.join(ROOT, "audio", f"utt{u}.wav"), samples)
    # The same samples losslessly in FLAC (decoders must agree exactly with the WAV).
    soundfile.write(os.path.join(ROOT, "audio", "utt0.flac"), audio[0], 16000, subtype="PCM_16")

    spellings = {}
    for seed, (name, spec) in enumerate(MODELS.items()):
        model, folder = build(name, spec, audio, seed + 10)
        spellings[name] = sorted(k for k in safetensors.torch.load_file(
            os.path.join(folder, "model.safetensors")) if "pos_conv" in k)

    # The same base-like weights with the other weight-norm key spelling (expected outputs equal).
    other = os.path.join(ROOT, "base-like-other-wn")
    shutil.copytree(os.path.join(ROOT, "base-like"), other)
    spellings["base-like-other-wn"] = swap_weight_norm_spelling(os.path.join(other, "model.safetensors"))

    # f16- and bf16-stored weights: the reference is the f32 model run on the rounded weights.
    for suffix, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        folder = os.path.join(ROOT, f"base-like-{suffix}")
        model = Wav2Vec2ForCTC.from_pretrained(os.path.join(ROOT, "base-like")).eval()
        model.to(dtype).save_pretrained(folder)
        for extra in ("vocab.json", "preprocessor_config.json"):
            shutil.copy(os.path.join(ROOT, "base-like", extra), folder)
        model = Wav2Vec2ForCTC.from_pretrained(folder, torch_dtype=torch.float32).eval()
        ref = reference_outputs(model, {"do_normalize": MODELS["base-like"]["do_normalize"]}, audio)
        safetensors.torch.save_file(ref, os.path.join(folder, "reference.safetensors"))

    # A pretraining checkpoint (no lm_head; quantizer and projections to ignore) with the same
    # encoder weights as base-like, so base-like's encoder outputs are its reference.
    pre = os.path.join(ROOT, "base-like-pretraining")
    ctc = Wav2Vec2ForCTC.from_pretrained(os.path.join(ROOT, "base-like"))
    torch.manual_seed(0)  # the quantizer and projections the engine ignores, made reproducible
    pt = Wav2Vec2ForPreTraining(ctc.config)
    pt.wav2vec2.load_state_dict(ctc.wav2vec2.state_dict())
    pt.config.architectures = ["Wav2Vec2ForPreTraining"]
    pt.save_pretrained(pre)
    shutil.copy(os.path.join(ROOT, "base-like", "preprocessor_config.json"), pre)

    with open(os.path.join(ROOT, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "safetensors": safetensors.__version__, "numpy": np.__version__,
                   "soundfile": soundfile.__version__,
                   "python": sys.version.split()[0], "pos_conv_keys": spellings,
                   "utterance_samples": UTTERANCE_SAMPLES}, f, indent=1)
    make_datasets(audio)
    make_mask_set(audio)

    # The same tiny model serves the README's first command until a trained demo backbone exists.
    demo = os.path.join(ROOT, "..", "..", "weights", "tiny-random-wav2vec2")
    os.makedirs(demo, exist_ok=True)
    for f in ("config.json", "model.safetensors", "vocab.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(ROOT, "base-like", f), demo)
    print("fixtures written to", os.path.normpath(ROOT))


if __name__ == "__main__":
    main()
