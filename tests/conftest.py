import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves a core free


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: a test of minutes; collected first so that the two xdist "
                            "workers start the long ones at once instead of one worker ending on them")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: heavy first, else as collected


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory):
    from shapefirst.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(folder=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_pipe):
    path = tmp_path_factory.mktemp("tiny_saved") / "pipe"
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path


def gens(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


class CondHalfOn:
    """A reference written without shapefirst: `module.forward` wrapped by plain test code so that on the calls
    `skip(i)` picks, only the conditional half of the [uncond, cond] batch runs and is returned in both halves
    (what a guidance stop with the conditional branch kept must equal). `calls` counts the denoiser's calls."""

    def __init__(self, module, skip):
        self.module, self.skip, self.calls, self.orig = module, skip, 0, module.forward
        module.forward = self.forward

    def forward(self, *args, **kwargs):
        i, self.calls = self.calls, self.calls + 1
        if not self.skip(i):
            return self.orig(*args, **kwargs)
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        rows = x.shape[0]

        def half(v):  # also inside dict arguments (a UNet's added_cond_kwargs: SDXL's, Kolors' pooled text, time ids)
            if isinstance(v, dict):
                return {k: half(x) for k, x in v.items()}
            return v[rows // 2:] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
        shared = ("txt_ids", "img_ids", "image_rotary_emb")  # per position (rows.SHARED_ARGS)
        out = self.orig(*[half(a) for a in args], **{k: v if k in shared else half(v) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return (torch.cat([out[0], out[0]]),) + tuple(out[1:])
        return type(out)(sample=torch.cat([out.sample, out.sample]))

    def close(self):
        del self.module.forward


def keep_from(step: int, branch: str):
    """diffusers' public step-end callback: from `step` on, the other branch gets the kept branch's embeddings."""
    def cb(pipe, i, t, kw):
        if i + 1 < step:
            return {}
        if branch == "cond":
            return {"negative_prompt_embeds": kw["prompt_embeds"]}
        return {"prompt_embeds": kw["negative_prompt_embeds"]}
    return cb


class RowCount:
    """An independent count: the rows a module (a denoiser's first layer) sees, by a plain torch forward pre-hook."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.rows += args[0].shape[0]


class CondFromStep:
    """The separate-call reference without shapefirst: plain torch forward hooks on the transformer(s) that, from step
    `k` on, return the step's conditional prediction for its unconditional call too (each step calls cond, then
    uncond); the unconditional call still runs, so a cache sees every call."""

    def __init__(self, modules, k: int):
        self.k, self.calls, self.cond = k, 0, None
        self.handles = [m.register_forward_hook(self.hook) for m in modules]

    def hook(self, module, args, out):
        step, second = divmod(self.calls, 2)
        self.calls += 1
        if not second:
            self.cond = out[0]
            return None
        return (self.cond.clone(),) + tuple(out[1:]) if step >= self.k else None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def stop_against_reference(pipe, den, first_layer, go, stop: int, scale: float, steps: int):
    """The batched-CFG contract of a stop: run go() under CondHalfOn from `stop` on (the reference without shapefirst),
    then under GuidanceSchedule(stop_step=stop, after="cond") with RowCount on the denoiser's first layer. Returns
    (reference, output, evaluations per image, rows counted, the rows a stop should compute per image)."""
    from shapefirst.guidance import GuidanceSchedule, guidance_schedule

    ref_wrap = CondHalfOn(den, lambda i: i >= stop)
    try:
        ref = go()
    finally:
        ref_wrap.close()
    count = RowCount(first_layer)
    try:
        with guidance_schedule(pipe, GuidanceSchedule(scale, stop_step=stop, after="cond")) as hook:
            got = go()
    finally:
        count.handle.remove()
    return ref, got, hook.evaluations_per_image(), count.rows, 2 * stop + steps - stop
