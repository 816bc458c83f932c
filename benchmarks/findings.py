"""The paper's findings measured on the embedded shapes-world model (prints a table; not a test).

- stages: the denoiser call at which each attribute of the decoded x0-hat settles (n prompts),
  under full guidance and with guidance stopped at half the calls;
- eos-swap: share of A-words + B-[EOS] images judged as A's vs B's value per attribute (n pairs,
  Wilson 95% CIs), and the [EOS] switch curve on a subset;
- attention: [SOS] attention mass; the call from which the semantic tokens' maps stay at
  relative F1 >= 0.9 of the final map;
- frequency: the call at which the low / high band of x0-hat settles (latent space);
- token ablations: judged accuracy when the words, the [EOS] block or parts of it are zeroed or noised,
  and when only the attention keys or values get another prompt's [EOS] block (ablation-n prompts).

    python benchmarks/findings.py [--n 200] [--pairs 200] [--switch-pairs 48] [--ablation-n 24]
        [--steps 50] [--out findings]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from shapefirst.experiments import run_analysis
from shapefirst.experiments.attention import run_attention
from shapefirst.experiments.eos_swap import encode_prompts, eos_switch, run_eos_swap, swapped
from shapefirst.experiments.stages import run_stages
from shapefirst.world.prompts import world_prompts
from shapefirst.guidance import GuidanceSchedule
from shapefirst.metrics import Clip
from shapefirst.models import default_guidance, embedded_model_path, load_pipeline
from shapefirst.prompts import world_pairs
from shapefirst.tokens import analyze_prompt


def _share(d):
    return f"{d['rate']:.1%} [{d['ci'][0]:.1%}, {d['ci'][1]:.1%}]"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--switch-pairs", type=int, default=48)
    ap.add_argument("--attention-n", type=int, default=48)
    ap.add_argument("--ablation-n", type=int, default=24)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--out", default="findings")
    ap.add_argument("--model", default="embedded", help="embedded, or 'tiny' (random in-code pipeline: a smoke run)")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's recommended scale")
    args = ap.parse_args()
    w = default_guidance(args.model) if args.guidance is None else args.guidance
    out = Path(args.out)
    if args.model == "tiny":
        from shapefirst.tiny import tiny_clip_folder, tiny_sd_pipeline

        pipe = tiny_sd_pipeline(folder=out / "tiny")
        clip = Clip.load(tiny_clip_folder(out / "tiny_clip"))
    else:
        pipe = load_pipeline(args.model)
        clip = Clip.load(embedded_model_path() / "clip")
    load0 = os.getloadavg()
    t0 = time.time()
    times = {}
    s = time.time()
    stages = run_analysis("stages", pipe, out, n=args.n, steps=args.steps, batch=args.batch, guidance=w)
    times["stages"] = time.time() - s
    s = time.time()
    freq = run_analysis("frequency", pipe, out, n=min(args.n, 64), steps=args.steps, batch=args.batch, guidance=w)
    times["frequency"] = time.time() - s
    s = time.time()
    ps, _ = world_prompts(args.attention_n, 1)
    att = run_attention(pipe, ps, steps=args.steps, batch=min(args.batch, 16), schedule=GuidanceSchedule(w))
    att.save(out / "attention")
    times["attention"] = time.time() - s
    s = time.time()
    pairs = world_pairs(args.pairs, 0)
    swap = run_eos_swap(pipe, pairs, steps=args.steps, batch=args.batch, switch_calls=[], clip=clip,
                        schedule=GuidanceSchedule(w))
    swap.save(out / "eos-swap")
    sw = run_eos_swap(pipe, pairs[:args.switch_pairs], steps=args.steps, batch=args.batch, clip=None,
                      schedule=GuidanceSchedule(w))
    sw.save(out / "eos-switch")
    times["eos-swap"] = time.time() - s
    # stages under the [EOS] switch: prompts A, [EOS] block of B from call a on (one batch per a)
    s = time.time()
    sub = pairs[:args.switch_pairs]
    a_txt, b_txt = [p["a"] for p in sub], [p["b"] for p in sub]
    ca, _ = encode_prompts(pipe, a_txt)
    cb, _ = encode_prompts(pipe, b_txt)
    sw_cond = swapped(ca, [analyze_prompt(pipe.tokenizer, t) for t in a_txt], cb,
                      [analyze_prompt(pipe.tokenizer, t) for t in b_txt])
    switch_stages = {}
    for a in (0, 5):
        with eos_switch(pipe, sw_cond, a):
            switch_stages[a] = run_stages(pipe, a_txt, [p["labels_b"] for p in sub], steps=args.steps,
                                          batch=len(sub), schedules={f"[EOS] of B from call {a}": GuidanceSchedule(w)})
    times["stages-under-switch"] = time.time() - s
    s = time.time()
    abl = run_analysis("token-ablation", pipe, out, n=args.ablation_n, steps=args.steps, batch=args.batch, guidance=w)
    times["token-ablation"] = time.time() - s
    load1 = os.getloadavg()

    print(f"# findings on {args.model}: DDIM {args.steps} steps, guidance {w:g}; "
          f"{platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}; "
          f"load {load0[0]:.2f} -> {load1[0]:.2f}; {time.time() - t0:.0f} s")
    print(f"\n## When each attribute settles (n={args.n} held-out prompts; call index of {args.steps} calls)")
    print("| schedule | attribute | median | 10th pct | 90th pct | final judged = prompt |")
    print("|---|---|---:|---:|---:|---:|")
    for name, summ in stages.data["schedules"].items():
        for a, v in summ["settle"].items():
            fm = summ.get("final_match", {}).get(a)
            print(f"| {name} | {a} | {v['median']:.0f} | {v['p10']:.0f} | {v['p90']:.0f} | "
                  f"{'' if fm is None else format(fm, '.1%')} |")
    print(f"\n## Stages under the [EOS] switch (n={args.switch_pairs} pairs; prompt A, B's [EOS] block from call a;"
          " 'final = B' is the share whose final judged value is B's)")
    print("| a | attribute | median settling call | 90th pct | final = B |")
    print("|---:|---|---:|---:|---:|")
    for a, st in switch_stages.items():
        for name, summ in st.data["schedules"].items():
            for attr, v in summ["settle"].items():
                print(f"| {a} | {attr} | {v['median']:.0f} | {v['p90']:.0f} | "
                      f"{summ['final_match'].get(attr, float('nan')):.0%} |")
    rev = freq.data["reverse"]
    print(f"\n## Frequency (n={freq.data['settings']['n_images']}): x0-hat band settling call (tol {rev['tol']})")
    for space, d in rev["settle_median"].items():
        print(f"- {space}: low band median call {d['low']:.0f}, high band median call {d['high']:.0f}; "
              f"low settles no later than high in {rev['settle'][space]['share_low_not_after_high']:.0%} of images")
    sm = att.data["summary"]
    print(f"\n## Attention (n={args.attention_n})")
    print("- mean attention mass per class: "
          + ", ".join(f"{c} {v:.3f}" for c, v in sm["mean_mass_per_class"].items()))
    print(f"- [SOS] mass, lowest per-call mean: {sm['sos_mass_min_over_calls']:.3f}")
    print("- semantic-token maps stay at relative F1 >= 0.9 of the final map from call "
          f"{sm['semantic_f1_ge_0.9_from_call']}")
    print(f"\n## [EOS] swap (n={args.pairs} pairs): A's words + B's [EOS] block")
    print("| attribute | n (A != B) | judged as A | judged as B |")
    print("|---|---:|---:|---:|")
    for attr, d in swap.data["scores"]["swap"].items():
        if isinstance(d, dict) and "a" in d:
            print(f"| {attr} | {d['n']} | {_share(d['a'])} | {_share(d['b'])} |")
    print("\nPooled over both directions (A-words+B-[EOS] and B-words+A-[EOS]): the attribute follows")
    print("| attribute | n | the words | the [EOS] block |")
    print("|---|---:|---:|---:|")
    for attr, d in swap.data["scores"]["follows"].items():
        print(f"| {attr} | {d['n']} | {_share(d['words'])} | {_share(d['eos'])} |")
    if swap.data.get("clip"):
        c = swap.data["clip"]["swap"]["b_minus_a"]
        print(f"- world CLIPScore(B) - CLIPScore(A) of swapped images: {c['mean']:+.2f} "
              f"[{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]")
    print(f"\n## [EOS] switched to B's only from call a on (n={args.switch_pairs} pairs): share judged as B")
    sw_data = sw.data["switch"]
    attrs = sorted({a for e in sw_data["per_call"] for a in e.get("shares", {})})
    print("| from call a | " + " | ".join(attrs) + " |")
    print("|---:|" + "---:|" * len(attrs))
    for e in sw_data["per_call"]:
        print(f"| {e['from_call']} | " + " | ".join(f"{e['shares'][a]['b']['rate']:.0%}" for a in attrs) + " |")
    print(f"\n## Token ablations (n={args.ablation_n} held-out prompts; judged accuracy, Wilson 95% CIs)")
    print("| variant | all five right | shape | color | L1 to plain |")
    print("|---|---:|---:|---:|---:|")
    for v in abl.data["variants"]:
        sc = abl.data["scores"][v]
        j = sc.get("judged", {})
        cells = [_share(j[a]) if a in j else "-" for a in ("all", "shape", "color")]
        print(f"| {v} | " + " | ".join(cells) + f" | {sc['l1_to_plain']['mean']:.4f} |")
    print(f"\n(times: {', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")


if __name__ == "__main__":
    main()
