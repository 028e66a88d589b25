#!/usr/bin/env python3
"""Same-machine baseline for bench/gpu/run.sh: PyTorch + transformers + PEFT
on a SmolLM2-135M-shaped Llama (bf16, random weights: speed does not depend
on the values).

Measures the reference points of the GPU table: prefill of a 60-token prompt, HF
`generate` tokens/s at batch 1, and LoRA SFT (r=16, alpha=32, all linear
layers, AdamW) tokens/s on 685 sequences of 48 tokens, batch 8.

Usage: peft_baseline.py OUT.json [EPOCHS=1]
"""
import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def sync():
    torch.cuda.synchronize()


def main():
    out = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to("cuda", dtype=torch.bfloat16).eval()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    # Prefill: 60-token prompt, one forward pass.
    prompt = torch.randint(3, cfg.vocab_size, (1, 60), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            model(prompt)
        sync()
        times = []
        for _ in range(20):
            t = time.perf_counter()
            model(prompt)
            sync()
            times.append(time.perf_counter() - t)
    times.sort()
    report["prefill_60_ms_p50"] = times[len(times) // 2] * 1e3

    # HF generate, batch 1, greedy, a fixed number of new tokens.
    new = 64
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        sync()
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync()
    report["generate_tokens_per_second"] = new / (time.perf_counter() - t)

    # LoRA SFT.
    model.train()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.randint(3, cfg.vocab_size, (685, 48), device="cuda")
    batch = 8

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(5):
        step(data[i * batch:(i + 1) * batch])
    sync()
    t = time.perf_counter()
    tokens = 0
    for _ in range(epochs):
        for i in range(0, data.shape[0], batch):
            x = data[i:i + batch]
            step(x)
            tokens += x.numel()
    sync()
    secs = time.perf_counter() - t
    report["lora_sft_epochs"] = epochs
    report["lora_sft_seconds"] = secs
    report["lora_sft_tokens_per_second"] = tokens / secs
    json.dump(report, open(out, "w"), indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
