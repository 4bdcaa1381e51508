#!/usr/bin/env python3
"""PyTorch + transformers + TRL side of the Resonance benchmark (project issue 5).

    HF_HUB_OFFLINE=1 /root/.cache/venv-ref/bin/python bench/reference.py --model-dir bench/model --write-weights

builds the LLaVA-style model of bench/model/config.json with torch.manual_seed(seed), saves it (HF layout,
model.safetensors + the tokenizer/processor files) into bench/.cache/model so that `resonance bench` loads the
very same weights, then runs every workload of bench/workloads.json in a fresh subprocess (so the peak RSS is
per workload) and writes bench/.cache/pytorch.json plus a table. See bench/README.md for what is measured and
for the JSON schema.

`--write-config` regenerates bench/model/ (config.json + tokenizer/processor/chat template) from the constants
below and the fixture tokenizer in fixtures/tiny-llava; it is how bench/model was made.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SCHEMA_VERSION = 1

# Files of a model directory that are not weights (copied next to the weights in the cache dir).
MODEL_DIR_FILES = [
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def set_threads(n):
    # Before the first parallel region: intra-op = all cores, inter-op = 1 (nothing runs concurrently here).
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def rss_now_mb():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def rel(p):
    p = Path(p).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


# ----------------------------------------------------------------------------------------------------------
# Model definition (--write-config)
# ----------------------------------------------------------------------------------------------------------
FIXTURE = REPO / "fixtures" / "tiny-llava"
IMAGE_SIZE, PATCH_SIZE = 224, 14
VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6)
TEXT = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_config(model_dir):
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = AutoTokenizer.from_pretrained(FIXTURE)
    vision = CLIPVisionConfig(
        **VISION,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=VISION["hidden_size"],
    )
    text = LlamaConfig(
        **TEXT,
        vocab_size=len(tok),  # the model's vocabulary is exactly the tokenizer's (fixture: 500)
        head_dim=TEXT["hidden_size"] // TEXT["num_attention_heads"],
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    image_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=image_tokens,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    # Build on the meta device only to get the config transformers writes for a saved model.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model.config.architectures = ["LlavaForConditionalGeneration"]
    model.config.dtype = torch.float32
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(model_dir)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    ).save_pretrained(model_dir)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            do_resize=True,
            size={"shortest_edge": IMAGE_SIZE},
            resample=3,
            do_center_crop=True,
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            do_convert_rgb=True,
        ),
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    processor.save_pretrained(model_dir)
    # tokenizer files byte-identical to the fixture's (re-saving adds loader keys such as `is_local`)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(FIXTURE / name, model_dir / name)
    print(f"wrote {rel(model_dir)}: {sorted(p.name for p in model_dir.iterdir())}")


# ----------------------------------------------------------------------------------------------------------
# Weights (--write-weights)
# ----------------------------------------------------------------------------------------------------------
def param_counts(model):
    def n(mod):
        return sum(p.numel() for p in mod.parameters())

    inner = model.model
    counts = {
        "vision_tower": n(inner.vision_tower),
        "projector": n(inner.multi_modal_projector),
        "language_model": n(inner.language_model) + n(model.lm_head),
    }
    counts["total"] = sum(counts.values())
    assert counts["total"] == n(model), (counts, n(model))
    return counts


def write_weights(model_dir, weights_dir, seed):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(torch.float32).eval()
    weights_dir = Path(weights_dir)
    if weights_dir.exists():
        shutil.rmtree(weights_dir)
    weights_dir.mkdir(parents=True)
    model.save_pretrained(weights_dir, safe_serialization=True, max_shard_size="10GB")
    # The non-weight files are the committed ones, byte for byte (save_pretrained may add keys).
    for name in MODEL_DIR_FILES:
        if (Path(model_dir) / name).exists():
            shutil.copyfile(Path(model_dir) / name, weights_dir / name)
    info = {
        "seed": seed,
        "params": param_counts(model),
        "weights_sha256": sha256(weights_dir / "model.safetensors"),
        "config_sha256": sha256(Path(model_dir) / "config.json"),
    }
    (weights_dir / "bench_weights.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {rel(weights_dir)}/model.safetensors (seed {seed}, {info['params']['total'] / 1e6:.2f}M params)")
    return info


# ----------------------------------------------------------------------------------------------------------
# Synthetic inputs (formulas in bench/workloads.json "inputs")
# ----------------------------------------------------------------------------------------------------------
class Inputs:
    def __init__(self, spec, cfg):
        self.first = spec["first_text_id"]
        self.salts = spec["salts"]
        self.vocab = cfg.text_config.vocab_size
        self.bos = cfg.text_config.bos_token_id
        self.image_id = cfg.image_token_index
        self.image_size = cfg.vision_config.image_size
        self.image_tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        assert cfg.vision_feature_select_strategy == "default"

    def text_ids(self, b, n, salt):
        return [self.first + (b * 7919 + t * 104729 + salt * 15485863) % (self.vocab - self.first) for t in range(n)]

    def sequence(self, b, prompt_text_tokens, completion_tokens=0, completion="completion"):
        ids = [self.bos] + [self.image_id] * self.image_tokens
        ids += self.text_ids(b, prompt_text_tokens - 1, self.salts["prompt"])
        ids += self.text_ids(b, completion_tokens, self.salts[completion])
        return ids

    def pixels(self, batch):
        import torch

        s = self.image_size
        b = torch.arange(batch).view(-1, 1, 1, 1)
        c = torch.arange(3).view(1, -1, 1, 1)
        y = torch.arange(s).view(1, 1, -1, 1)
        x = torch.arange(s).view(1, 1, 1, -1)
        return (((b * 31 + c * 17 + y * 7 + x * 3) % 255).to(torch.float32) / 127.5 - 1.0).contiguous()

    def prompt_len(self, w):
        return 1 + self.image_tokens + w["prompt_text_tokens"] - 1


# ----------------------------------------------------------------------------------------------------------
# Analytic FLOPs (documented in README; the counted FlopCounterMode number is the primary one)
# ----------------------------------------------------------------------------------------------------------
def analytic_forward_flops(cfg, n_seqs, seq_len, n_images, lm_head_positions):
    """Matmul FLOPs of one forward, by component: 2 * multiply-adds of every Linear / Conv2d, and for attention
    4 * T^2 * (heads * head_dim) per layer and sequence (QK^T and AV over the full T x T square, causal or not,
    as torch's FLOP counter counts SDPA). Norms, activations, softmax, RoPE, embedding lookups: not counted."""
    v, t = cfg.vision_config, cfg.text_config
    dv, iv, lv = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    patches = (v.image_size // v.patch_size) ** 2
    tv = patches + 1  # + CLS
    vision = n_images * (2 * patches * 3 * v.patch_size**2 * dv + lv * 2 * tv * (4 * dv * dv + 2 * dv * iv))
    vision_attn = n_images * lv * 4 * tv * tv * dv
    d, i, l = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    hd = getattr(t, "head_dim", None) or d // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    projector = n_images * patches * 2 * (dv * d + d * d)
    lm = n_seqs * l * 2 * seq_len * (d * q + 2 * d * kv + q * d + 3 * d * i) + 2 * lm_head_positions * d * t.vocab_size
    lm_attn = n_seqs * l * 4 * seq_len * seq_len * q
    return {"vision": vision + vision_attn, "projector": projector, "lm": lm, "lm_attn": lm_attn}


def lora_flops(cfg, tokens, r):
    """Forward FLOPs of the LoRA branches (x A^T B^T) on q/k/v/o/gate/up/down of every layer."""
    t = cfg.text_config
    d, i = t.hidden_size, t.intermediate_size
    hd = getattr(t, "head_dim", None) or d // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    return t.num_hidden_layers * sum(2 * tokens * r * (a + b) for a, b in shapes)


# Backward multipliers: a Linear with trainable weights costs 2x its forward (input grad + weight grad), a frozen
# one whose input needs a gradient 1x; attention backward costs 2.5x its forward (5 matmuls: QK^T recomputed,
# dV, dP, dQ, dK), whatever is frozen.
ANALYTIC_FORMULAS = {
    "sft": "vision + 3 * (projector + lm) + 3.5 * lm_attn   [tower frozen: forward only]",
    "dpo": "policy: vision + projector + 2 * lm + 3.5 * lm_attn + 3 * lora; reference: vision + projector + lm + lm_attn"
    "   [over 2 * batch_pairs sequences and images]",
    "score": "vision + projector + lm + lm_attn",
    "generate": "prefill forward (LM head on the last position) + (new_tokens - 1) one-token forwards over the KV cache"
    " (attention 4 * context * q_dim per layer)",
}


def analytic_flops(cfg, kind, w, image_tokens):
    seq = w.get("text_tokens", 0) + image_tokens
    if kind == "sft":
        b = w["batch"]
        f = analytic_forward_flops(cfg, b, seq, b, b * (seq - 1))
        total = f["vision"] + 3 * (f["projector"] + f["lm"]) + 3.5 * f["lm_attn"]
    elif kind == "dpo":
        n = 2 * w["batch_pairs"]
        f = analytic_forward_flops(cfg, n, seq, n, n * (seq - 1))
        lora = lora_flops(cfg, n * seq, w["lora"]["r"])
        policy = f["vision"] + f["projector"] + 2 * f["lm"] + 3.5 * f["lm_attn"] + 3 * lora
        ref = f["vision"] + f["projector"] + f["lm"] + f["lm_attn"]
        total = policy + ref
    elif kind == "score":
        b = w["batch"]
        total = sum(analytic_forward_flops(cfg, b, seq, b, b * seq).values())
    elif kind == "generate":
        b, t = w["batch"], cfg.text_config
        p = 1 + image_tokens + w["prompt_text_tokens"] - 1
        total = sum(analytic_forward_flops(cfg, b, p, b, b).values())
        q = t.num_attention_heads * (getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
        one = analytic_forward_flops(cfg, b, 1, 0, b)["lm"]
        for k in range(1, w["new_tokens"]):  # the first new token comes from the prefill
            total += one + b * t.num_hidden_layers * 4 * (p + k) * q
    else:
        raise ValueError(kind)
    return int(total), ANALYTIC_FORMULAS[kind]


# ----------------------------------------------------------------------------------------------------------
# Child: one workload
# ----------------------------------------------------------------------------------------------------------
def run_child(args):
    import torch

    threads = args.threads
    set_threads(threads)
    torch.manual_seed(args.seed)
    import transformers
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlavaForConditionalGeneration

    transformers.logging.set_verbosity_error()
    spec = json.loads(Path(args.workloads).read_text())
    w = spec["workloads"][args.child]
    kind = w["kind"]
    rss_start = rss_now_mb()
    model = LlavaForConditionalGeneration.from_pretrained(
        args.weights_dir, dtype=torch.float32, attn_implementation=args.attn
    )
    cfg = model.config
    inp = Inputs(spec["inputs"], cfg)
    image_tokens = inp.image_tokens
    notes = []
    extra = {}

    if kind == "sft":
        from trl.trainer.utils import add_fused_lm_head

        # TRL's SFTTrainer path: the fused LM head (log-probs of the labelled positions, no full logits kept)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        model.train()
        model.model.vision_tower.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        o = w["optimizer"]
        opt = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])
        b, comp = w["batch"], w["text_tokens"] - w["prompt_text_tokens"]
        ids = torch.tensor([inp.sequence(i, w["prompt_text_tokens"], comp) for i in range(b)])
        labels = ids.clone()
        labels[:, : inp.prompt_len(w)] = -100
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inp.pixels(b), labels=labels)
        tokens = ids.numel()
        extra["trainable_params"] = sum(p.numel() for p in params)
        extra["vision_tower_calls_per_step"] = 1
        extra["images_encoded_per_step"] = b

        def step():
            opt.zero_grad(set_to_none=True)
            out = model(**batch, fused_lm_head=True)
            out.loss.backward()
            opt.step()
            return out.loss.item()

    elif kind == "dpo":
        from peft import LoraConfig, get_peft_model
        from trl.trainer.dpo_trainer import DPOTrainer
        from trl.trainer.utils import add_fused_lm_head

        lw = w["lora"]
        # as DPOTrainer.__init__ does: the fused head on the base model, before PEFT wraps it
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        targets = "|".join(lw["target_modules"])
        lcfg = LoraConfig(
            r=lw["r"],
            lora_alpha=lw["alpha"],
            lora_dropout=lw["dropout"],
            # only the language model's linears (CLIP also has q_proj/k_proj/v_proj)
            target_modules=rf".*language_model.*\.({targets})",
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        o = w["optimizer"]
        opt = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])
        b, comp = w["batch_pairs"], w["text_tokens"] - w["prompt_text_tokens"]
        chosen = [inp.sequence(i, w["prompt_text_tokens"], comp, "completion") for i in range(b)]
        rejected = [inp.sequence(i, w["prompt_text_tokens"], comp, "rejected") for i in range(b)]
        ids = torch.tensor(chosen + rejected)  # TRL: batch is [chosen..., rejected...]
        completion_mask = torch.zeros_like(ids)
        completion_mask[:, inp.prompt_len(w) :] = 1
        pixels = inp.pixels(b)
        # DataCollatorForVisionPreference repeats the images for chosen and rejected
        inputs = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.cat([pixels, pixels]),
            completion_mask=completion_mask,
        )
        tokens = ids.numel()

        class _Acc:  # single-process stand-in for accelerate.Accelerator
            device = torch.device("cpu")

            @staticmethod
            def gather_for_metrics(x):
                return x

            @staticmethod
            def gather(x):
                return x

            @staticmethod
            def unwrap_model(m):
                return m

        class _Args:
            gradient_checkpointing_kwargs = None

        stub = type("DPOStub", (), {})()
        stub.model = model
        stub.ref_model = None
        stub.accelerator = _Acc()
        stub.args = _Args()
        stub.aux_loss_enabled = False
        stub.ld_alpha = None
        stub.precompute_ref_logps = False
        stub.f_divergence_type = "reverse_kl"
        stub.f_alpha_divergence_coef = 1.0
        stub.loss_types = [w["loss_type"]]
        stub.loss_weights = [1.0]
        stub.beta = w["beta"]
        stub.label_smoothing = 0.0
        stub.use_weighting = False
        stub._metrics = {"train": __import__("collections").defaultdict(list), "eval": {}}
        stub._total_train_tokens = 0
        stub._tp_size = 1
        extra["trainable_params"] = sum(p.numel() for p in params)
        extra["vision_tower_calls_per_step"] = 2
        extra["images_encoded_per_step"] = 4 * b
        notes.append(
            "TRL way: DataCollatorForVisionPreference repeats each image for chosen and rejected, the policy forward "
            "and the reference forward (adapters disabled) each run the vision tower on 2*batch images: "
            f"{4 * b} image encodings per step for {b} distinct images"
        )
        notes.append("loss = trl DPOTrainer._compute_loss (TRL 1.16 code, called with a stub trainer)")

        def step():
            opt.zero_grad(set_to_none=True)
            loss = DPOTrainer._compute_loss(stub, model, inputs, False)
            loss.backward()
            opt.step()
            return loss.item()

    elif kind == "generate":
        model.eval()
        b = w["batch"]
        ids = torch.tensor([inp.sequence(i, w["prompt_text_tokens"]) for i in range(b)])
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inp.pixels(b))
        n = w["new_tokens"]
        tokens = b * n
        extra["prompt_tokens"] = ids.shape[1]
        gen_out = {}

        @torch.no_grad()
        def step():
            out = model.generate(
                **batch, do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                pad_token_id=cfg.text_config.pad_token_id,
            )
            new = out[:, ids.shape[1] :]
            assert new.shape[1] == n, new.shape
            gen_out["first_new_ids"] = new[0, :16].tolist()
            return None

    elif kind == "score":
        model.eval()
        b, comp = w["batch"], w["text_tokens"] - w["prompt_text_tokens"]
        ids = torch.tensor([inp.sequence(i, w["prompt_text_tokens"], comp) for i in range(b)])
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inp.pixels(b))
        start = inp.prompt_len(w)
        tokens = ids.numel()

        @torch.no_grad()
        def step():
            logits = model(**batch, use_cache=False).logits
            logp = torch.log_softmax(logits[:, start - 1 : -1].float(), dim=-1)
            per_tok = logp.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1)
            return per_tok.sum(dim=1).mean().item()  # mean over the batch of summed completion log-probs

    else:
        raise ValueError(f"unknown workload kind {kind!r}")

    rss_loaded = rss_now_mb()
    values = []
    # FLOPs: the first warm-up step runs under FlopCounterMode (an extra untimed step if --warmup 0)
    with FlopCounterMode(display=False) as fc:
        values.append(step())
    flops = fc.get_total_flops()
    for _ in range(args.warmup - 1):
        values.append(step())
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        values.append(step())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    fa, fa_formula = analytic_flops(cfg, kind, w, image_tokens)
    res = {
        "kind": kind,
        "ok": True,
        "times_s": times,
        "median_s": med,
        "min_s": min(times),
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / med,
        "flops_per_step": flops,
        "flops_source": "torch.utils.flop_counter.FlopCounterMode",
        "gflops_per_s": flops / med / 1e9,
        "flops_analytic_per_step": fa,
        "flops_analytic_formula": fa_formula,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_load_mb": rss_start,
        "rss_after_setup_mb": rss_loaded,
        "threads": torch.get_num_threads(),
    }
    if kind in ("sft", "dpo"):
        res["loss_first"] = values[0]
        res["loss_last"] = values[-1]
    if kind == "score":
        res["completion_logp_sum_mean"] = values[0]
    if kind == "generate":
        res["new_tokens_per_step"] = tokens
        res["first_new_ids_sample0"] = gen_out["first_new_ids"]
    res.update(extra)
    if notes:
        res["notes"] = notes
    Path(args.child_out).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------------------
def matmul_peak(n=2048, repeats=10, warmup=2):
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    for k in range(warmup + repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        dt = time.perf_counter() - t0
        if k >= warmup:
            times.append(dt)
    med = statistics.median(times)
    return {"n": n, "dtype": "float32", "op": "torch.matmul", "repeats": repeats, "median_s": med,
            "gflops": 2 * n**3 / med / 1e9, "best_gflops": 2 * n**3 / min(times) / 1e9}


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(result):
    peak = result["matmul_peak"]["gflops"]
    print()
    print(f"PyTorch reference, {result['machine']['threads']} threads, matmul peak {peak:.1f} GFLOP/s "
          f"(f32 {result['matmul_peak']['n']}^3), steps {result['settings']['steps']} / warm-up {result['settings']['warmup']}")
    hdr = f"{'workload':<12} {'median s':>9} {'tokens/s':>10} {'GFLOP/step':>11} {'GFLOP/s':>8} {'% peak':>7} {'peak RSS MB':>12}  extra"
    print(hdr)
    print("-" * len(hdr))
    for name, r in result["workloads"].items():
        if not r.get("ok"):
            print(f"{name:<12} FAILED: {r.get('error', '')[:100]}")
            continue
        ex = ""
        if "loss_first" in r:
            ex = f"loss {r['loss_first']:.4f}"
        if r["kind"] == "generate":
            ex = f"{r['tokens_per_step']} new tokens, prompt {r['prompt_tokens']}"
        print(f"{name:<12} {r['median_s']:>9.3f} {r['tokens_per_s']:>10.1f} {r['flops_per_step'] / 1e9:>11.1f} "
              f"{r['gflops_per_s']:>8.1f} {100 * r['gflops_per_s'] / peak:>6.1f}% {r['peak_rss_mb']:>12.0f}  {ex}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(BENCH / "model"), help="config + tokenizer dir (committed)")
    ap.add_argument("--weights-dir", default=str(BENCH / ".cache" / "model"), help="where the weights are written/read")
    ap.add_argument("--workloads", default=str(BENCH / "workloads.json"))
    ap.add_argument("--out", default=str(BENCH / ".cache" / "pytorch.json"))
    ap.add_argument("--write-config", action="store_true", help="regenerate --model-dir from the constants in this file")
    ap.add_argument("--write-weights", action="store_true", help="(re)build the seeded weights into --weights-dir")
    ap.add_argument("--seed", type=int, default=None, help="weight seed (default: workloads.json model.seed)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per workload (default: workloads.json)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default: workloads.json)")
    ap.add_argument("--only", default=None, help="comma-separated workload names (default: all)")
    ap.add_argument("--threads", type=int, default=cpu_count(), help="torch threads (default: all usable cores)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    ap.add_argument("--no-run", action="store_true", help="only write config/weights")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    spec = json.loads(Path(args.workloads).read_text())
    args.seed = spec["model"]["seed"] if args.seed is None else args.seed
    args.steps = spec["defaults"]["steps"] if args.steps is None else args.steps
    args.warmup = spec["defaults"]["warmup"] if args.warmup is None else args.warmup
    if args.child:
        return run_child(args)

    # Threads: fixed for every process (torch reads these at start-up too)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)

    if args.write_config:
        write_config(args.model_dir)
    weights = Path(args.weights_dir) / "model.safetensors"
    info_path = Path(args.weights_dir) / "bench_weights.json"
    if args.write_weights or not weights.exists():
        info = write_weights(args.model_dir, args.weights_dir, args.seed)
    else:
        info = json.loads(info_path.read_text())
        if info["config_sha256"] != sha256(Path(args.model_dir) / "config.json") or info["seed"] != args.seed:
            sys.exit(f"{rel(args.weights_dir)} was built from another config or seed: pass --write-weights")
    if args.no_run:
        return

    import torch
    import transformers
    import peft
    import trl

    set_threads(args.threads)
    names = list(spec["workloads"]) if args.only is None else args.only.split(",")
    load_start = os.getloadavg()
    peak = matmul_peak()
    print(f"matmul peak: {peak['gflops']:.1f} GFLOP/s ({args.threads} threads)", flush=True)
    result = {
        "schema_version": SCHEMA_VERSION,
        "implementation": "pytorch",
        "created_unix": int(time.time()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "backend": "cpu",
        "machine": {
            "cpu_model": cpu_model(),
            "cores": cpu_count(),
            "threads": args.threads,
            "load_avg_start": list(load_start),
        },
        "matmul_peak": peak,
        "model": {
            "config_dir": rel(args.model_dir),
            "weights": rel(weights),
            "weights_sha256": info["weights_sha256"],
            "seed": info["seed"],
            "dtype": "float32",
            "attn_implementation": args.attn,
            "params": info["params"],
        },
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "workloads_file": rel(args.workloads),
            "workloads_sha256": sha256(args.workloads),
            "statistic": "median",
        },
        "workloads": {},
    }
    for name in names:
        if name not in spec["workloads"]:
            sys.exit(f"unknown workload {name!r}; known: {', '.join(spec['workloads'])}")
        print(f"[{name}] running ({max(args.warmup, 1)} untimed (the first counts FLOPs) + {args.steps} timed steps) ...", flush=True)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "r.json"
            cmd = [sys.executable, __file__, "--child", name, "--child-out", str(out), "--weights-dir", args.weights_dir,
                   "--workloads", args.workloads, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--seed", str(args.seed), "--attn", args.attn]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode == 0 and out.exists():
                r = json.loads(out.read_text())
            else:
                r = {"kind": spec["workloads"][name]["kind"], "ok": False, "error": (p.stderr or "")[-4000:]}
                print(p.stderr[-4000:], file=sys.stderr)
        r["fraction_of_peak"] = r["gflops_per_s"] / peak["gflops"] if r.get("ok") else None
        r["wall_s"] = time.time() - t0
        result["workloads"][name] = r
        if r.get("ok"):
            print(f"[{name}] median {r['median_s']:.3f} s, {r['tokens_per_s']:.1f} tokens/s, "
                  f"{r['gflops_per_s']:.1f} GFLOP/s, peak RSS {r['peak_rss_mb']:.0f} MB ({r['wall_s']:.0f} s wall)", flush=True)
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwrote {rel(args.out)}")
    if not all(r.get("ok") for r in result["workloads"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
