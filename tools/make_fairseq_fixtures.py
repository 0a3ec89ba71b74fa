#!/usr/bin/env python3
"""fairseq wav2vec 2.0 checkpoints for `engine convert` (tests/fixtures/fairseq/), written the way
fairseq writes them, and what fairseq's own modules compute from them.

S3-Router is a fairseq fork: the checkpoints the paper starts from (`wav2vec_small.pt`,
`xlsr2_300m.pt`) and the ones its training writes are fairseq `.pt` files. The engine converts
them into Hugging Face folders; these fixtures hold tiny random models of each kind and their
outputs under fairseq 0.12.2, the version those recipes pin:

- `pretrained-base.pt`: `Wav2Vec2Model` with the base architecture (group norm, post-LN, no conv
  bias, a quantizer the conversion drops), saved as fairseq's `Trainer.state_dict()` saves it:
  `cfg` as a plain dict, Adam state, meters; PyTorch's zip format.
- `pretrained-large-legacy.pt`: the large architecture (layer norm in every conv, pre-LN, conv
  bias) with the configuration in an `argparse.Namespace` under `args` and no `cfg`, in PyTorch's
  format before 1.6 (`_use_new_zipfile_serialization=False`), as checkpoints from 2020 are.
- `finetuned-ctc.pt` + `dict.ltr.txt`: `Wav2VecCtc` (prefix `w2v_encoder.w2v_model.`, head
  `w2v_encoder.proj`) over pretrained-base; its `cfg` holds pretrained-base's under `w2v_args`,
  and names tests/fixtures/fairseq as its data folder (where dict.ltr.txt is).
- `s3router-ctc.pt`: the finetuned model as S3-Router's `wav2vec_ctc_st` stores it: a `scores`
  tensor beside each q/k/v/out and fc1/fc2 weight, `prune_rate` 0.9 (fraction kept) and
  `fix_attn` true (attention unmasked), as its README runs it.
- `s3router-p.pt`: the same with `prune_rate` 0.3 and `fix_attn` false (S3-Router-P).
- `pretrained-hubert.pt`: `HubertModel` (base architecture; label embeddings and a target
  projection the conversion drops).
- `pretrained-data2vec.pt`: data2vec's `Data2VecAudioModel` (layer norm in every conv, conv bias,
  three positional convs of even kernel 4, normalised audio) with its EMA teacher under `_ema`.
- `s3router-data2vec.pt`: S3-Router over it, as its data2vec recipe runs (`wav2vec_ctc_st` whose
  `w2v_args` name `data2vec_audio`; prune_rate 0.9, fix_attn).

`reference.safetensors` holds, per checkpoint and utterance (tests/fixtures/audio), fairseq's
encoder output (`extract_features`) or CTC logits, the S3-Router ones with each masked weight
multiplied by the mask `GetSubnet` makes from its scores (S3-Router's `operation_st.py`: of the
|scores| sorted, the `int((1 - prune_rate) * numel)` smallest are dropped).

The weights and references are the same on every run; the `.pt` files are not quite (the
legacy format names storages by memory address, the trainer's stopwatch holds real time).

fairseq 0.12.2 needs Python 3.10 or older (its dataclasses fail on 3.11):

    python3.10 -m venv /tmp/fs310
    /tmp/fs310/bin/pip install torch fairseq==0.12.2 safetensors 'numpy<2'
    /tmp/fs310/bin/python tools/make_fairseq_fixtures.py
"""
import argparse
import json
import os
import shutil
import wave

import fairseq
import numpy as np
import safetensors.torch
import torch
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from fairseq.models.wav2vec.wav2vec2_asr import Wav2VecCtc, Wav2VecEncoder
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from fairseq.data import Dictionary
from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig, Data2VecAudioModel
from fairseq.logging.meters import AverageMeter, StopwatchMeter
from omegaconf import OmegaConf

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "fairseq")

# Tiny versions of the two published architectures.
SMALL = dict(
    encoder_layers=2,
    encoder_embed_dim=48,
    encoder_ffn_embed_dim=80,
    encoder_attention_heads=4,
    conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 2 + [(32,2,2)]",
    conv_pos=8,
    conv_pos_groups=4,
)
BASE = dict(SMALL, extractor_mode="default", layer_norm_first=False, conv_bias=False, quantize_targets=True, latent_vars=8, final_dim=16)
LARGE = dict(SMALL, extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True, final_dim=16)
DATA2VEC = dict(SMALL, extractor_mode="layer_norm", conv_bias=True, pos_conv_depth=3, conv_pos=12, max_update=10)
SYMBOLS = ["|", "E", "T", "A", "O", "N", "I", "'"]


def utterances():
    out = []
    for u in range(3):
        with wave.open(os.path.join(FIXTURES, "audio", f"utt{u}.wav")) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        out.append(torch.tensor(pcm.astype(np.float32) / 32768.0))
    return out


def normalized(x):
    """transformers' Wav2Vec2FeatureExtractor normalisation, which the converted folders ask for
    when the checkpoint's task normalised (fairseq uses a layer norm with eps 1e-5 there)."""
    return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)


def perturb(model, gen):
    """Moves every parameter off its initial value (norm gains off 1, biases off 0), so a tensor
    mapped to the wrong place cannot go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("weight_g"):
                p.mul_(1.0 + 0.1 * noise.abs())
            elif p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.add_(0.05 * noise)


def pretrained(arch, gen):
    model = Wav2Vec2Model(Wav2Vec2Config(**arch)).eval()
    perturb(model, gen)
    return model


def full_cfg(model_cfg, normalize, config=Wav2Vec2Config, name="wav2vec2"):
    """A training run's whole configuration, as `fairseq-hydra-train` holds it."""
    cfg = convert_namespace_to_omegaconf(argparse.Namespace(task="audio_pretraining", arch="wav2vec2", data="/data", normalize=normalize))
    cfg.model = OmegaConf.merge(OmegaConf.structured(config), model_cfg)
    cfg.model._name = name
    cfg.task.normalize = normalize
    return cfg


def trainer_state(cfg, model):
    """`fairseq.trainer.Trainer.state_dict()` of a run with Adam after one update (`model`'s
    weights are put back after it)."""
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5, betas=(0.9, 0.98), eps=1e-8)
    loss = sum((p * p).sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.load_state_dict(weights)
    meter, clock = AverageMeter(), StopwatchMeter()
    meter.update(3.5)
    clock.start()
    clock.stop()
    return {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if OmegaConf.is_config(cfg) else cfg,
        "model": weights,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "CtcCriterion", "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": 1.5}, "num_updates": 1}],
        "task_state": {},
        "extra_state": {"metrics": {"train": {"loss": meter.state_dict()}}, "previous_training_time": 1.25, "train_meters": {"wall": clock}},
        "last_optimizer_state": optimizer.state_dict(),
    }


def plain_state(cfg, model):
    """A checkpoint saved without optimiser state (`checkpoint.no_save_optimizer_state`)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return {"args": None, "cfg": container, "model": model.state_dict(), "optimizer_history": [], "extra_state": {}}


def ctc_run(base_cfg, normalize=False, data="/data"):
    """The configuration of a finetuning run over the model `base_cfg` describes, as
    `fairseq-hydra-train` holds it: the pretraining run's under `model.w2v_args`; its data
    folder `data` (where fairseq finds dict.ltr.txt)."""
    args = argparse.Namespace(task="audio_finetuning", arch="wav2vec_ctc", data=data, w2v_path="unused.pt", labels="ltr", normalize=normalize)
    run = convert_namespace_to_omegaconf(args)
    run.model.w2v_args = base_cfg
    return run


def ctc_model(base_model, cfg, classes, gen):
    """`Wav2VecCtc` (configuration `cfg`) over a copy of `base_model` with a new head of `classes` outputs."""
    encoder = Wav2VecEncoder(cfg, output_size=classes)
    encoder.w2v_model.load_state_dict(base_model.state_dict())
    model = Wav2VecCtc(cfg, encoder).eval()
    with torch.no_grad():
        model.w2v_encoder.proj.weight.copy_(0.3 * torch.randn(model.w2v_encoder.proj.weight.shape, generator=gen))
        model.w2v_encoder.proj.bias.copy_(0.1 * torch.randn(classes, generator=gen))
    return model


def logits(model, x):
    with torch.no_grad():
        out = model(source=x[None], padding_mask=None)
        return model.get_logits(out)[:, 0].contiguous()  # (T, C)


def encoder_out(model, x):
    with torch.no_grad():
        return model.extract_features(x[None], padding_mask=None, mask=False)["x"][0].contiguous()


def labels(n):
    """A fairseq Dictionary of `n` cluster labels (HuBERT's targets)."""
    d = Dictionary()
    for i in range(n):
        d.add_symbol(str(i))
    return d


def s3router(name, ctc, run, classes, prune_rate, fix_attn, gen, audio, ref):
    """Saves `ctc` (run settings `run`) as S3-Router's `wav2vec_ctc_st` stores it, with random
    scores beside each q/k/v/out and fc1/fc2 weight, and records the logits of the model with
    `GetSubnet`'s masks applied, and those masks."""
    layers = len(ctc.w2v_encoder.w2v_model.encoder.layers)
    masked_names = [f"encoder.layers.{i}.{m}" for i in range(layers) for m in ("fc1", "fc2", *(f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")))]
    state = ctc.state_dict()
    masked = Wav2VecCtc(run.model, Wav2VecEncoder(run.model, output_size=classes)).eval()
    masked.load_state_dict(state)
    masks = {}
    for n in masked_names:
        w = state[f"w2v_encoder.w2v_model.{n}.weight"]
        scores = torch.empty(w.shape).uniform_(-1, 1, generator=gen) / w.shape[1] ** 0.5
        state[f"w2v_encoder.w2v_model.{n}.scores"] = scores
        if fix_attn and "self_attn" in n:
            continue
        keep = keep_mask(scores, prune_rate)
        masks[n] = keep
        with torch.no_grad():
            masked.get_parameter(f"w2v_encoder.w2v_model.{n}.weight").mul_(keep)
    checkpoint = plain_state(run, ctc) | {"model": state}
    checkpoint["cfg"]["model"] |= {"_name": "wav2vec_ctc_st", "prune_rate": prune_rate, "fix_attn": fix_attn, "init_score": "weight_rank"}
    torch.save(checkpoint, os.path.join(OUT, f"{name}.pt"))
    for u, x in enumerate(audio):
        ref[f"{name}.utt{u}.logits"] = logits(masked, x)
    for n, keep in masks.items():
        ref[f"{name}.keep.{n}"] = keep


def keep_mask(scores, prune_rate):
    """S3-Router's `GetSubnet`: of |scores| sorted, the int((1 - k) * numel) smallest dropped."""
    flat = scores.abs().flatten()
    drop = int((1 - prune_rate) * flat.numel())
    keep = torch.ones_like(flat)
    keep[flat.sort().indices[:drop]] = 0
    return keep.reshape(scores.shape)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    gen = torch.Generator().manual_seed(20261128)
    torch.manual_seed(20261128)
    audio = utterances()
    ref = {}

    # pretrained-base.pt: raw audio in (normalize false, as wav2vec_small).
    base = pretrained(BASE, gen)
    base_cfg = full_cfg(BASE, normalize=False)
    torch.save(trainer_state(base_cfg, base), os.path.join(OUT, "pretrained-base.pt"))
    for u, x in enumerate(audio):
        ref[f"pretrained-base.utt{u}.encoder_out"] = encoder_out(base, x)

    # pretrained-large-legacy.pt: normalised audio in; an old flat Namespace of every setting.
    large = pretrained(LARGE, gen)
    args = argparse.Namespace(**OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(Wav2Vec2Config), LARGE), enum_to_str=True))
    args.arch, args.task, args.normalize, args.data = "wav2vec2", "audio_pretraining", True, "/data"
    state = {"args": args, "model": large.state_dict(), "optimizer_history": [], "extra_state": {"epoch": 3}, "last_optimizer_state": {}}
    torch.save(state, os.path.join(OUT, "pretrained-large-legacy.pt"), _use_new_zipfile_serialization=False)
    for u, x in enumerate(audio):
        ref[f"pretrained-large-legacy.utt{u}.encoder_out"] = encoder_out(large, normalized(x))

    # finetuned-ctc.pt: fairseq's Dictionary puts <s>, <pad>, </s>, <unk> before dict.ltr.txt's symbols.
    with open(os.path.join(OUT, "dict.ltr.txt"), "w") as f:
        f.writelines(f"{s} {1000 - i}\n" for i, s in enumerate(SYMBOLS))
    classes = 4 + len(SYMBOLS)
    # Trained on data in tests/fixtures/fairseq (relative to the repository root, where the tests
    # run), so the conversion finds dict.ltr.txt there without --dict.
    run = ctc_run(base_cfg, data="tests/fixtures/fairseq")
    ctc = ctc_model(base, run.model, classes, gen)
    torch.save(trainer_state(run, ctc), os.path.join(OUT, "finetuned-ctc.pt"))
    for u, x in enumerate(audio):
        ref[f"finetuned-ctc.utt{u}.logits"] = logits(ctc, x)

    # S3-Router checkpoints: scores beside the masked weights; the masked model's logits.
    for name, prune_rate, fix_attn in [("s3router-ctc", 0.9, True), ("s3router-p", 0.3, False)]:
        s3router(name, ctc, run, classes, prune_rate, fix_attn, gen, audio, ref)

    # HuBERT.
    hubert = HubertModel(HubertConfig(**SMALL, label_rate=50, final_dim=16), HubertPretrainingConfig(label_rate=50), [labels(20)]).eval()
    perturb(hubert, gen)
    hubert_cfg = full_cfg(dict(SMALL, final_dim=16, label_rate=50), normalize=False, config=HubertConfig, name="hubert")
    torch.save(plain_state(hubert_cfg, hubert), os.path.join(OUT, "pretrained-hubert.pt"))
    for u, x in enumerate(audio):
        with torch.no_grad():
            ref[f"pretrained-hubert.utt{u}.encoder_out"] = hubert.extract_features(x[None], padding_mask=None, mask=False)[0][0].contiguous()

    # data2vec-audio, with its EMA teacher, and S3-Router over it.
    d2v = Data2VecAudioModel(Data2VecAudioConfig(**DATA2VEC)).eval()
    perturb(d2v, gen)
    d2v.make_ema_teacher()
    d2v_cfg = full_cfg(DATA2VEC, normalize=True, config=Data2VecAudioConfig, name="data2vec_audio")
    torch.save(plain_state(d2v_cfg, d2v), os.path.join(OUT, "pretrained-data2vec.pt"))
    assert "_ema" in torch.load(os.path.join(OUT, "pretrained-data2vec.pt"), weights_only=False)["model"]
    for u, x in enumerate(audio):
        ref[f"pretrained-data2vec.utt{u}.encoder_out"] = encoder_out(d2v, normalized(x))
    d2v.ema = None
    d2v_run = ctc_run(d2v_cfg, normalize=True)
    d2v_ctc = ctc_model(d2v, d2v_run.model, classes, gen)
    s3router("s3router-data2vec", d2v_ctc, d2v_run, classes, 0.9, True, gen, [normalized(x) for x in audio], ref)

    safetensors.torch.save_file(ref, os.path.join(OUT, "reference.safetensors"))
    path = os.path.join(FIXTURES, "VERSIONS.json")
    with open(path) as f:
        versions = json.load(f)
    versions["make_fairseq_fixtures.py"] = {"torch": torch.__version__, "fairseq": fairseq.__version__}
    with open(path, "w") as f:
        json.dump(versions, f, indent=1)


if __name__ == "__main__":
    main()
