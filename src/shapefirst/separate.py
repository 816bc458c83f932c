"""Guidance as separate denoiser calls: pipelines that compute the conditional and the unconditional
prediction in two calls per step (Wan 2.1/2.2, ...), one row per image each, then combine them as
u + w (c - u) themselves.

Which branch a call computes is read from what it is given: the family's first branch argument
(families.Family.branches, e.g. Wan's `encoder_hidden_states`) IS the pipeline call's `prompt_embeds`
or its `negative_prompt_embeds` (identity of the tensor, never the parity of the call). A step ends
with its second branch, or when a branch is called again (a pipeline that skipped one). The schedule
counts steps (`RunState.call`).

In a step where some images are unguided, each of them costs one row:
- the step's first call computes its branch for the guided images and for the unguided images that keep
  that branch; an unguided image that keeps the OTHER branch gets its kept prediction here instead (those
  rows run with the other branch's arguments, taken from the pipeline call's locals);
- the second call computes the guided images only and returns the first call's rows for the others.
So for an unguided image both calls return its kept branch's prediction and the pipeline's own
u + w (c - u) yields exactly that branch. A step whose own guidance scale (`Family.scale_local`: Wan 2.2's
guidance_scale_2 on the low-noise expert) is <= 1 is unguided with the conditional branch kept: the
unconditional pass the pipeline would throw away is not computed (the video differs from diffusers' own
only by the rounding of u + 1 (c - u) against c). A step where the pipeline makes its conditional call alone
(`Family.cond_only_local`: Lumina 2 after its cfg_trunc_ratio) is one call, unguided, the conditional branch kept,
whatever the schedule says: the pipeline uses that call's output as its prediction.

Per-image evaluations count the rows computed. Adaptive stops (cosine or shape) and the trajectory
recorder see both branches at the step's second call, in the scheduler's conventions: a family whose denoiser runs
on reversed time or whose output the pipeline negates (`Family.time_reversed`, `Family.negated`: Lumina 2) has its
timestep and predictions mapped back first. Their combined prediction is u + w (c - u) (a pipeline's own
renormalisation of it, Lumina 2's and Qwen-Image's, is not mirrored). No host read beyond the schedule's own: the row
indices are built per pattern of guided images on the denoiser's device and reused."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .errors import ShapefirstError
from .families import Family
from .pipeline import timestep_input, timestep_value
from .rows import main_output, replace_output, rows_of


@dataclass(frozen=True)
class StepRows:
    """One step's rows on the denoiser's device: `same` (the first call computes its own branch there),
    `other` (the first call computes the other branch there: unguided images that keep it), `guided_rows`
    (what the second call computes), `guided` (bool per image); `kept` is the branch unguided images keep."""

    same: torch.Tensor
    other: torch.Tensor
    guided_rows: torch.Tensor
    guided: torch.Tensor
    kept: str
    full: bool


def step_rows(guided: tuple[bool, ...], first: str, kept: str, device) -> StepRows:
    g = torch.tensor(guided, dtype=torch.bool)
    ar = torch.arange(len(guided))
    same, other = (ar, ar[:0]) if kept == first else (ar[g], ar[~g])
    return StepRows(same.to(device), other.to(device), ar[g].to(device), g.to(device), kept, bool(g.all()))


def branch_of(family: Family, call, kwargs: dict) -> str:
    """"cond" or "uncond": which of the pipeline call's embeddings this denoiser call was given."""
    arg, cond_local, uncond_local = family.branches[0]
    given = kwargs.get(arg)
    if given is not None and given is call.local(cond_local):
        return "cond"
    if given is not None and given is call.local(uncond_local):
        return "uncond"
    raise ShapefirstError(f"a {type(call.pipe).__name__} denoiser call was given an `{arg}` that is neither the "
                          f"call's {cond_local} nor its {uncond_local}, so its branch is unknown",
                          "pass the embeddings through the pipeline's own arguments (prompt or prompt_embeds)")


def branch_kwargs(family: Family, call, kwargs: dict, branch: str) -> dict:
    """The denoiser arguments of `branch`: each declared branch argument from the pipeline call's locals."""
    out = dict(kwargs)
    for arg, cond_local, uncond_local in family.branches:
        if arg in out:
            out[arg] = call.local(cond_local if branch == "cond" else uncond_local)
    return out


def cond_only(family: Family, call) -> bool:
    """Does the pipeline make its conditional call alone this step (Family.cond_only_local, e.g. Lumina 2's
    do_classifier_free_truncation)?"""
    return bool(family.cond_only_local and call.local(family.cond_only_local, False))


def step_scale(st) -> float:
    """The guidance scale of the current step: the family's per-step local, else the run's."""
    local = st.binding.family.scale_local
    w = st.pipeline_call.local(local) if local else None
    return float(w) if isinstance(w, (int, float)) else st.guidance_weight()


class SeparateCalls:
    """The guidance hook's path for a "separate" family (see the module docstring); state in the RunState."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, st, sample, args, kwargs):
        fam, call = st.binding.family, st.pipeline_call
        if not st.cfg_pending or (not st.step_seen and cond_only(fam, call)):  # one call this step
            out = self.forward(*args, **kwargs)
            st.evaluations += 1
            if st.cfg_pending:  # a step without guidance in a guided run: unguided from here on
                st.stop_calls[st.stop_calls < 0] = st.call
            st.call += 1
            st.session.release_if_done(st)
            return out
        branch = branch_of(fam, call, kwargs)
        if branch in st.step_seen:
            self.close(st)
        if not st.step_seen:
            self.open(st, branch, sample.device)
        st.step_seen.add(branch)
        if len(st.step_seen) == 1:
            out = self.first(st, fam, call, args, kwargs, branch)
            st.evaluations += 1
            return out
        out, second = self.second(st, args, kwargs)
        st.evaluations += st.guided.long()
        first = st.step_first
        uncond, cond = (first, second) if st.step_branch == "uncond" else (second, first)
        self.observe(st, sample, args, kwargs, uncond, cond)
        self.close(st)
        st.session.release_if_done(st)
        return out

    def open(self, st, branch: str, device) -> None:
        guided, kept = st.guided_at(st.call), st.schedule.after
        if step_scale(st) <= 1.0:  # this step runs no guidance (Wan 2.2 guidance_scale_2=1): keep the cond branch
            guided, kept = torch.zeros_like(guided), "cond"
        st.guided = guided
        key = ("separate", tuple(guided.tolist()), branch, kept, device)
        st.layout = st.session.layout(key, lambda: step_rows(key[1], branch, kept, device))

    def close(self, st) -> None:
        newly = (st.stop_calls < 0) & ~st.guided
        st.stop_calls[newly] = st.call
        st.call += 1
        st.step_seen = set()

    def first(self, st, fam: Family, call, args, kwargs, branch: str):
        lay, rows = st.layout, st.batch
        if not len(lay.other):
            out = self.forward(*args, **kwargs)
            st.step_first, st.step_branch, st.step_out = main_output(out), branch, out
            return out
        kept_kwargs = branch_kwargs(fam, call, kwargs, lay.kept)
        outs = [(lay.other, self.forward(*rows_of(args, rows, lay.other), **rows_of(kept_kwargs, rows, lay.other)))]
        if len(lay.same):
            outs.append((lay.same, self.forward(*rows_of(args, rows, lay.same), **rows_of(kwargs, rows, lay.same))))
        ref = main_output(outs[0][1])
        pred = ref.new_empty((rows,) + tuple(ref.shape[1:]))
        for idx, out in outs:
            pred.index_copy_(0, idx, main_output(out))
        st.step_first, st.step_branch, st.step_out = pred, branch, outs[0][1]
        return replace_output(copy.copy(outs[0][1]), pred)

    def second(self, st, args, kwargs):
        lay, rows = st.layout, st.batch
        if lay.full:
            out = self.forward(*args, **kwargs)
            return out, main_output(out)
        if not len(lay.guided_rows):
            pred = st.step_first.clone()
            return replace_output(copy.copy(st.step_out), pred), pred
        out = self.forward(*rows_of(args, rows, lay.guided_rows), **rows_of(kwargs, rows, lay.guided_rows))
        pred = st.step_first.index_copy(0, lay.guided_rows, main_output(out))
        return replace_output(copy.copy(out), pred), pred

    def observe(self, st, sample, args, kwargs, uncond, cond) -> None:
        """Adaptive stops and the trajectory recorder, once both branches of the step are known."""
        ad, fam = st.schedule.adaptive, st.binding.family
        w = step_scale(st)
        if fam.negated:
            uncond, cond = -uncond, -cond
        if ad is not None and ad.criterion == "shape":
            st.settle(uncond, cond, sample, scheduler_time(fam, st.pipe, args, kwargs, sample.device), w)
        else:
            st.settle(uncond, cond)
        if st.recorder is not None:
            g = st.layout.guided.to(uncond.device).view(-1, *[1] * (uncond.dim() - 1))
            kept = cond if st.layout.kept == "cond" else uncond
            combined = torch.where(g, uncond + w * (cond - uncond), kept)
            t = timestep_value(scheduler_time(fam, st.pipe, args, kwargs, sample.device))
            st.recorder.record(st.call, t, sample, uncond, cond, combined, st.guided.clone(), st.layout.kept)


def scheduler_time(family: Family, pipe, args, kwargs, device) -> torch.Tensor:
    """The call's timestep (a 0-dim tensor, where it is) as the scheduler counts it: the denoiser's own, or for a
    `time_reversed` family (1 - d) * num_train_timesteps of the denoiser's d."""
    t = timestep_input(args, kwargs)
    t = t.reshape(-1)[0] if isinstance(t, torch.Tensor) else torch.tensor(float(t), device=device)
    return (1 - t) * pipe.scheduler.config.num_train_timesteps if family.time_reversed else t
