#!/usr/bin/env python3
"""The table of bench/gpu/run.sh: reads the JSON reports in DIR, prints
Markdown, with ratios against the same-machine PyTorch/PEFT baseline and
the GPU targets (decode 10x HF generate, route <= 5 ms, LoRA 3x PEFT).

Usage: summary.py DIR
"""
import json
import os
import sys


def load(d, name):
    try:
        with open(os.path.join(d, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt(v, unit="", digits=1):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}{unit}"


def main():
    d = sys.argv[1]
    rows = []
    gpu = None
    try:
        gpu = open(os.path.join(d, "gpu.txt")).read().strip()
    except OSError:
        pass
    peft = load(d, "peft.json")
    hf_tps = peft and peft.get("generate_tokens_per_second")
    for tag, again in (("", ""), ("-contiguous", ", second run"), ("-stored", ", third run"),
                       ("-f32", ", fourth run")):
        engine_rows(rows, load(d, f"engine{tag}.json"), peft, hf_tps, again)
    overhead_rows(rows, d)
    server_rows(rows, d, hf_tps)
    train_rows(rows, d, peft)
    route_ft_rows(rows, d)
    print(f"GPU: {gpu or 'none reported'}\n")
    print("| metric | value | notes |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


def kv_label(eng):
    if eng.get("paged_attention") is None:
        return ""
    kv = ", paged attention" if eng["paged_attention"] else ", contiguous KV cache"
    if eng.get("generation_f32_weights"):
        kv += ", f32 weights"
    return kv


def router_label(eng):
    if eng.get("router_f32_weights") is None:
        return ""
    return ", f32 weights" if eng["router_f32_weights"] else ", weights as stored"


def engine_rows(rows, eng, peft, hf_tps, again):
    if eng:
        kv = kv_label(eng)
        rows.append((f"model load (GGUF -> ready, in process){again}", fmt(eng["load_ms"], " ms", 0), ""))
        r = eng["route_ms"]
        rw = router_label(eng)
        rows.append((f"route decision, in process ({eng['route_prompt_tokens']}-token prompt, prefix cached{rw}){again}",
                     f"p50 {fmt(r['p50'], ' ms', 2)}, p99 {fmt(r['p99'], ' ms', 2)}", "target p50 <= 5 ms"))
        idle = eng.get("route_ms_idle")
        if idle:
            rows.append((f"route decision, in process, router idle ({eng['route_gap_ms']} ms apart{rw}){again}",
                         f"p50 {fmt(idle['p50'], ' ms', 2)}, p99 {fmt(idle['p99'], ' ms', 2)}", "target p50 <= 5 ms"))
        t = eng["ttft_ms"]
        base = peft and peft.get("prefill_60_ms_p50")
        rows.append((f"TTFT, {eng['ttft_prompt_tokens']}-token prompt, in process{kv}",
                     f"p50 {fmt(t['p50'], ' ms', 2)}, p99 {fmt(t['p99'], ' ms', 2)}",
                     f"PyTorch prefill of 60 tokens: {fmt(base, ' ms', 2)}" if base else ""))
        rows.append((f"prefill{kv}", fmt(eng["prefill_tokens_per_second"], " tok/s", 0), ""))
        dec = eng["decode_tokens_per_second"]
        rows.append((f"decode, batch 1 (in process){kv}", fmt(dec, " tok/s", 0),
                     f"{dec / hf_tps:.1f}x HF generate ({hf_tps:.1f} tok/s); target 10x" if hf_tps else "target 10x HF generate"))
        long = eng.get("decode_long_prompt")
        if long:
            rows.append((f"decode, batch 1, after a {long['prompt_tokens']}-token prompt (in process){kv}",
                         fmt(long["tokens_per_second"], " tok/s", 0),
                         f"{long['tokens_per_second'] / dec:.2f}x the short-prompt decode"))


def overhead_rows(rows, d):
    """Step 1e: per-step fixed cost from models of 1 and 30 tiny blocks."""
    tiny = {n: load(d, f"engine-tiny{n}.json") for n in (1, 30)}
    ms = {n: 1000 / e["decode_tokens_per_second"] for n, e in tiny.items() if e and e.get("decode_tokens_per_second")}
    for n, e in tiny.items():
        if not e:
            continue
        r, idle = e["route_ms"], e.get("route_ms_idle") or {}
        rows.append((f"{n} tiny block(s) (dim 64, same vocabulary): decode step, route decision",
                     f"{fmt(ms.get(n), ' ms', 2)}/token; route p50 {fmt(r['p50'], ' ms', 2)}, idle {fmt(idle.get('p50'), ' ms', 2)}",
                     "arithmetic negligible: engine step + per-block fixed cost"))
    if 1 in ms and 30 in ms:
        per_block = (ms[30] - ms[1]) / 29
        real = load(d, "engine.json")
        note = f"step without blocks ~{fmt(ms[1] - per_block, ' ms', 2)}"
        if real and real.get("decode_tokens_per_second"):
            real_ms = 1000 / real["decode_tokens_per_second"]
            note += f"; 30 tiny blocks take {ms[30] / real_ms:.0%} of the real model's {real_ms:.2f} ms/token"
        rows.append(("decode: fixed cost per block", fmt(per_block * 1000, " us", 0), note))


def server_rows(rows, d, hf_tps):
    for tag, label in (("", ""), ("-bf16", ", bf16 activations"), ("-contiguous", ", contiguous KV cache")):
        try:
            load_ms = open(os.path.join(d, f"server-load{tag}.txt")).read().strip().split("=")[1]
            rows.append((f"server start: load and warm the router and answer engines{label}", f"{int(load_ms):,} ms", ""))
        except (OSError, IndexError, ValueError):
            pass
        dec = load(d, f"route-decisions{tag}.json")
        if dec and dec.get("n"):
            rows.append((f"route decision in the server, 1 client (request log){label}",
                         f"p50 {fmt(dec['p50'], ' ms', 2)}, p99 {fmt(dec['p99'], ' ms', 2)}", f"{dec['n']} decisions; target <= 5 ms"))
        route = load(d, f"route-c1{tag}.json")
        if route:
            l = route["latency_ms"]
            rows.append((f"route through gRPC, 1 client{label}", f"p50 {fmt(l['p50'], ' ms', 2)}, p99 {fmt(l['p99'], ' ms', 2)}",
                         f"{route['requests_per_second']:.0f} req/s, {route['errors']} errors"))
        for c in (1, 8, 32, 64):
            chat = load(d, f"chat-c{c}{tag}.json")
            if not chat:
                continue
            ttft, itl = chat.get("ttft_ms") or {}, chat.get("itl_ms") or {}
            extra = f"TTFT p50 {fmt(ttft.get('p50'), ' ms', 1)} / p99 {fmt(ttft.get('p99'), ' ms', 1)}, ITL p50 {fmt(itl.get('p50'), ' ms', 2)}"
            if c == 1 and itl.get("p50") and hf_tps:
                extra += f"; {1000 / itl['p50'] / hf_tps:.1f}x HF generate ({hf_tps:.1f} tok/s), target 10x"
            if chat["errors"]:
                extra += f", {chat['errors']} errors {chat['errors_by_status']}"
            if chat.get("unfinished"):
                extra += f", {chat['unfinished']} unfinished at the hard stop"
            rows.append((f"streaming chat through gRPC, {c} streams{label}", fmt(chat["output_tokens_per_second"], " tok/s", 0),
                         f"{chat['requests_per_second']:.1f} answers/s, {extra}"))


def train_rows(rows, d, peft):
    peft_tps = peft and peft.get("lora_sft_tokens_per_second")
    for run in ("30", "8", "30-f32", "k12"):
        m = load(d, f"train-{run}.json")
        if not m:
            continue
        tr = m["training"]
        tps = tr["tokens_per_second"]
        hy = m["hyper"]
        total = tr["seconds"] + tr["frozen_seconds"]
        note = (f"{tr['steps']} steps in {tr['seconds']:.1f} s (+{tr['frozen_seconds']:.1f} s for the frozen blocks, "
                f"once: {tps * tr['seconds'] / max(total, 1e-9):,.0f} tok/s end to end), device {tr.get('device', '?')}")
        if peft_tps:
            note += f"; {tps / peft_tps:.1f}x PEFT ({peft_tps:,.0f} tok/s); target 3x"
        blocks = hy.get("trained_blocks") or "all"
        precision = "TF32" if tr.get("tf32") else "f32"
        base = m.get("base") or {}
        kept = (f", pruned to {base['kept_blocks']} of {base['blocks']} blocks"
                if base.get("kept_blocks") and base.get("kept_blocks") != base.get("blocks") else "")
        rows.append((f"LoRA SFT r{hy['rank']}, {m['data']['examples']} examples x {hy['epochs']} epochs, "
                     f"trained blocks {blocks}{kept}, {precision}", fmt(tps, " tok/s", 0), note))
    if peft:
        rows.append(("baseline: PyTorch " + peft.get("torch", "") + " + PEFT LoRA SFT (bf16, 685x48, batch 8)",
                     fmt(peft_tps, " tok/s", 0), f"{peft['lora_sft_seconds']:.1f} s for {peft['lora_sft_epochs']} epoch(s)"))
        rows.append(("baseline: HF generate, batch 1 (bf16)", fmt(peft.get("generate_tokens_per_second"), " tok/s", 1), ""))



def route_ft_rows(rows, d):
    """Step 3b: fine-tuned routers' decisions (flywheel-trainer eval)."""
    for run, label in (("8", "LoRA on the top 8 of 30 blocks"), ("k12", "pruned to 12 blocks")):
        r = load(d, f"route-ft-{run}.json")
        if not r:
            continue
        m = r["model"]
        rows.append((f"route decision, fine-tuned router ({label}; its own prompt, no expert list)",
                     f"p50 {fmt(m['latency_p50_ms'], ' ms', 2)}, p99 {fmt(m['latency_p99_ms'], ' ms', 2)}",
                     f"flywheel-trainer eval, {m['n']} decisions on {m.get('device', '?')}, "
                     f"{m['size_bytes'] / 1e6:.0f} MB; target <= 5 ms"))


if __name__ == "__main__":
    main()
