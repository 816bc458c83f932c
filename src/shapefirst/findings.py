"""Sentences that state a finding, chosen from the measured numbers (never from the paper alone).

Each function takes an analysis's saved data (results.json as a dict) and returns short sentences;
where the data disagree with the paper, the sentence says so. The report and `shapefirst analyze`
print these, so a page never claims what its own table contradicts.
"""
from __future__ import annotations

CLASS_NAMES = {"sos": "[SOS]", "semantic": "word", "eos": "[EOS] (first)", "eos_pad": "[EOS] padding", "pad": "padding"}


def attention(data: dict) -> list[str]:
    mass = {c: v for c, v in (data.get("summary", {}).get("mean_mass_per_class") or {}).items() if v is not None}
    if not mass:
        return []
    top = max(mass, key=mass.get)
    name = CLASS_NAMES.get(top, top)
    if top == "sos":
        return [f"[SOS] is the attention sink here ({mass[top]:.2f} of the cross-attention mass), as the paper reports."]
    sos = mass.get("sos")
    tail = f"; [SOS] gets {sos:.3f}" if sos is not None else ""
    return [f"The {name} tokens are the attention sink here ({mass[top]:.2f} of the cross-attention mass{tail}); "
            "the paper reports [SOS]."]


def frequency(data: dict) -> list[str]:
    out = []
    for space, bands in (data.get("reverse", {}).get("settle_median") or {}).items():
        lo, hi = bands.get("low"), bands.get("high")
        if lo is None or hi is None:
            continue
        if lo < hi:
            verdict = "low frequencies first, as the paper reports"
        elif lo > hi:
            verdict = "the high band first, against the paper's low-first order"
        else:
            verdict = "both bands at the same call, so no order is seen here"
        out.append(f"In {space} space x0-hat's low band settles at call {lo:.0f} (median) and its high band at "
                   f"call {hi:.0f}: {verdict}.")
    return out


def stages(data: dict) -> list[str]:
    out = []
    for name, summ in (data.get("schedules") or {}).items():
        med = {a: v["median"] for a, v in (summ.get("settle") or {}).items() if v.get("median") is not None}
        if len(med) < 2:
            continue
        first, last = min(med, key=med.get), max(med, key=med.get)
        sentence = (f"With {name} guidance, {first} settles first (median call {med[first]:.0f}) and {last} last "
                    f"(call {med[last]:.0f}) of {summ.get('n_calls')} calls")
        if "texture" in med:
            shape_like = [med[a] for a in ("shape", "color", "position", "size") if a in med]
            later = bool(shape_like) and med["texture"] > max(shape_like)
            sentence += ("; texture (high frequency) after every low-frequency attribute, as the paper reports"
                         if later else "; texture is not the last to settle here, against the paper")
        out.append(sentence + ".")
    return out


def eos_swap(data: dict) -> list[str]:
    swap = (data.get("scores") or {}).get("swap") or {}
    parts, follows_b, judged = [], 0, 0
    for attr, d in swap.items():
        if not (isinstance(d, dict) and "a" in d and "b" in d):
            continue
        a, b = d["a"]["rate"], d["b"]["rate"]
        judged += 1
        follows_b += b > a
        parts.append(f"{attr} follows B {b:.0%} / A {a:.0%}")
    if not judged:
        return []
    if follows_b == judged:
        head = "With A's words and B's [EOS], the image follows B's [EOS] in every judged attribute, as the paper reports"
    elif follows_b == 0:
        head = "With A's words and B's [EOS], the image follows A's words in every judged attribute, against the paper"
    else:
        head = f"With A's words and B's [EOS], the image follows B's [EOS] in {follows_b} of {judged} judged attributes"
    return [f"{head} ({'; '.join(parts)})."]


def eos_title(data: dict) -> str:
    swap = (data.get("scores") or {}).get("swap") or {}
    obj = [d for a, d in swap.items() if a in ("shape", "color") and isinstance(d, dict) and "a" in d]
    if obj and all(d["b"]["rate"] > d["a"]["rate"] for d in obj):
        return "[EOS] decides the object"
    if obj and all(d["b"]["rate"] < d["a"]["rate"] for d in obj):
        return "The words, not [EOS], decide the object here"
    return "[EOS] swap: which prompt the object follows"


def frequency_title(data: dict) -> str:
    med = (data.get("reverse", {}).get("settle_median") or {}).get("latent") or {}
    if med.get("low") is not None and med.get("high") is not None and med["low"] < med["high"]:
        return "Low frequencies survive the noise; they are generated first"
    return "Low and high frequencies: which is generated first"


FINDINGS = {"attention": attention, "frequency": frequency, "stages": stages, "eos-swap": eos_swap}


def findings_of(name: str, data: dict) -> list[str]:
    """The finding sentences of analysis `name` (none for analyses that state no finding)."""
    fn = FINDINGS.get(name)
    return fn(data) if fn else []
